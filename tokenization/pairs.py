"""Source/target pairs for supervised seq2seq training (an encoder-decoder on prompt/completion records).

`prepare` stores a prompt/completion record as one document: the prompt's
tokens (loss mask 0), then the completion's and the EOS (loss mask 1); see
`tokenization.taskdata`. Here each document becomes one pair: the source is the
masked-out part followed by EOS (as T5 ends every input), the target the
masked-in part, so the two token columns an encoder-decoder needs come from the
shards `prepare` already writes, memory-mapped. A source longer than
`max_source` keeps its first tokens (then EOS); a target longer than
`max_target` its first. Training draws pair indices exactly as it draws windows
(`tokenization.dataset.sample_indices`: a pure function of the step), and a
batch is padded on the right: the source with a mask, the target with -1
(ignored by the loss).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tokenization.shards import read_document_starts, read_loss_mask, read_tokens


class TaskPairs:
    def __init__(self, shard_paths: list[str | Path], *, max_source: int, max_target: int, eos_id: int, start_id: int):
        assert max_source >= 2 and max_target >= 1, f"max_source {max_source} / max_target {max_target} too small"
        self.eos_id, self.start_id = eos_id, start_id
        self.sources: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        for path in shard_paths:
            tokens, starts, mask = read_tokens(path), read_document_starts(path), read_loss_mask(path)
            if mask is None:
                raise ValueError(f"{path}: a text shard has no loss mask: seq2seq training needs prompt/completion records "
                                 "(data.format: prompt_completion)")
            for a, b in zip(starts[:-1], starts[1:]):
                doc, learn = tokens[a:b].astype(np.int64), mask[a:b].astype(bool)
                if not learn.any():
                    continue  # a record without a completion teaches nothing
                src = doc[~learn][: max_source - 1]
                self.sources.append(np.append(src, eos_id))
                self.targets.append(doc[learn][:max_target])
        self.num_tokens = int(sum(len(s) for s in self.sources))

    def __len__(self) -> int:
        return len(self.sources)

    def batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(source (B, S), source mask (B, S), decoder input (B, T), target (B, T)), right-padded: padding is
        token 0 in the inputs, mask 0 in the source mask and -1 in the target."""
        srcs, tgts = [self.sources[int(i)] for i in indices], [self.targets[int(i)] for i in indices]
        S, T = max(len(s) for s in srcs), max(len(t) for t in tgts)
        src, src_mask = np.zeros((len(srcs), S), np.int64), np.zeros((len(srcs), S), np.int64)
        tgt_in, tgt = np.zeros((len(srcs), T), np.int64), np.full((len(srcs), T), -1, np.int64)
        for row, (s, t) in enumerate(zip(srcs, tgts)):
            src[row, : len(s)], src_mask[row, : len(s)] = s, 1
            tgt[row, : len(t)] = t
            tgt_in[row, : len(t)] = np.concatenate([[self.start_id], t[:-1]])
        return src, src_mask, tgt_in, tgt
