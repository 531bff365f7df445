"""A preallocated key/value cache for autoregressive decoding.

One tensor pair for all layers, sized for the whole generation up front so
decoding never reallocates. Each attention layer writes its new keys/values at
`pos` and reads back everything up to `pos + T`; the model advances `pos` once
per forward, after the last layer.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, *, n_layer: int, batch_size: int, n_head: int, head_dim: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v: (B, n_head, T, head_dim) at pos; return all keys/values so far."""
        T = k.shape[2]
        end = self.pos + T
        assert end <= self.max_len, f"KV cache of {self.max_len} positions cannot hold {end}"
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, T: int) -> None:
        self.pos += T

    def reset(self) -> None:
        self.pos = 0
