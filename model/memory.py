"""Transformer-XL's segment memory: what each layer read over the last positions of the previous segments.

A model with `memory_len > 0` reads a long stream one segment at a time. Each
layer's attention sees its own segment and the hidden states the same layer
read over the previous `memory_len` positions (Dai et al., 2019, section 3.2):
its keys and values are computed from `[memory ; segment]`, its queries from the
segment alone, and the memory is detached, so gradients stay within a segment
while the receptive field grows by `memory_len` per layer. After a forward pass
the memory keeps the last `memory_len` of those states.

The memory holds hidden states (each block's input), not keys and values: the
keys are recomputed with the current weights every step, as in the paper, so
the projections learn from the memory's positions too. (Decoding needs no such
memory: its KV cache holds every key already, see `model.generation`.)

`state_dict` / `load_state_dict` give plain tensors, so a training checkpoint
can save each batch row's memory and a resumed run continue with it exactly.
"""

from __future__ import annotations

import torch


class SegmentMemory:
    def __init__(self, length: int):
        assert length >= 1, f"a segment memory needs length >= 1, got {length}"
        self.length = length
        self.states: tuple[torch.Tensor, ...] | None = None  # per layer (B, M, C), M <= length; None: empty

    def __len__(self) -> int:
        """Positions held now (0 before the first segment)."""
        return 0 if self.states is None else int(self.states[0].shape[1])

    def read(self) -> tuple[torch.Tensor, ...] | None:
        """The states for this forward pass: a snapshot, so a block recomputed in the backward pass (activation
        checkpointing) reads what it read in the forward pass even after `update`."""
        return self.states

    def update(self, block_inputs: list[torch.Tensor]) -> None:
        """After a forward pass: keep the last `length` positions of [memory ; segment] per layer, detached."""
        old = self.states
        self.states = tuple((x if old is None else torch.cat([old[i], x], dim=1))[:, -self.length:].detach()
                            for i, x in enumerate(block_inputs))

    def clear(self) -> None:
        self.states = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.states is None else {f"layer{i}": s.contiguous() for i, s in enumerate(self.states)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.states = tuple(tensors[f"layer{i}"] for i in range(len(tensors))) if tensors else None
