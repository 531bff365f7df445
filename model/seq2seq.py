"""The encoder–decoder transformer of "Attention Is All You Need", as T5 builds it.

A composition of the shared layers (`model.gpt`'s self-attention, MLP and block;
`model.layers`' norms) with one more sub-layer: the decoder's blocks attend to the
encoder's output (cross-attention) between their self-attention and their MLP.
- The encoder reads the source bidirectionally (padding masked out); the decoder
  reads the target causally, shifted right behind a start token. Pre-norm stacks
  end on a norm each (T5); post-norm ones normalise their embeddings instead.
- Positions are T5's relative position bias (`pos_encoding: t5`): each distance
  key - query falls into one of `rel_buckets` buckets, exact for short distances
  and logarithmic up to `rel_max_distance`; the encoder's buckets tell the two
  directions apart, the decoder's look back only. Each stack has one table of a
  bias per (bucket, head), computed once per forward pass and shared by all of
  its layers, added to the attention scores (which T5 does not scale).
- The unembedding is tied to the shared token embedding by default; T5 then
  scales the decoder's output by d_model^-0.5 before it, as here.

Decoding runs the encoder once per request: `conditioned(model, src)` is a
decoder-only view of the model bound to that encoding, which `model.generation`'s
`generate_batch` and `beam_search` drive unchanged. Its cross-attention keys and
values are computed once, on the first step, and kept in the KV cache's per-row
state, so that dropping finished rows or reordering beams carries them along;
the self-attention keys and values are cached as for any decoder.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig
from model.generation import right_pad
from model.gpt import MLP, AttentionInputs, Block, SelfAttention
from model.kv_cache import KVCache
from model.layers import make_norm


def relative_buckets(relative: torch.Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucket of each relative position (key - query), as in the T5 paper and Mesh TensorFlow: half the
    buckets are exact distances, the other half logarithmically wider ones up to max_distance (farther ones
    share the last); a bidirectional stack gives keys after the query a second set of buckets, a causal one
    sees only keys at or before it."""
    out = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        out += (relative > 0).long() * num_buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    exact = num_buckets // 2
    log_part = exact + (torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                        * (num_buckets - exact)).long()
    return out + torch.where(distance < exact, distance, log_part.clamp(max=num_buckets - 1))


class RelativeBias(nn.Module):
    """One stack's learned bias per (bucket, head): (1, n_head, T, S) for queries at q_pos over keys at k_pos."""

    def __init__(self, cfg: ModelConfig, *, bidirectional: bool):
        super().__init__()
        self.bidirectional, self.buckets, self.max_distance = bidirectional, cfg.rel_buckets, cfg.rel_max_distance
        self.table = nn.Embedding(cfg.rel_buckets, cfg.n_head)

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        buckets = relative_buckets(k_pos[None, :] - q_pos[:, None], bidirectional=self.bidirectional,
                                   num_buckets=self.buckets, max_distance=self.max_distance)  # (T, S)
        return self.table(buckets).permute(2, 0, 1)[None]  # (1, n_head, T, S)


