"""XLNet (Yang et al., 2019): a Transformer-XL stack trained on permutation language modelling, two streams wide.

A composition of the shared layers: `model.gpt`'s self-attention with Transformer-XL's
relative encoding (`pos_encoding: xl`: sinusoids of the distance projected per layer,
the content and position biases u and v), its MLP and norms, and the segment memory
of `model.memory`. What XLNet adds:
- a factorisation order per window, given as `ranks` (B, T): the step of the order at
  which each position is predicted. The content stream h_i attends to the positions
  ordered at or before i (itself included), so it holds i's token as any layer would;
- a query stream g for each predicted position p (`predict` (B, P)): it starts from a
  learned vector (`mask_emb`) at p, attends, with the content stream's weights, to the
  content of the positions ordered strictly before p (never to p's own token), goes
  through the same MLP and norms, and its last layer is unembedded to predict p's token;
- partial prediction: only the last positions of each order are predicted, so each
  has most of the window as context (`tokenization.permutation` draws orders and targets);
- both streams attend over the segment memory too (the content stream's states).
Read in the natural order with a query at each next position (`forward(idx)` without
`ranks`), the model is a left-to-right language model, logits (B, T, vocab) for the
next tokens as a decoder's: the length sweep, the segment memory and generation apply
unchanged (without a KV cache: the query stream is recomputed for each new token).
Attention projections have no biases (XLNet's); the unembedding is tied to the token
embedding and has a bias. Token types (XLNet's two-segment inputs) are not modelled:
exports write their biases as zeros, which is exact for single-segment inputs.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model.config import ModelConfig
from model.gpt import MLP, AttentionInputs, SelfAttention
from model.initialisation import init_gpt2_style
from model.layers import make_norm, relative_sinusoids
from model.memory import SegmentMemory


class TwoStreamBlock(nn.Module):
    """One layer for both streams: attention (the query stream's keys and values are the content stream's) and MLP."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.post_norm = cfg.norm_position == "post"
        self.ln_1 = make_norm(cfg)
        self.attn = SelfAttention(replace(cfg, bias=False), layer)  # XLNet's q, k, v, o have no biases
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def _stream(self, x: torch.Tensor, inputs: AttentionInputs, memory: torch.Tensor | None,
                content: torch.Tensor | None) -> torch.Tensor:
        if self.post_norm:  # XLNet's: a norm after each residual addition
            x = self.ln_1(x + self.attn(x, inputs, memory, context=content))
            return self.ln_2(x + self.mlp(x))
        norm = self.ln_1
        x = x + self.attn(norm(x), inputs, None if memory is None else norm(memory),
                          context=None if content is None else norm(content))
        return x + self.mlp(self.ln_2(x))

    def forward(self, h: torch.Tensor, g: torch.Tensor, inputs_h: AttentionInputs,
                inputs_g: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor]:
        memory = inputs_h.memory[self.attn.layer] if inputs_h.memory is not None else None
        return self._stream(h, inputs_h, memory, None), self._stream(g, inputs_g, memory, h)


