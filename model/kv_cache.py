"""A preallocated key/value cache for autoregressive decoding.

One tensor pair for all layers, sized for the whole generation up front so
decoding never reallocates. Each attention layer writes its new keys/values at
`pos` in place and reads back everything up to `pos + T`; the model advances
`pos` once per forward, after the last layer. It stores `n_kv_head` heads, which
is what makes grouped-query and multi-query attention cheap to decode.

Left-padded batches: the cache also remembers which slots hold padding
(`key_valid`) and how many real tokens each row has seen (`seen`), so positions
start at each row's first real token and padding is never attended. Both stay
`None` while no row has padding, and the model then takes its mask-free path.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, *, n_layer: int, batch_size: int, n_head: int, head_dim: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        """n_head: the number of key/value heads stored (a model's `n_kv_head`)."""
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0
        self.key_valid: torch.Tensor | None = None  # (B, max_len) bool, once some row has padding
        self.seen: torch.Tensor | None = None  # (B,) real tokens per row so far, once some row has padding
        # other per-row tensors (batch first) that follow the rows when they are dropped or reordered: an
        # encoder-decoder's cross-attention keys and values and its source mask (`model.seq2seq`)
        self.batch_state: dict[str, torch.Tensor] = {}

    @classmethod
    def for_model(cls, model: torch.nn.Module, *, batch_size: int, max_len: int) -> KVCache:
        cfg, p = model.config, next(model.parameters())
        return cls(n_layer=cfg.n_layer, batch_size=batch_size, n_head=cfg.n_kv_head, head_dim=cfg.head_dim,
                   max_len=max_len, device=p.device, dtype=p.dtype)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v: (B, n_kv_head, T, head_dim) at pos; return all keys/values so far."""
        T = k.shape[2]
        end = self.pos + T
        assert end <= self.max_len, f"KV cache of {self.max_len} positions cannot hold {end}"
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def positions(self, T: int, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions (B|1, T) of the next T tokens and the key validity (B, pos + T) or None.

        attention_mask: (B, T), 1 for real tokens and 0 for padding, or None (all real)."""
        device = self.k.device
        if attention_mask is not None and self.key_valid is None and not bool(attention_mask.all()):
            B = self.k.shape[1]
            self.key_valid = torch.ones(B, self.max_len, dtype=torch.bool, device=device)
            self.seen = torch.full((B,), self.pos, dtype=torch.long, device=device)
        if self.key_valid is None:
            return torch.arange(self.pos, self.pos + T, device=device)[None], None
        end = self.pos + T
        if attention_mask is None:
            positions = self.seen[:, None] + torch.arange(T, device=device)  # (B, T)
            self.seen += T
        else:
            real = attention_mask.to(device=device, dtype=torch.long)
            positions = (self.seen[:, None] + real.cumsum(1) - 1).clamp(min=0)  # (B, T)
            self.key_valid[:, self.pos : end] = real.bool()
            self.seen += real.sum(1)
        return positions, self.key_valid[:, :end]

    def advance(self, T: int) -> None:
        self.pos += T

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep the rows `rows` (B,) of the batch, in that order (beam search)."""
        self.k = self.k.index_select(1, rows)
        self.v = self.v.index_select(1, rows)
        if self.key_valid is not None:
            self.key_valid, self.seen = self.key_valid.index_select(0, rows), self.seen.index_select(0, rows)
        self.batch_state = {name: t.index_select(0, rows) for name, t in self.batch_state.items()}
