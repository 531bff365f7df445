"""Masked language modelling's corruption of a window (BERT), as a pure function of (seed, draw, window).

Each position of a window is chosen with probability `rate` (special tokens never:
they are the document separators and padding); of the chosen positions,
`mask_fraction` become the mask token, `random_fraction` a random ordinary token
and the rest stay as they were (BERT's 80/10/10), and the targets are the original
tokens there and -1 (ignored by the loss) everywhere else. A window always has at
least one chosen position when it has an ordinary token, so no batch has an
empty loss.

The random choices come from a generator keyed by (seed, draw, window index):
training passes `draw = step + 1` for RoBERTa's dynamic masking (a fresh mask each
time a window is drawn) or `draw = 0` for BERT's static masking (one mask per
window), and validation passes 0; so a resumed run masks exactly as an
uninterrupted one, whatever the worker count. Written here rather than taken
from `transformers`' `DataCollatorForLanguageModeling`, whose masks come from
torch's global generator and so depend on everything drawn before them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MASK = "<|mask|>"
_STREAM = 0x6D6C6D  # "mlm": keeps these draws apart from any other use of the seed


@dataclass(frozen=True, kw_only=True)
class MaskingOptions:
    """How masked-LM training corrupts its windows (`train.masking`)."""

    __pydantic_config__ = {"extra": "forbid", "use_attribute_docstrings": True}

    rate: float = 0.15
    """Share of the positions chosen for prediction (BERT and RoBERTa: 0.15)."""
    mask_token: str = MASK
    """The mask token; it must be one of the tokenizer's special tokens."""
    mask_fraction: float = 0.8
    """Of the chosen positions, the share replaced by the mask token."""
    random_fraction: float = 0.1
    """Of the chosen positions, the share replaced by a random ordinary token (the rest are left as they are)."""
    dynamic: bool = True
    """A fresh mask each time a window is drawn (RoBERTa); false: one fixed mask per window (BERT's static masking)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.rate < 1.0:
            raise ValueError(f"MaskingOptions.rate: must be in (0, 1), got {self.rate}")
        for name in ("mask_fraction", "random_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"MaskingOptions.{name}: must be in [0, 1], got {getattr(self, name)}")
        if self.mask_fraction + self.random_fraction > 1.0:
            raise ValueError(f"MaskingOptions.mask_fraction + random_fraction must be <= 1, got "
                             f"{self.mask_fraction} + {self.random_fraction}")


@dataclass(frozen=True)
class Masker:
    """`MaskingOptions` bound to a tokenizer's ids and the run's seed."""

    opts: MaskingOptions
    mask_id: int
    special_ids: tuple[int, ...]
    vocab_size: int
    seed: int
    metric: str = "mlm"  # evaluate's metric names: mlm_loss, mlm_accuracy

    def __post_init__(self) -> None:
        assert self.mask_id in self.special_ids, f"the mask token {self.mask_id} must be a special token"
        ordinary = np.setdiff1d(np.arange(self.vocab_size), np.asarray(self.special_ids, dtype=np.int64))
        assert len(ordinary), "the vocabulary has no ordinary token"
        object.__setattr__(self, "_ordinary", ordinary)

    def draw_for(self, step: int) -> int:
        """The `draw` of training step `step`: step + 1 when masking is dynamic, else 0."""
        return step + 1 if self.opts.dynamic else 0

    def check_length(self, L: int) -> None:
        """Any window length masks (the interface span corruption shares)."""

    def model_inputs(self, tokens: np.ndarray, windows: np.ndarray, *, draw: int) -> tuple[np.ndarray, np.ndarray]:
        """The encoder's (inputs, targets) of these windows: `apply`."""
        return self.apply(tokens, windows, draw=draw)

    def apply(self, tokens: np.ndarray, windows: np.ndarray, *, draw: int) -> tuple[np.ndarray, np.ndarray]:
        """tokens: (B, T) int64, the windows `windows` (B,) -> (inputs, targets), both (B, T) int64."""
        inputs, targets = tokens.copy(), np.full_like(tokens, -1)
        special = np.isin(tokens, np.asarray(self.special_ids, dtype=tokens.dtype))
        for row, window in enumerate(windows):
            rng = np.random.default_rng([self.seed, _STREAM, draw, int(window)])
            u, action = rng.random(tokens.shape[1]), rng.random(tokens.shape[1])
            u[special[row]] = np.inf  # never chosen
            chosen = u < self.opts.rate
            if not chosen.any() and np.isfinite(u).any():
                chosen[np.argmin(u)] = True  # a short window still predicts one token
            targets[row, chosen] = tokens[row, chosen]
            to_mask = chosen & (action < self.opts.mask_fraction)
            to_random = chosen & ~to_mask & (action < self.opts.mask_fraction + self.opts.random_fraction)
            inputs[row, to_mask] = self.mask_id
            inputs[row, to_random] = self._ordinary[rng.integers(0, len(self._ordinary), int(to_random.sum()))]
        return inputs, targets
