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
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from tokenization.shards import read_tokens


class TokenWindows:
    def __init__(self, shard_paths: list[str | Path], seq_len: int):
        assert seq_len >= 1, f"seq_len must be >= 1, got {seq_len}"
        self.seq_len = seq_len
        self.buffers = [read_tokens(p) for p in shard_paths]
        counts = [max(0, (len(b) - 1) // seq_len) for b in self.buffers]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # window index offsets
        self.num_tokens = int(sum(len(b) for b in self.buffers))

    def __len__(self) -> int:
        return int(self.starts[-1])

    def window(self, i: int) -> np.ndarray:
        """Tokens [start, start + seq_len + 1) of window i."""
        shard = int(np.searchsorted(self.starts, i, side="right") - 1)
        off = (i - int(self.starts[shard])) * self.seq_len
        return self.buffers[shard][off : off + self.seq_len + 1]

    def batch(self, indices: np.ndarray) -> np.ndarray:
        """(len(indices), seq_len + 1) int64 array."""
        return np.stack([self.window(int(i)).astype(np.int64) for i in indices])


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


@lru_cache(maxsize=2)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)
