"""The transformer of "Attention Is All You Need": decoder-only (GPT-2, LLaMA, Transformer-XL) or encoder-only (BERT, RoBERTa).

One set of layers serves both families (`ModelConfig.family`); they differ in the
attention mask (causal or bidirectional) and the head. Architecture choices
(all in `ModelConfig`, defaults = GPT-2 style):
- token embedding + positional encoding: `learned` (a table of `max_seq_len`
  rows, GPT-2), `sinusoidal` (Vaswani et al.), `rope` (rotary, rotate-half as in
  LLaMA; optional linear / NTK-aware / YaRN scaling, changeable at evaluation
  time with `set_rope_scaling`), `alibi` (per-head linear distance penalties,
  Press et al.), `xl` (Transformer-XL's relative encoding: sinusoids of each distance
  projected per layer, plus learned content and position biases u and v, its
  scores passed to SDPA as an additive mask) or `none` (the causal mask alone
  carries order); all but `learned` are defined at any position, so the model can
  be evaluated past its context;
- a segment memory (`memory_len`, Transformer-XL): each layer's keys and values also
  come from the states it read over the previous segment's last positions
  (`model.memory`), so a long stream read segment by segment sees past each one;
- pre-norm blocks: `x = x + attn(norm(x)); x = x + mlp(norm(x))` and a final norm, or post-norm
  blocks (the original paper, BERT): `x = norm(x + attn(x)); x = norm(x + mlp(x))` after a norm
  over the embeddings; LayerNorm or RMSNorm;
- decoder: causal self-attention through `scaled_dot_product_attention` (flash /
  memory-efficient kernels on GPU) with `n_kv_head` key/value heads (multi-head,
  grouped-query or multi-query), an optional KV cache, and left padding;
  packed windows of several documents (`segment_ids`) attend block-diagonally,
  positions restarting at each document (`model.segments`; FlexAttention on GPU);
  encoder: every position attends to every real token (padding masked out), no KV cache;
- MLP: GELU (exact or tanh), ReLU, SwiGLU or GEGLU; optional biases; dropout;
- unembedding tied to the token embedding or a separate matrix; the encoder's masked-LM head puts a
  dense layer, its activation and a norm before it and a bias after it (BERT's); softmax inside the
  cross-entropy for training (targets of -1, e.g. unmasked positions, are ignored), in the sampler
  for decoding;
- all initialisation in `init_weights`; optional activation checkpointing per block.

Pure PyTorch: no Ray, DeepSpeed or MLflow here. Distribution is applied from outside.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model.config import GATED_MLPS, ModelConfig, flops_per_token
from model.initialisation import init_gpt2_style
from model.kv_cache import KVCache
from model.layers import (
    Rotary,
    alibi_slopes,
    apply_rotary,
    bidirectional_mask,
    causal_mask,
    make_norm,
    relative_sinusoids,
    sinusoidal_positions,
)
from model.memory import SegmentMemory
from model.segments import (
    alibi_score_mod,
    flex_attend,
    flex_available,
    flex_block_mask,
    segment_mask,
    segment_positions,
)

# SDPA broadcasts key/value heads itself from torch 2.5 on (without copying them n_head / n_kv_head times).
_SDPA_HAS_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)


@dataclass
class AttentionInputs:
    """What every layer's attention needs in one forward pass, computed once for all layers."""
    mask: torch.Tensor | None  # bool (B|1, 1, T, S) or additive (B|1, n_head, T, S)
    is_causal: bool
    rope: tuple[torch.Tensor, torch.Tensor] | None  # cos, sin of the keys this pass computes: (B|1, 1, M + T, head_dim)
    kv_cache: KVCache | None
    flex: tuple[Any, Any] | None = None  # FlexAttention (block mask, score_mod) in place of the SDPA mask
    memory: tuple[torch.Tensor, ...] | None = None  # per layer (B, M, C): the segment memory's states (`model.memory`)
    rel: tuple[torch.Tensor, torch.Tensor] | None = None  # xl: distance sinusoids (R, C), each score's row in them (T|B,1,T, S)


