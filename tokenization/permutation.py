"""Permutation language modelling's draw for a window (XLNet), as a pure function of (seed, draw, window).

Each window gets a factorisation order, a random permutation of its positions,
given to the model as `ranks` (the step of the order at which each position is
predicted: `model.xlnet`). Only the last 1/K of each order are predicted (XLNet's
partial prediction, K = `predict_one_in`, 6 in the paper's base models): those
positions see most of the window as context, and the others only serve as
context. The targets are the tokens at the predicted positions, in position order.

The order comes from a generator keyed by (seed, draw, window index): training
passes `draw = step + 1` (a fresh order each time a window is drawn) and
validation passes 0, so a resumed run orders exactly as an uninterrupted one,
whatever the worker count. XLNet's released pre-training code permutes spans of
tokens and mixes in a bidirectional data pipeline; this is the paper's plain
per-position formulation (section 2.3), which is what its equations describe.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_STREAM = 0x706C6D  # "plm": keeps these draws apart from any other use of the seed


@dataclass(frozen=True, kw_only=True)
class PermutationOptions:
    """How permutation-LM training orders its windows (`train.permutation`)."""

    __pydantic_config__ = {"extra": "forbid", "use_attribute_docstrings": True}

    predict_one_in: int = 6
    """Partial prediction: the last 1/K of each window's factorisation order are predicted (XLNet: K = 6); at least 2, so the first of an order (which would see nothing) never is."""

    def __post_init__(self) -> None:
        if self.predict_one_in < 2:
            raise ValueError(f"PermutationOptions.predict_one_in: must be >= 2, got {self.predict_one_in}")

    def predicted(self, T: int) -> int:
        """Positions predicted in a window of T tokens: T // K, at least 1."""
        return max(1, T // self.predict_one_in)


@dataclass(frozen=True)
class Permuter:
    """`PermutationOptions` bound to the run's seed."""

    opts: PermutationOptions
    seed: int
    metric: str = "plm"  # evaluate's metric names: plm_loss, plm_accuracy

    def draw_for(self, step: int) -> int:
        """The `draw` of training step `step`: a fresh order for every step."""
        return step + 1

    def check_length(self, L: int) -> None:
        if L < 2:
            raise ValueError(f"a window of {L} token has no order to predict in")

    def model_inputs(self, tokens: np.ndarray, windows: np.ndarray, *, draw: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """tokens: (B, T) int64, the windows `windows` (B,) -> XLNet's (tokens, ranks (B, T), predicted positions
        (B, P), their tokens (B, P)), P = `predicted(T)`."""
        B, T = tokens.shape
        P = self.opts.predicted(T)
        ranks = np.empty((B, T), dtype=np.int64)
        predict = np.empty((B, P), dtype=np.int64)
        for row, window in enumerate(windows):
            order = np.random.default_rng([self.seed, _STREAM, draw, int(window)]).permutation(T)
            ranks[row, order] = np.arange(T)
            predict[row] = np.sort(order[T - P :])
        return tokens, ranks, predict, np.take_along_axis(tokens, predict, axis=1)