def _with_mask(bias: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """An additive attention mask: the position bias where attending is allowed, -inf elsewhere."""
    if allowed is None:
        return bias
    return bias.masked_fill(~allowed, float("-inf"))


class CrossAttention(nn.Module):
    """The decoder's attention to the encoder's output: queries from the target, keys and values from the source."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=cfg.bias)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.n_kv_head * cfg.head_dim, bias=cfg.bias)  # rows [k heads | v heads]
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.scale = None if cfg.scale_attention else 1.0

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory: (B, S, C) -> k, v: (B, n_kv_head, S, head_dim), computed once per request when decoding."""
        B, S, _ = memory.shape
        k, v = self.kv(memory).view(B, S, 2, self.n_kv_head, self.head_dim).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        k, v = kv
        if self.n_kv_head != self.n_head:
            k, v = (t.repeat_interleave(self.n_head // self.n_kv_head, dim=1) for t in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, n_head, T, head_dim)
        return F.dropout(self.proj(y.transpose(1, 2).reshape(B, T, -1)), self.dropout, self.training)


class DecoderBlock(nn.Module):
    """Self-attention (causal), cross-attention, MLP; each with a residual and a norm before (pre) or after (post)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.post_norm = cfg.norm_position == "post"
        self.ln_1, self.attn = make_norm(cfg), SelfAttention(cfg, layer)
        self.ln_cross, self.cross = make_norm(cfg), CrossAttention(cfg)
        self.ln_2, self.mlp = make_norm(cfg), MLP(cfg)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, cross_kv: tuple[torch.Tensor, torch.Tensor],
                cross_mask: torch.Tensor | None) -> torch.Tensor:
        if self.post_norm:
            x = self.ln_1(x + self.attn(x, inputs))
            x = self.ln_cross(x + self.cross(x, cross_kv, cross_mask))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x), inputs)
        x = x + self.cross(self.ln_cross(x), cross_kv, cross_mask)
        return x + self.mlp(self.ln_2(x))


class EncoderDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.family == "encoder-decoder", f"EncoderDecoder needs family 'encoder-decoder', not {cfg.family!r}"
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)  # shared by both stacks (and the unembedding)
        self.drop = nn.Dropout(cfg.dropout)
        self.enc_bias, self.dec_bias = RelativeBias(cfg, bidirectional=True), RelativeBias(cfg, bidirectional=False)
        self.encoder = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.decoder = nn.ModuleList(DecoderBlock(cfg, i) for i in range(cfg.n_decoder_layer))
        pre = cfg.norm_position == "pre"
        self.enc_norm = make_norm(cfg) if pre else None
        self.dec_norm = make_norm(cfg) if pre else None
        # post-norm: each stack normalises its embeddings instead of its output
        self.enc_ln_emb = make_norm(cfg) if not pre else None
        self.dec_ln_emb = make_norm(cfg) if not pre else None
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.init_weights()

    def init_weights(self) -> None:
        """T5's initialisation, which its unscaled attention relies on (`init_std` is not used): the shared
        embedding (and a separate unembedding) N(0, 1); each matrix N(0, fan_in^-0.5), queries N(0, (d_model *
        head_dim)^-0.5) so that unscaled scores start at unit scale; bias tables N(0, d_model^-0.5); zero
        biases, unit norm gains. (A copy task stays at chance for hundreds of steps from GPT-2's N(0, 0.02).)"""
        cfg = self.config
        d, q_rows = cfg.d_model, cfg.n_head * cfg.head_dim
        for name, p in self.named_parameters():
            if name in ("tok_emb.weight", "lm_head.weight"):
                nn.init.normal_(p, std=1.0)
            elif name.endswith("table.weight"):
                nn.init.normal_(p, std=d ** -0.5)
            elif p.dim() >= 2:
                nn.init.normal_(p, std=p.shape[1] ** -0.5)  # fan in: d_model, d_ff or the heads' width
                if name.endswith(("attn.qkv.weight", "cross.q.weight")):  # the query rows come first
                    with torch.no_grad():
                        p[:q_rows].normal_(std=(d * cfg.head_dim) ** -0.5)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _embed(self, idx: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
        x = self.tok_emb(idx)
        return self.drop(norm(x) if norm is not None else x)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """src: (B, S) token ids, src_mask: (B, S), 0 at padding -> the encoder's output (B, S, C)."""
        B, S = src.shape
        pos = torch.arange(S, device=src.device)
        allowed = src_mask.bool()[:, None, None, :] if src_mask is not None else None  # (B, 1, 1, S)
        inputs = AttentionInputs(mask=_with_mask(self.enc_bias(pos, pos), allowed), is_causal=False, rope=None, kv_cache=None)
        x = self._embed(src, self.enc_ln_emb)
        for block in self.encoder:
            x = block(x, inputs)
        return self.enc_norm(x) if self.enc_norm is not None else x

    def cross_keys_values(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every decoder layer's cross-attention keys and values of one encoding."""
        return [block.cross.keys_values(memory) for block in self.decoder]

    def decode(self, tgt: torch.Tensor, cross_kv: list[tuple[torch.Tensor, torch.Tensor]], src_mask: torch.Tensor | None,
               *, kv_cache: KVCache | None = None) -> torch.Tensor:
        """tgt: (B, T) target ids (shifted right) -> the decoder's output (B, T, C), before the unembedding."""
        B, T = tgt.shape
        start = kv_cache.pos if kv_cache is not None else 0
        q_pos = torch.arange(start, start + T, device=tgt.device)
        k_pos = torch.arange(start + T, device=tgt.device)
        causal = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, T, start + T)
        inputs = AttentionInputs(mask=_with_mask(self.dec_bias(q_pos, k_pos), causal), is_causal=False, rope=None,
                                 kv_cache=kv_cache)
        cross_mask = None
        if src_mask is not None:  # padding in the source: no query attends to it (an additive mask like the self one's)
            cross_mask = torch.zeros(src_mask.shape, dtype=cross_kv[0][0].dtype, device=tgt.device)
            cross_mask = cross_mask.masked_fill(~src_mask.bool(), float("-inf"))[:, None, None, :]  # (B, 1, 1, S)
        x = self._embed(tgt, self.dec_ln_emb)
        for block, kv in zip(self.decoder, cross_kv):
            x = block(x, inputs, kv, cross_mask)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.dec_norm(x) if self.dec_norm is not None else x

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        if self.config.tie_embeddings:  # T5: the tied unembedding sees the output scaled by d_model^-0.5
            h = h * self.config.d_model ** -0.5
        return self.lm_head(h)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, targets: torch.Tensor | None = None, *,
                src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """src: (B, S) source ids, tgt: (B, T) decoder inputs (the target shifted right behind a start token).
        Returns the mean cross-entropy over `targets` (B, T) (-1 ignored) if given, else logits (B, T, vocab)."""
        memory = self.encode(src, src_mask)
        logits = self.unembed(self.decode(tgt, self.cross_keys_values(memory), src_mask))  # (B, T, vocab)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def supports_length(self, T: int) -> bool:
        return True  # relative positions: any length


class Conditioned(nn.Module):
    """A decoder-only view of an encoder-decoder bound to one encoding, for `model.generation`'s samplers.

    Its `hidden_states(tgt, kv_cache=, attention_mask=)` decodes `tgt`; on the first call with a cache it puts the
    encoding's cross-attention keys and values (one row per cache row) and the source mask into the cache's per-row
    state, where the samplers' row drops and beam reorders carry them along."""

    def __init__(self, model: EncoderDecoder, memory: torch.Tensor, src_mask: torch.Tensor | None):
        super().__init__()
        self.model, self.memory, self.src_mask = model, memory, src_mask
        self.config = replace(model.config, n_layer=model.config.n_decoder_layer)  # what the KV cache is sized by

    def parameters(self, recurse: bool = True) -> Any:
        return self.model.parameters(recurse)

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.unembed(h)

    def _rows(self, B: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        memory, mask = self.memory, self.src_mask
        if memory.size(0) != B:  # one source for every row (beam search, samples of one prompt)
            assert memory.size(0) == 1, f"an encoding of {memory.size(0)} rows for {B} decoding rows"
            memory, mask = memory.expand(B, -1, -1), mask.expand(B, -1) if mask is not None else None
        return memory, mask

    def hidden_states(self, tgt: torch.Tensor, *, kv_cache: KVCache | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        assert attention_mask is None or bool(attention_mask.all()), "decoder inputs start with one start token: no padding"
        if kv_cache is None:  # the reference path: the cross keys and values again at every step
            memory, mask = self._rows(tgt.size(0))
            return self.model.decode(tgt, self.model.cross_keys_values(memory), mask)
        state = kv_cache.batch_state
        if "cross_k" not in state:
            memory, mask = self._rows(tgt.size(0))
            kv = self.model.cross_keys_values(memory)
            state["cross_k"] = torch.stack([k for k, _ in kv], dim=1)  # (B, layers, n_kv_head, S, head_dim)
            state["cross_v"] = torch.stack([v for _, v in kv], dim=1)
            if mask is not None:
                state["src_mask"] = mask
        cross = [(state["cross_k"][:, i], state["cross_v"][:, i]) for i in range(state["cross_k"].size(1))]
        return self.model.decode(tgt, cross, state.get("src_mask"), kv_cache=kv_cache)


def conditioned(model: EncoderDecoder, src: list[list[int]]) -> Conditioned:
    """The decoder of `model` bound to the encoding of `src` (one source, or one per decoding row; right-padded)."""
    ids, mask = right_pad(src, next(model.parameters()).device)  # (B, S) each
    with torch.inference_mode():
        memory = model.encode(ids, mask)
    return Conditioned(model, memory, None if bool(mask.all()) else mask)
