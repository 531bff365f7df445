"""Weighted mixtures of data sources: which source, and which of its windows, each global training sample is.

The weights become integer quotas of a period of `PERIOD` samples (largest remainder, so they sum to it), and
one period's schedule is laid out by smooth weighted round robin: each slot, every source gains its quota and the
one furthest ahead (the lowest index on a tie) takes the slot and gives back a period. Every source then holds
exactly its quota of each period and stays within one sample of its share at every slot in between, so the
realised shares match the weights (to 1/PERIOD) from the first steps on, not only on average.

Global sample `g` sits in period `g // PERIOD` at slot `g % PERIOD`; its source is that slot's, and its index
within the source counts the source's samples before it (whole periods, then the earlier slots of this one).
That index walks the source's own seeded permutation of its windows, a fresh one per pass over the source. All
of it is a pure function of `g`, so, as with one source (`tokenization.dataset.sample_indices`), the data
position after step `s` depends on `s` alone and a resumed run continues exactly. Each source is repeated
according to its weight: a small source with a large weight is seen more often per pass of the big one.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

PERIOD = 1000  # samples per schedule period: shares are exact to 1/PERIOD over whole periods


def quotas(weights: list[float], period: int = PERIOD) -> np.ndarray:
    """Integer samples per period for each source: its weight's share, largest remainders rounded up."""
    w = np.asarray(weights, dtype=np.float64)
    assert len(w) and (w > 0).all() and np.isfinite(w).all(), f"weights must be positive and finite, got {weights}"
    exact = w / w.sum() * period
    q = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - q), kind="stable")[: period - int(q.sum())]:
        q[i] += 1
    return q


@lru_cache(maxsize=8)
def schedule(weights: tuple[float, ...], period: int = PERIOD) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source of each slot, the slot's index among its source's slots, quotas) for one period."""
    q = quotas(list(weights), period)
    current = np.zeros(len(q), dtype=np.int64)
    source = np.empty(period, dtype=np.int64)
    rank = np.empty(period, dtype=np.int64)
    seen = np.zeros(len(q), dtype=np.int64)
    for slot in range(period):
        current += q
        i = int(np.argmax(current))  # the first of the largest: ties go to the lower index
        current[i] -= period
        source[slot], rank[slot] = i, seen[i]
        seen[i] += 1
    return source, rank, q


def mixture_indices(step: int, *, rank: int, world_size: int, global_batch: int, ranges: list[tuple[int, int]],
                    weights: list[float], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(window indices, source of each) rank `rank` trains on at optimizer step `step`; source `i` owns windows
    `ranges[i][0] .. ranges[i][1] - 1` of the combined dataset."""
    assert len(ranges) == len(weights), f"{len(ranges)} window ranges for {len(weights)} weights"
    assert all(hi > lo for lo, hi in ranges), f"every source needs windows, got ranges {ranges}"
    assert global_batch % world_size == 0, f"global batch {global_batch} not divisible by world size {world_size}"
    slot_source, slot_rank, q = schedule(tuple(float(w) for w in weights))
    first = step * global_batch
    positions = np.arange(first + rank, first + global_batch, world_size, dtype=np.int64)
    period, slot = np.divmod(positions, len(slot_source))
    sources = slot_source[slot]
    within = period * q[sources] + slot_rank[slot]  # this source's samples before this one
    out = np.empty_like(positions)
    for i in np.unique(sources):
        lo, hi = ranges[int(i)]
        sel = sources == i
        epochs, offsets = np.divmod(within[sel], hi - lo)
        picked = np.empty(int(sel.sum()), dtype=np.int64)
        for e in np.unique(epochs):
            picked[epochs == e] = _permutation(seed, int(i), int(e), hi - lo)[offsets[epochs == e]]
        out[sel] = lo + picked
    return out, sources


def realised_shares(steps: int, *, global_batch: int, weights: list[float]) -> np.ndarray:
    """Each source's share of the samples of steps 0..steps-1 (what `mixture_indices` hands out over a run)."""
    slot_source, _, q = schedule(tuple(float(w) for w in weights))
    n = steps * global_batch
    whole, part = divmod(n, len(slot_source))
    counts = whole * q + np.bincount(slot_source[:part], minlength=len(q))
    return counts / max(n, 1)


@lru_cache(maxsize=16)
def _permutation(seed: int, source: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, 1 + source, epoch]).permutation(n)  # one source alone uses [seed, epoch]
