"""The deterministic, resumable training dataset over memory-mapped token shards.

Shards hold documents; training sees one flat token stream per shard and cuts
windows of `seq_len + 1` tokens (inputs and shifted targets) at sample time, so
one prepared dataset serves any context length. Window `i` of a shard starts
at token `i * seq_len`; windows never straddle two shards.

The sample order is a seeded permutation of all windows, a fresh one per pass
over the data. For optimizer step `s` with global batch `G`, the global
samples are `s*G .. s*G+G-1`; rank `r` of `w` takes every `w`-th of them. The
data position after step `s` is therefore a pure function of `s`: resuming at
a step skips nothing and repeats nothing, whatever happened before.

A model with a segment memory (Transformer-XL) reads the windows in another
order instead, `segment_indices`: each batch row follows one stream of
consecutive windows across steps, still a pure function of the step.

Document-aware packing (`documents=True`) changes nothing of that: the same
windows, plus a segment id per input token (0 for the document the window
starts in, +1 at each later document start, from the shard's row offsets), so
the model can attend within documents only and restart positions at each one.
A window's ids are a pure function of its index too.

Task data (shards with a `loss_mask` column) adds a mask per target: `loss_mask`
gives, for each window, 1 where its target token counts in the loss (a
completion or assistant token) and 0 elsewhere; text data has none (`masked`
is False) and every target counts.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from tokenization.shards import read_document_starts, read_loss_mask, read_tokens


class TokenWindows:
    def __init__(self, shard_paths: list[str | Path], seq_len: int, *, documents: bool = False):
        assert seq_len >= 1, f"seq_len must be >= 1, got {seq_len}"
        self.seq_len = seq_len
        self.buffers = [read_tokens(p) for p in shard_paths]
        self.doc_starts = [read_document_starts(p) for p in shard_paths] if documents else None
        masks = [read_loss_mask(p) for p in shard_paths]
        if any(m is None for m in masks) and any(m is not None for m in masks):
            raise ValueError("TokenWindows: some shards carry a loss mask and some do not (mixed task and text data)")
        self.masks = masks if masks and masks[0] is not None else None
        counts = [max(0, (len(b) - 1) // seq_len) for b in self.buffers]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # window index offsets
        self.num_tokens = int(sum(len(b) for b in self.buffers))

    @property
    def documents(self) -> bool:
        """Whether the windows carry segment ids (document-aware packing)."""
        return self.doc_starts is not None

    @property
    def masked(self) -> bool:
        """Whether the windows carry a loss mask (task data)."""
        return self.masks is not None

    def loss_mask(self, indices: np.ndarray) -> np.ndarray:
        """(len(indices), seq_len) bool: whether each window's targets (tokens 1..seq_len) count in the loss."""
        assert self.masks is not None, "these shards hold no loss mask (text data)"
        out = np.empty((len(indices), self.seq_len), dtype=bool)
        for row, i in enumerate(indices):
            shard, off = self._locate(int(i))
            out[row] = self.masks[shard][off + 1 : off + self.seq_len + 1]
        return out

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _locate(self, i: int) -> tuple[int, int]:
        """(shard, first token) of window i."""
        shard = int(np.searchsorted(self.starts, i, side="right") - 1)
        return shard, (i - int(self.starts[shard])) * self.seq_len

    def window(self, i: int) -> np.ndarray:
        """Tokens [start, start + seq_len + 1) of window i."""
        shard, off = self._locate(i)
        return self.buffers[shard][off : off + self.seq_len + 1]

    def segments(self, indices: np.ndarray) -> np.ndarray:
        """(len(indices), seq_len) int64 segment ids of the windows' inputs (needs `documents=True`)."""
        assert self.doc_starts is not None, "segment ids need TokenWindows(..., documents=True)"
        out = np.empty((len(indices), self.seq_len), dtype=np.int64)
        for row, i in enumerate(indices):
            shard, off = self._locate(int(i))
            out[row] = segment_ids(self.doc_starts[shard], off, self.seq_len)
        return out

    def batch(self, indices: np.ndarray) -> np.ndarray:
        """(len(indices), seq_len + 1) int64 array."""
        return np.stack([self.window(int(i)).astype(np.int64) for i in indices])


def segment_ids(doc_starts: np.ndarray, first: int, length: int) -> np.ndarray:
    """(length,) segment ids of tokens first..first+length-1 of a buffer whose documents start at `doc_starts`:
    the document index of each token, counted from the first token's document."""
    docs = np.searchsorted(doc_starts, np.arange(first, first + length), side="right") - 1
    return (docs - docs[0]).astype(np.int64)


def sample_indices(step: int, *, rank: int, world_size: int, global_batch: int, num_windows: int, seed: int) -> np.ndarray:
    """Window indices rank `rank` trains on at optimizer step `step` (len = global_batch // world_size)."""
    assert num_windows > 0, "dataset has no windows: more tokens or a shorter seq_len are needed"
    assert global_batch % world_size == 0, f"global batch {global_batch} not divisible by world size {world_size}"
    first = step * global_batch
    positions = np.arange(first + rank, first + global_batch, world_size, dtype=np.int64)
    epochs, offsets = np.divmod(positions, num_windows)
    out = np.empty_like(positions)
    for e in np.unique(epochs):
        perm = _permutation(seed, int(e), num_windows)
        sel = epochs == e
        out[sel] = perm[offsets[sel]]
    return out


def stream_length(*, global_batch: int, num_windows: int) -> int:
    """Windows each batch row reads in a row under `segment_indices`: the windows split into one stream per row."""
    assert num_windows >= global_batch, (f"{num_windows} windows cannot give each of {global_batch} batch rows a "
                                         "stream of its own: more tokens or a smaller global batch are needed")
    return num_windows // global_batch


def segment_indices(step: int, *, rank: int, world_size: int, global_batch: int, num_windows: int, seed: int) -> np.ndarray:
    """Transformer-XL's order: row g of every global batch reads its own stream of consecutive windows, one window
    a step, so that a segment memory carries each row's previous window into its next. Each pass over the data
    cuts the streams afresh at a seeded offset: row g reads windows shift + g*K, +1, ... (mod the window count), K =
    `stream_length`, from step pass*K on. Rank `r` takes rows r, r+w, ... as `sample_indices` does; like it, a pure
    function of the step, so resuming repeats and skips nothing."""
    assert global_batch % world_size == 0, f"global batch {global_batch} not divisible by world size {world_size}"
    K = stream_length(global_batch=global_batch, num_windows=num_windows)
    epoch, offset = divmod(step, K)
    shift = int(np.random.default_rng([seed, epoch, 1]).integers(num_windows))
    rows = np.arange(rank, global_batch, world_size, dtype=np.int64)
    return (shift + rows * K + offset) % num_windows


@lru_cache(maxsize=2)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)
