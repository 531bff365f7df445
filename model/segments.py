"""Document-aware attention over packed windows: segment ids -> positions and a block-diagonal causal mask.

A packed window holds the end of one document and the starts of others. With
segment ids (B, T) (equal ids = one document, non-decreasing along a row) a token
attends only to earlier tokens of its own document, and positions restart at 0
where each segment starts, so a document's logits inside the window are what it
would get alone. Positions derive from the segment ids alone, so the ids are the
whole interface. ALiBi needs nothing more: inside one document distances between
slots are distances between positions.

Two implementations of the same mask: a boolean (B, 1, T, T) mask for
`scaled_dot_product_attention` (any device; O(T^2) memory per row), and a
FlexAttention block mask (`torch.nn.attention.flex_attention`, compiled) that
skips the blocks the mask empties, used on GPUs. FlexAttention has no dropout,
so training with attention dropout stays on the SDPA mask.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch: the SDPA mask everywhere
    create_block_mask = flex_attention = None


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids -> (B, T) positions counting from 0 at each segment's first token."""
    B, T = segment_ids.shape
    slot = torch.arange(T, device=segment_ids.device).expand(B, T)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(starts, slot, torch.zeros_like(slot)).cummax(dim=1).values  # (B, T) slot of the segment's start
    return slot - first


def segment_mask(segment_ids: torch.Tensor, *, slopes: torch.Tensor | None,
                 dtype: torch.dtype) -> torch.Tensor:
    """The SDPA mask: bool (B, 1, T, T) block-diagonal causal, or with ALiBi slopes an additive float mask
    (B, n_head, T, T). The diagonal is always allowed, so no row is empty."""
    T = segment_ids.shape[1]
    slot = torch.arange(T, device=segment_ids.device)
    causal = slot[None, :] <= slot[:, None]  # (T, T) key <= query
    allowed = (causal & (segment_ids[:, :, None] == segment_ids[:, None, :]))[:, None]  # (B, 1, T, T)
    if slopes is None:
        return allowed
    bias = -slopes[:, None, None] * (slot[:, None] - slot[None, :]).clamp(min=0)  # (n_head, T, T)
    return torch.where(allowed, bias.to(dtype)[None], torch.tensor(float("-inf"), dtype=dtype, device=slot.device))


def flex_available(device: torch.device) -> bool:
    """FlexAttention is used on CUDA devices when this torch has it."""
    return flex_attention is not None and device.type == "cuda"


def flex_block_mask(segment_ids: torch.Tensor) -> Any:
    """A FlexAttention BlockMask for block-diagonal causal attention over these segments (B, T)."""
    B, T = segment_ids.shape

    def document_causal(b, h, q, k):  # FlexAttention's mask_mod signature
        return (k <= q) & (segment_ids[b, q] == segment_ids[b, k])

    return create_block_mask(document_causal, B, None, T, T, device=segment_ids.device)


def alibi_score_mod(slopes: torch.Tensor) -> Any:
    """FlexAttention score_mod adding ALiBi's -slope * (q - k) (the block mask keeps k <= q in one document)."""
    def alibi(score, b, h, q, k):  # FlexAttention's score_mod signature
        return score - slopes[h] * (q - k)

    return alibi


@lru_cache(maxsize=1)
def _compiled_flex() -> Any:
    # Uncompiled, FlexAttention materialises the whole score matrix; compiled, it is a fused kernel.
    return torch.compile(flex_attention, dynamic=False)


def flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_mask: Any, score_mod: Any,
                compiled: bool = True) -> torch.Tensor:
    """q: (B, n_head, T, head_dim), k, v: (B, n_kv_head, T, head_dim) -> (B, n_head, T, head_dim)."""
    fn = _compiled_flex() if compiled else flex_attention
    return fn(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])
