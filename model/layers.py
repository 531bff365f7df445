"""The transformer's small parameter-free pieces: norms, positional encodings and masks.

Positions are (B, T) or (1, T) integer tensors so that every row of a left-padded
batch starts counting at its first real token. RoPE uses the rotate-half
convention of GPT-NeoX and Hugging Face's LLaMA (the two halves of each head are
the real and imaginary parts), so LLaMA weights move across without permutation.
RoPE scaling for longer contexts follows Hugging Face's formulas exactly
(`linear`, `yarn`) or its static equivalent (`ntk`: a larger base), so an exported
model computes the same logits there.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from model.config import ModelConfig


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def sinusoidal_positions(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(...). positions: (..., T) -> (..., T, dim)."""
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angles = positions.float()[..., None] * freq  # (..., T, half)
    pe = torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).flatten(-2)  # (..., T, 2 * half)
    if dim % 2:  # an odd width leaves its last channel without a frequency
        pe = torch.cat([pe, pe.new_zeros(*pe.shape[:-1], 1)], dim=-1)
    return pe


def relative_sinusoids(distances: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-XL's embedding of relative distances: [sin(d * f) | cos(d * f)] with f_i = 10000^(-2i/dim),
    the sines' half first (not interleaved, as XL and XLNet lay it out). distances: (R,) -> (R, dim)."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, device=distances.device, dtype=torch.float32) / dim))
    angles = distances.float()[:, None] * inv_freq  # (R, dim / 2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


# --- rotary position embedding (RoPE) ---------------------------------------------

def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim / 2,) in fp32 and the factor applied to cos/sin (YaRN's attention scale)."""
    dim, base, factor = cfg.head_dim, cfg.rope_theta, cfg.rope_factor
    if cfg.rope_scaling == "ntk":  # NTK-aware: stretch the low frequencies by raising the base, keep the highest
        base = base * factor ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if cfg.rope_scaling == "linear":  # position interpolation: position p is read as p / factor
        return inv_freq / factor, 1.0
    if cfg.rope_scaling == "yarn":
        return _yarn_frequencies(inv_freq, dim=dim, base=base, factor=factor, original_len=cfg.rope_original_len)
    return inv_freq, 1.0


def _yarn_frequencies(inv_freq: torch.Tensor, *, dim: int, base: float, factor: float,
                      original_len: int) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023): interpolate the dimensions that rotate fewer than beta_slow=1 times over the
    original context, keep those rotating more than beta_fast=32 times, ramp linearly between; scale
    attention by 0.1 ln(factor) + 1. Same constants and rounding as Hugging Face's `_compute_yarn_parameters`."""
    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(correction_dim(32)), 0), min(math.ceil(correction_dim(1)), dim - 1)
    high = high + 0.001 if low == high else high
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 for the fast (high-frequency) dimensions
    scaled = inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate
    attention = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return scaled, attention


class Rotary:
    """cos/sin tables for the positions of one forward pass (no parameters, nothing in the state dict)."""

    def __init__(self, cfg: ModelConfig):
        self.inv_freq, self.attention_factor = rope_frequencies(cfg)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (B|1, T) -> cos, sin: (B|1, 1, T, head_dim), computed in fp32."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * self.inv_freq  # (B|1, T, head_dim / 2)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B|1, 1, T, head_dim)
        return (emb.cos() * self.attention_factor).to(dtype), (emb.sin() * self.attention_factor).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, head_dim); rotates each (i, i + head_dim/2) pair by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# --- ALiBi and attention masks ------------------------------------------------------

def alibi_slopes(n_head: int) -> torch.Tensor:
    """Press et al.'s head slopes: a geometric sequence 2^(-8/n), 2^(-16/n), ... for a power of two n;
    otherwise the slopes of the power of two below, then every other slope of the one above."""
    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_head))
    slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: n_head - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def causal_mask(*, start: int, T: int, key_valid: torch.Tensor | None, slopes: torch.Tensor | None,
                   device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor | None, bool]:
    """The `(attn_mask, is_causal)` pair for queries at cache slots start..start+T-1 over keys 0..start+T-1.

    key_valid: (B, start + T) bool, False at padding slots, or None when there is no padding.
    Returns no mask where `is_causal` (or a single query seeing everything) says it all, which keeps
    SDPA on its fused kernels; else a bool mask (B|1, 1, T, S), or with ALiBi slopes an additive
    float mask (B|1, n_head, T, S). A padding query attends to itself only, so no row is empty
    (an empty row would give NaN, and NaN values times a zero weight still poison real rows).
    """
    S = start + T
    if key_valid is None and slopes is None:
        if start == 0:
            return None, True
        if T == 1:
            return None, False
    q_slot = torch.arange(start, S, device=device)[:, None]  # (T, 1)
    k_slot = torch.arange(S, device=device)[None, :]  # (1, S)
    allowed = (k_slot <= q_slot)[None, None]  # (1, 1, T, S)
    if key_valid is not None:
        allowed = (allowed & key_valid[:, None, None, :]) | (k_slot == q_slot)  # (B, 1, T, S)
    if slopes is None:
        return allowed, False
    # Distances between slots equal distances between positions for real tokens (pads are masked).
    bias = -slopes[:, None, None] * (q_slot - k_slot).clamp(min=0)  # (n_head, T, S)
    return torch.where(allowed, bias.to(dtype), torch.tensor(float("-inf"), dtype=dtype, device=device)), False


def bidirectional_mask(*, T: int, key_valid: torch.Tensor | None, slopes: torch.Tensor | None,
                       device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """The attention mask of an encoder: every query sees every real key (no KV cache, so slots 0..T-1).

    None without padding or ALiBi (SDPA's unmasked fused kernels); else a bool mask (B, 1, T, T) where a
    padding query attends to itself only, or with ALiBi slopes an additive float mask (B|1, n_head, T, T)
    whose bias falls with the distance either way, -slope * |i - j| (the symmetric ALiBi of encoders).
    """
    if key_valid is None and slopes is None:
        return None
    slot = torch.arange(T, device=device)
    allowed = torch.ones(1, 1, T, T, dtype=torch.bool, device=device)
    if key_valid is not None:
        allowed = key_valid[:, None, None, :] | (slot[None, :] == slot[:, None])  # (B, 1, T, T)
    if slopes is None:
        return allowed
    bias = -slopes[:, None, None] * (slot[:, None] - slot[None, :]).abs()  # (n_head, T, T)
    return torch.where(allowed, bias.to(dtype), torch.tensor(float("-inf"), dtype=dtype, device=device))