class XLNet(nn.Module):
    supports_kv_cache = False  # generation recomputes both streams over the text for each new token

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.family == "xlnet" and cfg.pos_encoding == "xl", "XLNet is family 'xlnet' with pos_encoding 'xl'"
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.mask_emb = nn.Parameter(torch.zeros(1, 1, cfg.d_model))  # where every query stream starts
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(TwoStreamBlock(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = make_norm(cfg) if cfg.norm_position == "pre" else None
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=True)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.init_weights()

    def init_weights(self) -> None:
        """The decoder's initialisation (`model.initialisation.init_gpt2_style`); the query start vector is a matrix to it."""
        init_gpt2_style(self, self.config)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, ranks: torch.Tensor | None = None, predict: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, *, attention_mask: torch.Tensor | None = None,
                memory: SegmentMemory | None = None) -> torch.Tensor:
        """idx: (B, T) tokens; ranks: (B, T) each position's step in the factorisation order; predict: (B, P) the
        positions to predict. Returns logits (B, P, vocab), or with targets (B, P) (-1: ignored) the mean
        cross-entropy. Without ranks: the natural order with a query at each next position, logits (B, T, vocab)
        for the next tokens (attention_mask: (B, T), 0 at left padding)."""
        logits = self.unembed(self.hidden_states(idx, ranks=ranks, predict=predict, attention_mask=attention_mask,
                                                 memory=memory))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def unembed(self, g: torch.Tensor) -> torch.Tensor:
        return self.lm_head(g)

    def new_memory(self) -> SegmentMemory:
        assert self.config.memory_len > 0, "this model has no segment memory (memory_len 0)"
        return SegmentMemory(self.config.memory_len)

    def supports_length(self, T: int) -> bool:
        return True  # relative positions: any length

    def hidden_states(self, idx: torch.Tensor, *, ranks: torch.Tensor | None = None, predict: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None, memory: SegmentMemory | None = None) -> torch.Tensor:
        """The query stream's last layer (B, P, C) (normalised when pre-norm), before the unembedding."""
        B, T = idx.shape
        assert (ranks is None) == (predict is None), "ranks and predict go together"
        remembered = memory.read() if memory is not None else None
        M = len(memory) if memory is not None else 0
        inputs_h, inputs_g = self._inputs(idx, ranks, predict, attention_mask, M, remembered)
        h = self.drop(self.tok_emb(idx))  # (B, T, C)
        P = inputs_g.mask.shape[2]
        g = self.drop(self.mask_emb.expand(B, P, -1))  # (B, P, C)
        recompute = self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
        block_inputs = []
        for block in self.blocks:
            block_inputs.append(h)
            h, g = checkpoint(block, h, g, inputs_h, inputs_g, use_reentrant=False) if recompute \
                else block(h, g, inputs_h, inputs_g)
        if memory is not None:
            memory.update(block_inputs)
        return self.ln_f(g) if self.ln_f is not None else g

    def _inputs(self, idx: torch.Tensor, ranks: torch.Tensor | None, predict: torch.Tensor | None,
                attention_mask: torch.Tensor | None, M: int, remembered: tuple[torch.Tensor, ...] | None
                ) -> tuple[AttentionInputs, AttentionInputs]:
        """Both streams' masks over [memory ; segment] (the memory is seen by all) and relative distances."""
        B, T = idx.shape
        device = idx.device
        slots = torch.arange(T, device=device)
        if ranks is None:  # the natural order; the query at p + 1 predicts the token after p
            ranks = slots[None].expand(B, T)
            q_pos = (slots + 1)[None].expand(B, T)
            q_rank = q_pos
        else:
            q_pos, q_rank = predict, ranks.gather(1, predict)  # (B, P)
        content = ranks[:, None, :] <= ranks[:, :, None]  # (B, T, T): j ordered at or before i
        query = ranks[:, None, :] < q_rank[:, :, None]  # (B, P, T): j ordered strictly before the predicted one
        if attention_mask is not None:  # padding is seen by no one but itself
            real = attention_mask.to(device=device).bool()[:, None, :]
            content = (content & real) | torch.eye(T, dtype=torch.bool, device=device)
            query = query & real
        # a query with nothing to see (a left-padded row's first ones) sees the slot before it, not nothing (NaN)
        query = query | (~query.any(-1, keepdim=True) & (slots[None, None, :] == (q_pos - 1).clamp(min=0)[:, :, None]))
        if M:
            seen = torch.ones(B, 1, M, dtype=torch.bool, device=device)
            content = torch.cat([seen.expand(B, T, M), content], 2)
            query = torch.cat([seen.expand(B, query.shape[1], M), query], 2)
        keys = torch.arange(M + T, device=device)
        lowest = -(T - 1)  # distances run from -(T - 1) (a query before a key) to M + T (the last next-token query)
        sinusoids = relative_sinusoids(torch.arange(lowest, M + T + 1, device=device), self.config.d_model)
        dtype = self.tok_emb.weight.dtype
        rel_h = (slots + M)[:, None] - keys[None, :] - lowest  # (T, M + T)
        rel_g = ((q_pos + M)[:, :, None] - keys[None, None, :] - lowest)[:, None]  # (B, 1, P, M + T)
        inputs_h = AttentionInputs(mask=content[:, None], is_causal=False, rope=None, kv_cache=None, memory=remembered,
                                   rel=(sinusoids.to(dtype), rel_h))
        inputs_g = AttentionInputs(mask=query[:, None], is_causal=False, rope=None, kv_cache=None, memory=remembered,
                                   rel=(sinusoids.to(dtype), rel_g))
        return inputs_h, inputs_g
