"""A decoder-only transformer ("Attention Is All You Need", as in GPT).

Architecture choices:
- token embedding + positional encoding: `learned` (a table of `max_seq_len`
  rows, GPT-2) or `sinusoidal` (the fixed sin/cos of Vaswani et al., defined at
  any position, so the model can be *evaluated* past its training context);
- pre-LayerNorm blocks: `x = x + attn(ln(x)); x = x + mlp(ln(x))`;
- causal multi-head self-attention through `scaled_dot_product_attention`
  (flash / memory-efficient kernels on GPU), with an optional KV cache;
- GELU MLP; a final LayerNorm; unembedding tied to the token embedding, then
  softmax (inside the cross-entropy for training, in the sampler for decoding).

Pure PyTorch: no Ray, DeepSpeed or MLflow here. Distribution is applied from outside.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.kv_cache import KVCache


@dataclass
class ModelConfig:
    vocab_size: int
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_ff: int | None = None  # default 4 * d_model
    max_seq_len: int = 256
    pos_encoding: Literal["learned", "sinusoidal"] = "learned"
    dropout: float = 0.0
    bias: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        assert self.d_model % self.n_head == 0, f"d_model {self.d_model} not divisible by n_head {self.n_head}"
        assert self.pos_encoding in ("learned", "sinusoidal"), f"unknown pos_encoding {self.pos_encoding}"
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)


def sinusoidal_positions(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(...). positions: (T,) -> (T, dim)."""
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angles = positions.float()[:, None] * freq[None, :]  # (T, half)
    pe = torch.zeros(positions.shape[0], dim, device=positions.device)
    pe[:, 0 : 2 * half : 2] = torch.sin(angles)
    pe[:, 1 : 2 * half : 2] = torch.cos(angles)
    return pe


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.head_dim = layer, cfg.n_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        mask, causal = None, True
        if kv_cache is not None:
            start = kv_cache.pos
            k, v = kv_cache.update(self.layer, k, v)  # (B, n_head, start + T, head_dim)
            if start > 0:
                # Query i sits at absolute position start + i and may see keys 0..start+i.
                # (is_causal would align the mask to the top-left corner, which is wrong here.)
                causal = False
                if T > 1:
                    S = k.shape[2]
                    mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=start)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return F.dropout(self.proj(y), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.proj(F.gelu(self.fc(x))), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos_encoding == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied unembedding
        self.init_weights()

    def init_weights(self) -> None:
        """All initialisation in one place: N(0, std), zero biases, and residual
        output projections scaled by 1/sqrt(2 * n_layer) (GPT-2) so the residual
        stream's variance does not grow with depth."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                scale = 1.0 / math.sqrt(2 * self.config.n_layer) if name.endswith("proj.weight") else 1.0
                nn.init.normal_(p, mean=0.0, std=std * scale)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:  # LayerNorm weights
                nn.init.ones_(p)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None) -> torch.Tensor:
        """idx: (B, T) token ids. Returns the mean cross-entropy if targets are given, else logits (B, T, vocab)."""
        B, T = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        x = self.tok_emb(idx)  # (B, T, C)
        x = x + self.position_embedding(start, T, idx.device)  # (T, C) broadcast over B
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def position_embedding(self, start: int, T: int, device: torch.device) -> torch.Tensor:
        positions = torch.arange(start, start + T, device=device)
        if self.pos_emb is not None:
            assert start + T <= self.config.max_seq_len, (
                f"position {start + T - 1} is beyond the learned table of {self.config.max_seq_len}")
            return self.pos_emb(positions)
        return sinusoidal_positions(positions, self.config.d_model).to(self.tok_emb.weight.dtype)

    def supports_length(self, T: int) -> bool:
        """Whether the model can score windows of T tokens (learned tables cannot extrapolate)."""
        return self.pos_emb is None or T <= self.config.max_seq_len