class SelfAttention(nn.Module):
    """Multi-head self-attention; causal or bidirectional as the mask in `AttentionInputs` says."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.n_kv_head, self.head_dim = layer, cfg.n_head, cfg.n_kv_head, cfg.head_dim
        # One matmul for q, k and v: rows [q heads | k heads | v heads].
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.scale = None if cfg.scale_attention else 1.0  # None: SDPA's 1 / sqrt(head_dim)
        if cfg.pos_encoding == "xl":  # Transformer-XL: keys of the distances, and the biases u (content), v (position)
            self.pos_key = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
            self.content_bias = nn.Parameter(torch.zeros(cfg.n_head, cfg.head_dim))
            self.position_bias = nn.Parameter(torch.zeros(cfg.n_head, cfg.head_dim))
        else:
            self.pos_key = None

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, memory: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, C); memory: (B, M, C) states this layer read over the previous segment's last M positions,
        which give keys and values only (the queries are the segment's). context: (B, T', C) the states keys and
        values come from instead of x (XLNet's query stream attends to the content stream)."""
        B, T, C = x.shape
        hd, kv = self.head_dim, self.n_kv_head
        # keys and values from [memory ; segment] (or the content stream), queries from the segment alone; always
        # through the module (ZeRO-3 gathers its weight in the module's forward, LoRA wraps it), at the price of
        # the memory's unused queries
        source = x if context is None else context
        h = source if memory is None else torch.cat([memory, source], dim=1)  # (B, M + T, C)
        S, nq = h.shape[1], self.n_head * hd
        q, k, v = self.qkv(h).split([nq, kv * hd, kv * hd], dim=2)
        q = q[:, S - T:] if context is None else self.qkv(x)[..., :nq]  # (B, T, n_head * head_dim)
        q = q.reshape(B, T, self.n_head, hd).transpose(1, 2)  # (B, n_head, T, head_dim)  (reshape: q may be a slice)
        k = k.view(B, S, kv, hd).transpose(1, 2)  # (B, n_kv_head, M + T, head_dim)
        v = v.view(B, S, kv, hd).transpose(1, 2)  # (B, n_kv_head, M + T, head_dim)
        if inputs.rope is not None:  # the keys' positions; the queries are the last T of them
            assert context is None, "rotary positions for a query stream of its own are not defined here"
            cos, sin = inputs.rope
            q, k = apply_rotary(q, cos[..., S - T:, :], sin[..., S - T:, :]), apply_rotary(k, cos, sin)
        if inputs.kv_cache is not None:
            k, v = inputs.kv_cache.update(self.layer, k, v)  # (B, n_kv_head, S, head_dim)
        if self.pos_key is not None:
            return self._relative(q, k, v, inputs)
        if inputs.flex is not None:  # packed documents on GPU: one fused kernel skips the masked-out blocks
            y = flex_attend(q, k, v, block_mask=inputs.flex[0], score_mod=inputs.flex[1], compiled=q.is_cuda)
            return F.dropout(self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * hd)), self.dropout, self.training)
        return self._attend(q, k, v, inputs.mask, inputs.is_causal)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                is_causal: bool) -> torch.Tensor:
        B, _, T, hd = q.shape
        gqa = {}
        if self.n_kv_head != self.n_head:  # each group of n_head / n_kv_head query heads shares one key/value head
            if _SDPA_HAS_GQA:
                gqa = {"enable_gqa": True}
            else:
                k, v = (t.repeat_interleave(self.n_head // self.n_kv_head, dim=1) for t in (k, v))  # (B, n_head, S, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale,
                                           dropout_p=self.dropout if self.training else 0.0, **gqa)  # (B, n_head, T, head_dim)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * hd)  # (B, T, n_head * head_dim)
        return F.dropout(self.proj(y), self.dropout, self.training)

    def _relative(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        """Transformer-XL's scores (q + u) . k + (q + v) . W_r R_(i-j): the second term, computed once per distance
        and gathered per (query, key), goes to SDPA as an additive mask (SDPA scales only the first term, so
        it is scaled here)."""
        B, H, T, hd = q.shape
        S = k.shape[2]
        sinusoids, distance = inputs.rel  # (R, C), (T, S)
        keys = self.pos_key(sinusoids).view(-1, H, hd)  # (R, n_head, head_dim)
        by_distance = torch.einsum("bhtd,rhd->bhtr", q + self.position_bias[:, None, :], keys)  # (B, n_head, T, R)
        scores = by_distance.gather(-1, distance.expand(B, H, T, S))  # (B, n_head, T, S); distance (T|B,1,T, S)
        scores = scores * (self.scale if self.scale is not None else hd ** -0.5)
        if inputs.mask is not None:  # bool: where a query may attend (xl takes no ALiBi, so never additive)
            scores = scores.masked_fill(~inputs.mask, float("-inf"))
        return self._attend(q + self.content_bias[:, None, :], k, v, scores, False)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        # SwiGLU's gate and up projections share one matmul: rows [gate | up].
        self.fc = nn.Linear(cfg.d_model, (2 if cfg.mlp in GATED_MLPS else 1) * cfg.d_ff, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.kind in GATED_MLPS:
            gate, up = h.chunk(2, dim=-1)
            h = (F.silu(gate) if self.kind == "swiglu" else F.gelu(gate, approximate="tanh")) * up
        elif self.kind == "relu":
            h = F.relu(h)
        else:
            h = F.gelu(h, approximate="tanh" if self.kind == "gelu_tanh" else "none")
        return F.dropout(self.proj(h), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.post_norm = cfg.norm_position == "post"
        self.ln_1 = make_norm(cfg)
        self.attn = SelfAttention(cfg, layer)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        memory = inputs.memory[self.attn.layer] if inputs.memory is not None else None  # this block's earlier inputs
        if self.post_norm:  # the residual stream itself is normalised after each sub-layer
            x = self.ln_1(x + self.attn(x, inputs, memory))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x), inputs, None if memory is None else self.ln_1(memory))
        x = x + self.mlp(self.ln_2(x))
        return x


class MaskedLMHead(nn.Module):
    """BERT's prediction head before the unembedding: dense d -> d, the MLP's activation (GELU for SwiGLU), a norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.approximate = "tanh" if cfg.mlp == "gelu_tanh" else "none"
        self.norm = make_norm(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(x), approximate=self.approximate))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos_encoding == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        # post-norm normalises the embeddings (BERT) and ends on a block's norm; pre-norm ends on a final norm
        self.ln_emb = make_norm(cfg) if cfg.norm_position == "post" else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = make_norm(cfg) if cfg.norm_position == "pre" else None
        self.mlm_head = MaskedLMHead(cfg) if cfg.family == "encoder" else None
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.bias and cfg.family == "encoder")
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.rotary = Rotary(cfg) if cfg.pos_encoding == "rope" else None
        self.slopes = alibi_slopes(cfg.n_head) if cfg.pos_encoding == "alibi" else None
        # Packed windows: FlexAttention on CUDA ("auto"), or always the SDPA mask / always FlexAttention (tests).
        self.segment_attention: Literal["auto", "sdpa", "flex"] = "auto"
        self.init_weights()

    def init_weights(self) -> None:
        """All initialisation in one place: `init_gpt2_style`."""
        init_gpt2_style(self, self.config)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (see `model.config.flops_per_token`)."""
        return flops_per_token(self.config, seq_len=seq_len)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                *, attention_mask: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                memory: SegmentMemory | None = None) -> torch.Tensor:
        """idx: (B, T) token ids. Returns the mean cross-entropy (targets of -1 are ignored)
        if targets are given, else logits (B, T, vocab). attention_mask: (B, T), 0 at padding.
        segment_ids: (B, T), one id per document of a packed window (see `model.segments`).
        memory: a segment memory (`new_memory()`) that this segment reads and then advances.
        A decoder's targets are the next tokens; an encoder's, the original tokens at masked positions."""
        logits = self.unembed(self.hidden_states(idx, kv_cache=kv_cache, attention_mask=attention_mask,
                                                 segment_ids=segment_ids, memory=memory))  # (B, T, vocab)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., C) -> logits (..., vocab): the encoder's masked-LM head, then the unembedding."""
        return self.lm_head(self.mlm_head(h) if self.mlm_head is not None else h)

    def new_memory(self) -> SegmentMemory:
        """An empty segment memory of this model's `memory_len` positions, for `forward(..., memory=)`."""
        assert self.config.memory_len > 0, "this model has no segment memory (memory_len 0)"
        return SegmentMemory(self.config.memory_len)

    def hidden_states(self, idx: torch.Tensor, *, kv_cache: KVCache | None = None,
                      attention_mask: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                      memory: SegmentMemory | None = None) -> torch.Tensor:
        """The last layer's output (B, T, C), normalised, before the unembedding (decoding unembeds only the
        last position). For an encoder, attention_mask may mark padding anywhere (0), not only on the left."""
        B, T = idx.shape
        assert segment_ids is None or (kv_cache is None and attention_mask is None), \
            "segment_ids (packed documents) go without a KV cache or padding"
        assert self.config.causal or (kv_cache is None and segment_ids is None), \
            "an encoder attends both ways: no KV cache, no packed documents"
        assert memory is None or (kv_cache is None and attention_mask is None and segment_ids is None
                                  and self.config.memory_len > 0), \
            "a segment memory reads whole segments of a model with memory_len > 0: no KV cache, padding or packing"
        remembered = memory.read() if memory is not None else None
        start = kv_cache.pos if kv_cache is not None else len(memory) if memory is not None else 0
        if memory is not None:  # the segment continues the memory's positions
            positions, key_valid = torch.arange(start, start + T, device=idx.device)[None], None
        elif segment_ids is not None:
            segment_ids = segment_ids.to(idx.device)
            positions, key_valid = segment_positions(segment_ids), None  # (B, T)
        else:
            positions, key_valid = self._positions(T, kv_cache, attention_mask, idx.device)  # (B|1, T), (B, S) | None
        x = self._embed(idx, positions, last=start + T - 1 if key_valid is None else int(positions.max()))
        if self.slopes is not None and self.slopes.device != idx.device:
            self.slopes = self.slopes.to(idx.device)
        rope = None
        if self.rotary is not None:  # the keys computed in this pass: a memory's positions, then the segment's
            rope = self.rotary.cos_sin(torch.arange(start + T, device=idx.device)[None] if memory is not None
                                       else positions, x.dtype)
        inputs = self._attention_inputs(T=T, start=start, key_valid=key_valid, rope=rope, segment_ids=segment_ids,
                                        kv_cache=kv_cache, remembered=remembered, dtype=x.dtype)
        recompute = self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
        block_inputs = []
        for block in self.blocks:
            block_inputs.append(x)
            x = checkpoint(block, x, inputs, use_reentrant=False) if recompute else block(x, inputs)
        if kv_cache is not None:
            kv_cache.advance(T)
        if memory is not None:
            memory.update(block_inputs)
        return self.ln_f(x) if self.ln_f is not None else x

    def _embed(self, idx: torch.Tensor, positions: torch.Tensor, *, last: int) -> torch.Tensor:
        """Token embeddings plus an absolute positional encoding where there is one (B, T, C); `last`: the largest
        position (left-padded rows count from their first real token, so a row's may be below the last slot)."""
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            assert last < self.config.max_seq_len, f"position {last} is beyond the learned table of {self.config.max_seq_len}"
            x = x + self.pos_emb(positions)  # (B|1, T, C)
        elif self.config.pos_encoding == "sinusoidal":
            x = x + sinusoidal_positions(positions, self.config.d_model).to(x.dtype)  # (B|1, T, C)
        if self.ln_emb is not None:
            x = self.ln_emb(x)
        return self.drop(x)

    def _attention_inputs(self, *, T: int, start: int, key_valid: torch.Tensor | None,
                          rope: tuple[torch.Tensor, torch.Tensor] | None, segment_ids: torch.Tensor | None,
                          kv_cache: KVCache | None, remembered: tuple[torch.Tensor, ...] | None,
                          dtype: torch.dtype) -> AttentionInputs:
        """What every layer's attention needs, for queries at slots start..start+T-1: packed documents' block
        mask, an encoder's two-way mask or a decoder's causal one (over a KV cache or a memory), and
        Transformer-XL's distances."""
        device = self.tok_emb.weight.device
        if segment_ids is not None:
            inputs = self._segment_inputs(segment_ids, rope=rope, dtype=dtype)
        elif not self.config.causal:
            mask = bidirectional_mask(T=T, key_valid=key_valid, slopes=self.slopes, device=device, dtype=dtype)
            inputs = AttentionInputs(mask=mask, is_causal=False, rope=rope, kv_cache=None)
        else:
            mask, is_causal = causal_mask(start=start, T=T, key_valid=key_valid, slopes=self.slopes, device=device,
                                          dtype=dtype)
            inputs = AttentionInputs(mask=mask, is_causal=is_causal, rope=rope, kv_cache=kv_cache, memory=remembered)
        if self.config.pos_encoding == "xl":
            inputs = self._relative_inputs(inputs, start=start, T=T, dtype=dtype)
        return inputs

    def _relative_inputs(self, inputs: AttentionInputs, *, start: int, T: int, dtype: torch.dtype) -> AttentionInputs:
        """Transformer-XL's inputs for queries at slots start..start+T-1 over keys 0..start+T-1: the sinusoids of
        every distance 0..start+T-1 (one set for all layers, which project them each) and each score's distance
        (later keys are masked; distances between slots equal those between positions for real tokens). The
        mask is made explicit, since the scores go to SDPA as an additive mask."""
        device = self.tok_emb.weight.device
        S = start + T
        distance = torch.arange(start, S, device=device)[:, None] - torch.arange(S, device=device)[None, :]  # (T, S)
        mask = inputs.mask
        if mask is None and inputs.is_causal:
            mask = (distance >= 0)[None, None]  # (1, 1, T, S)
        return replace(inputs, mask=mask, is_causal=False,
                       rel=(relative_sinusoids(torch.arange(S, device=device), self.config.d_model).to(dtype),
                            distance.clamp(min=0)))

    def _segment_inputs(self, segment_ids: torch.Tensor, *, rope: tuple[torch.Tensor, torch.Tensor] | None,
                        dtype: torch.dtype) -> AttentionInputs:
        """Block-diagonal causal attention: FlexAttention where it runs (CUDA, no attention dropout), else SDPA's mask."""
        dropping = self.training and self.config.dropout > 0
        use_flex = self.config.pos_encoding != "xl" and (self.segment_attention == "flex" or (  # xl: its own scores
            self.segment_attention == "auto" and flex_available(segment_ids.device) and not dropping))
        if use_flex:
            assert not dropping, "FlexAttention has no attention dropout; use segment_attention='sdpa'"
            score_mod = alibi_score_mod(self.slopes) if self.slopes is not None else None
            return AttentionInputs(mask=None, is_causal=False, rope=rope, kv_cache=None,
                                   flex=(flex_block_mask(segment_ids), score_mod))
        return AttentionInputs(mask=segment_mask(segment_ids, slopes=self.slopes, dtype=dtype), is_causal=False,
                               rope=rope, kv_cache=None)

    @staticmethod
    def _positions(T: int, kv_cache: KVCache | None, attention_mask: torch.Tensor | None,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        if kv_cache is not None:
            return kv_cache.positions(T, attention_mask)
        if attention_mask is None:
            return torch.arange(T, device=device)[None], None
        real = attention_mask.to(device=device, dtype=torch.long)
        return (real.cumsum(1) - 1).clamp(min=0), real.bool()  # each row counts from its first real token

    def supports_length(self, T: int) -> bool:
        """Whether the model can score windows of T tokens (learned tables cannot extrapolate)."""
        return self.pos_emb is None or T <= self.config.max_seq_len

    def set_rope_scaling(self, kind: str, factor: float = 1.0, *, original_max_seq_len: int | None = None) -> None:
        """Switch RoPE scaling (`none`, `linear`, `ntk`, `yarn`) in place, e.g. to evaluate past the training
        context. No weights change; `self.config` is replaced (not mutated) and records the new scaling."""
        assert self.rotary is not None, f"rope scaling needs pos_encoding='rope', not {self.config.pos_encoding!r}"
        self.config = replace(self.config, rope_scaling=kind, rope_factor=factor,
                              rope_original_max_seq_len=original_max_seq_len)
        self.rotary = Rotary(self.config)
