"""The initialisation the decoder and XLNet share: GPT-2's, written once.

(The encoder-decoder initialises as T5 does, in `model.seq2seq`.)
"""

from __future__ import annotations

import math

import torch.nn as nn

from model.config import ModelConfig


def init_gpt2_style(model: nn.Module, cfg: ModelConfig) -> None:
    """N(0, init_std) for every matrix (embeddings, projections, a separate unembedding, Transformer-XL's biases u
    and v), zero biases, unit norm gains, and residual output projections scaled by 1/sqrt(2 * n_layer) (GPT-2) so
    the residual stream's variance does not grow with depth."""
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            scale = 1.0 / math.sqrt(2 * cfg.n_layer) if name.endswith("proj.weight") else 1.0
            nn.init.normal_(p, mean=0.0, std=cfg.init_std * scale)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
        else:  # norm gains
            nn.init.ones_(p)
