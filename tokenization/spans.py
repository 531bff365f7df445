"""T5's span corruption of a window, as a pure function of (seed, draw, window).

Of a window of L tokens, round(L x `noise_density`) in round(noise / `mean_span_length`)
spans are dropped from the encoder's input, each span replaced by one sentinel
token; the decoder's target is each sentinel followed by the span it stands for,
and both end with the end-of-sequence token (Raffel et al. 2020, section 3.1.4):

    window   a b c d e f g h          (spans "c d" and "g")
    source   a b <s0> e f <s1> h <eos>
    target   <s0> c d <s1> g <eos>

The span count and lengths depend on L alone, so every window of a batch gives a
source and a target of the same lengths: no padding. Where the spans fall is a
uniformly random split of the dropped and the kept tokens into that many runs
each, interleaved kept-first, drawn from a generator keyed by (seed, draw,
window) exactly as `tokenization.masking` keys its masks (`draw = step + 1` for
a fresh corruption each time a window is drawn, 0 for one fixed corruption per
window and for validation). Written here because T5's own implementation is
TensorFlow (`t5.data.preprocessors`) and `transformers`' Flax example draws from
NumPy's global generator; this one keeps resume exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SENTINEL = "<|sentinel_{}|>"
_STREAM = 0x7435  # "t5": apart from the masked-LM stream and any other use of the seed


def sentinel_tokens(n: int) -> list[str]:
    """The names of n sentinel tokens, in the order spans use them."""
    return [SENTINEL.format(i) for i in range(n)]


@dataclass(frozen=True, kw_only=True)
class SpanOptions:
    """How span-corruption training corrupts its windows (`train.spans`)."""

    __pydantic_config__ = {"extra": "forbid", "use_attribute_docstrings": True}

    noise_density: float = 0.15
    """Share of each window's tokens dropped from the source and predicted by the decoder (T5: 0.15)."""
    mean_span_length: float = 3.0
    """Mean length of a dropped span (T5: 3)."""
    dynamic: bool = True
    """A fresh corruption each time a window is drawn; false: one fixed corruption per window."""

    def __post_init__(self) -> None:
        if not 0.0 < self.noise_density < 1.0:
            raise ValueError(f"SpanOptions.noise_density: must be in (0, 1), got {self.noise_density}")
        if self.mean_span_length < 1.0:
            raise ValueError(f"SpanOptions.mean_span_length: must be >= 1, got {self.mean_span_length}")

    def shape(self, L: int) -> tuple[int, int]:
        """(dropped tokens, spans) of a window of L >= 2 tokens."""
        noise = min(max(int(round(L * self.noise_density)), 1), L - 1)
        return noise, max(int(round(noise / self.mean_span_length)), 1)

    def lengths(self, L: int) -> tuple[int, int]:
        """(source, target) lengths for a window of L tokens."""
        noise, spans = self.shape(L)
        return L - noise + spans + 1, noise + spans + 1


def _split(rng: np.random.Generator, items: int, parts: int) -> np.ndarray:
    """A uniformly random composition of `items` into `parts` positive run lengths."""
    cuts = np.sort(rng.choice(np.arange(1, items), parts - 1, replace=False)) if parts > 1 else np.empty(0, np.int64)
    return np.diff(np.concatenate([[0], cuts, [items]]))


@dataclass(frozen=True)
class SpanCorrupter:
    """`SpanOptions` bound to the tokenizer's sentinel, end and decoder-start ids and the run's seed."""

    opts: SpanOptions
    sentinel_ids: tuple[int, ...]
    eos_id: int
    start_id: int
    seed: int
    metric: str = "span"  # evaluate's metric names: span_loss, span_accuracy

    def draw_for(self, step: int) -> int:
        return step + 1 if self.opts.dynamic else 0

    def check_length(self, L: int) -> None:
        """A ValueError when a window of L tokens needs more sentinels than the tokenizer has."""
        spans = self.opts.shape(L)[1]
        if L < 2 or spans > len(self.sentinel_ids):
            raise ValueError(f"a window of {L} tokens has {spans} spans but the tokenizer has {len(self.sentinel_ids)} "
                             "sentinel tokens (tokenizer.sentinels)")

    def noise_mask(self, L: int, window: int, draw: int) -> np.ndarray:
        """(L,) bool: the dropped positions of `window` at `draw`."""
        noise, spans = self.opts.shape(L)
        rng = np.random.default_rng([self.seed, _STREAM, draw, int(window)])
        runs = np.stack([_split(rng, L - noise, spans), _split(rng, noise, spans)], axis=1).reshape(-1)  # kept, dropped, ...
        return np.repeat(np.arange(len(runs)) % 2 == 1, runs)

    def model_inputs(self, tokens: np.ndarray, windows: np.ndarray, *, draw: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """tokens: (B, L) int64 of the windows `windows` -> (source (B, S), decoder input (B, T), target (B, T)):
        the decoder input is the target shifted right behind the start token."""
        B, L = tokens.shape
        self.check_length(L)
        S, T = self.opts.lengths(L)
        src, tgt = np.empty((B, S), np.int64), np.empty((B, T), np.int64)
        for row, window in enumerate(windows):
            noise = self.noise_mask(L, int(window), draw)
            first = noise & ~np.concatenate([[False], noise[:-1]])  # each span's first position
            span_of = np.cumsum(first) - 1  # the span index of each dropped position
            sentinels = np.asarray(self.sentinel_ids)[span_of[first]]
            keep_src = ~noise | first
            src[row, :-1] = np.where(first, np.asarray(self.sentinel_ids)[np.maximum(span_of, 0)], tokens[row])[keep_src]
            # the target: for each span, its sentinel then its tokens
            order = np.argsort(np.concatenate([np.flatnonzero(first) - 0.5, np.flatnonzero(noise)]), kind="stable")
            tgt[row, :-1] = np.concatenate([sentinels, tokens[row][noise]])[order]
        src[:, -1], tgt[:, -1] = self.eos_id, self.eos_id
        tgt_in = np.concatenate([np.full((B, 1), self.start_id, np.int64), tgt[:, :-1]], axis=1)
        return src, tgt_in, tgt
