"""Scoring a language model on token streams: loss, perplexity, bits per byte, accuracy, and a length sweep.

Bits per byte divide the summed loss (in bits) by the UTF-8 bytes the scored
tokens stand for, so runs with different tokenizers compare. As a floor to beat,
a unigram model of the training tokens (add-one smoothed) is scored on the same
targets. The sweep scores the same validation stream at multiples of the
training context (length extrapolation) and records the loss by position within
the window, averaged over buckets of positions; RoPE models can also be swept
past their context with inference-time scaling (`linear`, `ntk`, `yarn`, factor
= length / training context). Learned position tables cannot score windows
longer than the table: those lengths are reported as unsupported, never guessed.
With `sliding_window`, windows overlap by `window - stride` tokens and each
scores only the targets no earlier window scored, so every token is scored once
with at least `window - stride` tokens of context (the first window of a buffer
scores all of its targets). Given where each buffer's documents start
(`doc_starts`), every window is scored as document-aware packing trains: each
token attends within its own document, positions restarting there. Given loss
masks (task data), only the masked-in targets (completion / assistant tokens)
are scored, and only at the training context: the length sweep and RoPE-scaled
lengths are skipped for task data (a note says so). A model with a segment
memory (Transformer-XL) is also scored at each length >= its context reading
the window as it trained, segment by segment with its memory (`memory`), and
by sliding windows that give every target the same context without one
(`sliding`: windows of memory + context tokens, advancing by the context),
each with its tokens/s: the memory reads each token once. `EvalOptions`
is also the pipeline's `evaluate` config section. Pure PyTorch and NumPy: the
tokens come in as arrays.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

Window = tuple[int, int, int]  # (buffer, first token, first scored target within the window)


@dataclass(frozen=True)
class EvalOptions:
    """What to score; also the pipeline's `evaluate` config section."""

    # Read by pydantic when the pipeline validates a config (a plain dict: this module does not import pydantic).
    __pydantic_config__ = {"extra": "forbid", "use_attribute_docstrings": True, "allow_inf_nan": False}

    max_tokens: int = 200_000
    """Validation targets scored per context length (a window more at most)."""
    context_multipliers: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
    """Evaluate at these multiples of the training context (1.0 is always added)."""
    sliding_window: bool = False
    """Score overlapping windows (every token once, with at least window - stride tokens of context)."""
    stride: int | None = None
    """Sliding-window step in tokens (default: half of each window; at most the window)."""
    rope_scalings: tuple[Literal["none", "linear", "ntk", "yarn"], ...] = ("none",)
    """RoPE models: also sweep lengths past the training context with these inference-time scalings."""
    position_buckets: int = 16
    """Loss by position within the window, averaged over this many equal buckets."""
    batch_size: int = field(default=8, metadata={"fingerprint": False})
    """Windows of the training context per forward pass (longer windows get proportionally fewer)."""

    def __post_init__(self) -> None:
        for name in ("max_tokens", "position_buckets", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"EvalOptions.{name}: must be >= 1, got {getattr(self, name)}")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"EvalOptions.stride: must be >= 1, got {self.stride}")
        if not self.context_multipliers or any(m <= 0 for m in self.context_multipliers):
            raise ValueError(f"EvalOptions.context_multipliers: must be a non-empty list of values > 0, "
                             f"got {list(self.context_multipliers)}")
        if not self.rope_scalings:
            raise ValueError("EvalOptions.rope_scalings: must not be empty (use [none])")


class NoWindowError(ValueError):
    """The validation data holds no window of the training context."""


def window_plan(buffer_lengths: list[int], L: int, *, stride: int, max_targets: int) -> list[Window]:
    """Windows of L inputs (+1 target) over each buffer, advancing by `stride` (= L: disjoint windows),
    until `max_targets` targets are scored. A window never straddles two buffers."""
    assert 1 <= stride <= L, f"stride {stride} must be in [1, {L}]"
    out: list[Window] = []
    scored = 0
    for b, n in enumerate(buffer_lengths):
        start = 0
        while start + L + 1 <= n and scored < max_targets:
            skip = 0 if start == 0 else L - stride  # targets the previous window already scored
            out.append((b, start, skip))
            scored += L - skip
            start += stride
    return out


def window_segments(doc_starts: np.ndarray, first: int, L: int) -> np.ndarray:
    """(L,) segment ids of tokens first..first+L-1: each token's document, counted from the first token's."""
    docs = np.searchsorted(doc_starts, np.arange(first, first + L), side="right") - 1
    return (docs - docs[0]).astype(np.int64)


@torch.no_grad()
def score_windows(model: torch.nn.Module, buffers: list[np.ndarray], plan: list[Window], *, L: int, batch_size: int,
                  byte_lengths: np.ndarray, unigram_logp: np.ndarray | None = None,
                  position_buckets: int = 16, doc_starts: list[np.ndarray] | None = None,
                  masks: list[np.ndarray] | None = None,
                  read: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, Any]:
    """Loss, perplexity, bits per byte, token accuracy, loss by position and tokens/s over the planned windows
    (document-aware when `doc_starts`, each buffer's document starts, are given; only the targets whose
    loss mask is 1 when `masks`, each buffer's, are given). read: inputs (b, L) -> logits (b, L, vocab) in place
    of one forward pass (`read_with_memory`, `read_sliding`)."""
    assert plan, f"no window of {L} tokens fits in the validation data"
    device = next(model.parameters()).device
    nats = correct = tokens = nbytes = uni = seconds = 0.0
    pos_nats, pos_count = np.zeros(L), np.zeros(L)
    for i in range(0, len(plan), batch_size):
        chunk = plan[i : i + batch_size]
        batch = torch.from_numpy(np.stack([buffers[b][s : s + L + 1].astype(np.int64) for b, s, _ in chunk])).to(device)
        x, y = batch[:, :-1], batch[:, 1:]  # (b, L), (b, L)
        segments = None if doc_starts is None else torch.from_numpy(
            np.stack([window_segments(doc_starts[b], s, L) for b, s, _ in chunk])).to(device)  # (b, L)
        t0 = time.perf_counter()
        logits = (read(x) if read is not None else model(x) if segments is None
                  else model(x, segment_ids=segments)).float()  # (b, L, vocab)
        if logits.is_cuda:
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        loss = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # (b, L)
        keep = torch.arange(L, device=device)[None] >= torch.tensor([k for *_, k in chunk], device=device)[:, None]
        if masks is not None:
            keep &= torch.from_numpy(np.stack([masks[b][s + 1 : s + L + 1] for b, s, _ in chunk]).astype(bool)).to(device)
        loss, keep_f = loss.cpu().numpy(), keep.cpu().numpy()
        ys = y.cpu().numpy()[keep_f]
        nats += float(loss[keep_f].sum())
        correct += float(((logits.argmax(-1) == y) & keep).sum().item())
        tokens += float(keep_f.sum())
        nbytes += float(byte_lengths[ys].sum())
        pos_nats += (loss * keep_f).sum(0)
        pos_count += keep_f.sum(0)
        if unigram_logp is not None:
            uni -= float(unigram_logp[ys].sum())
    if not tokens:
        raise NoWindowError("evaluate: the validation windows hold no target with loss mask 1 (no completion or "
                            "assistant token); raise data.val_fraction or evaluate.max_tokens")
    out = {"loss": nats / tokens, "ppl": math.exp(min(nats / tokens, 700.0)), "bpb": nats / math.log(2) / max(1.0, nbytes),
           "token_accuracy": correct / tokens, "tokens": tokens, "tokens_per_s": tokens / max(seconds, 1e-9),
           "loss_by_position": _buckets(pos_nats, pos_count, position_buckets)}
    if unigram_logp is not None:
        out["unigram_loss"] = uni / tokens
    return out


def read_with_memory(model: torch.nn.Module, x: torch.Tensor, *, segment_len: int) -> torch.Tensor:
    """Logits (b, L, vocab) of inputs x (b, L) read as a model with a segment memory trains: segments of
    `segment_len` tokens in order, each attending to its own and to the memory of those before."""
    memory = model.new_memory()
    return torch.cat([model(x[:, i : i + segment_len], memory=memory) for i in range(0, x.shape[1], segment_len)], 1)


def read_sliding(model: torch.nn.Module, x: torch.Tensor, *, segment_len: int, context: int) -> torch.Tensor:
    """Logits (b, L, vocab) of inputs x (b, L) from windows of up to `context + segment_len` tokens advancing by
    `segment_len`, each kept for its last `segment_len` positions: every target sees the context a memory of
    `context` positions gives it, recomputed (each token is read (context + segment_len) / segment_len times)."""
    pieces = []
    for i in range(0, x.shape[1], segment_len):
        first = max(0, i - context)
        pieces.append(model(x[:, first : i + segment_len])[:, i - first :])
    return torch.cat(pieces, 1)


def _buckets(nats: np.ndarray, count: np.ndarray, n: int) -> dict[str, list]:
    """Mean loss over `n` equal buckets of window positions (None where nothing was scored)."""
    edges = np.unique(np.linspace(0, len(nats), min(n, len(nats)) + 1).round().astype(int))
    loss = [float(nats[a:b].sum() / count[a:b].sum()) if count[a:b].sum() else None for a, b in zip(edges, edges[1:])]
    return {"start": edges[:-1].tolist(), "end": edges[1:].tolist(), "loss": loss}


def unigram_logprobs(train_buffers: list[np.ndarray], vocab_size: int) -> np.ndarray:
    counts = np.ones(vocab_size, dtype=np.float64)  # add-one smoothing
    for w in train_buffers:
        counts += np.bincount(w, minlength=vocab_size)[:vocab_size]
    return np.log(counts / counts.sum())


def _score_length(model: torch.nn.Module, buffers: list[np.ndarray], L: int, *, train_seq_len: int, opts: EvalOptions,
                  byte_lengths: np.ndarray, unigram_logp: np.ndarray | None = None,
                  doc_starts: list[np.ndarray] | None = None, masks: list[np.ndarray] | None = None,
                  read: Callable[[torch.Tensor], torch.Tensor] | None = None, disjoint: bool = False
                  ) -> dict[str, Any] | None:
    """None when no validation shard holds a window of L + 1 tokens. disjoint: windows of L side by side even
    with `opts.sliding_window` (a reader of its own decides each target's context)."""
    stride = min(L, opts.stride or max(1, L // 2)) if opts.sliding_window and not disjoint else L
    plan = window_plan([len(b) for b in buffers], L, stride=stride, max_targets=opts.max_tokens)
    if not plan:
        return None
    return score_windows(model, buffers, plan, L=L, batch_size=max(1, opts.batch_size * train_seq_len // L),
                         byte_lengths=byte_lengths, unigram_logp=unigram_logp, position_buckets=opts.position_buckets,
                         doc_starts=doc_starts, masks=masks, read=read)


def part_metrics(model: torch.nn.Module, parts: dict[str, list[np.ndarray]], *, train_seq_len: int, opts: EvalOptions,
                 byte_lengths: np.ndarray, doc_starts: dict[str, list[np.ndarray]] | None = None,
                 masks: dict[str, list[np.ndarray]] | None = None) -> dict[str, float]:
    """`val_loss_<part>`, `val_ppl_<part>`, `val_bpb_<part>` at the training context for each named part of the
    validation data (the sources of a data mixture), scored as the whole is; a part too short for one window of
    the training context is left out."""
    out: dict[str, float] = {}
    for name, buffers in parts.items():
        r = _score_length(model, buffers, max(2, train_seq_len), train_seq_len=train_seq_len, opts=opts,
                          byte_lengths=byte_lengths, doc_starts=doc_starts[name] if doc_starts else None,
                          masks=masks[name] if masks else None)
        if r is not None:
            out.update({f"val_loss_{name}": r["loss"], f"val_ppl_{name}": r["ppl"], f"val_bpb_{name}": r["bpb"]})
    return out


def sweep(model: torch.nn.Module, val_buffers: list[np.ndarray], *, train_seq_len: int, opts: EvalOptions,
          byte_lengths: np.ndarray, unigram_logp: np.ndarray, doc_starts: list[np.ndarray] | None = None,
          masks: list[np.ndarray] | None = None) -> dict[str, Any]:
    """Every metric of the stage: the unscaled sweep (`lengths`), RoPE-scaled sweeps (`rope_scaled`), notes.
    doc_starts: each buffer's document starts, to score document-aware (as `train.packing: documents` trains).
    masks: each buffer's loss mask (task data): only masked-in targets scored, at the training context only."""
    metrics: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    multipliers = {1.0} if masks is not None else set(opts.context_multipliers) | {1.0}
    for m in sorted(multipliers):
        L = max(2, int(round(train_seq_len * m)))
        if not model.supports_length(L):
            rows.append({"multiplier": m, "context": L, "supported": False})
            continue
        r = _score_length(model, val_buffers, L, train_seq_len=train_seq_len, opts=opts, byte_lengths=byte_lengths,
                          unigram_logp=unigram_logp if m == 1.0 else None, doc_starts=doc_starts, masks=masks)
        if r is None:
            if m == 1.0:
                raise NoWindowError(f"evaluate: no validation shard holds a window of the training context ({L} + 1 tokens); "
                                 "raise data.val_fraction or data.shard_size_mb")
            rows.append({"multiplier": m, "context": L, "supported": False, "reason": "validation shards too short"})
            continue
        rows.append({"multiplier": m, "context": L, "supported": True, **r})
        metrics.update({f"ppl_ctx_{L}": r["ppl"], f"loss_ctx_{L}": r["loss"], f"bpb_ctx_{L}": r["bpb"]})
        if m == 1.0:
            metrics.update({"val_loss": r["loss"], "val_ppl": r["ppl"], "val_bpb": r["bpb"],
                            "val_token_accuracy": r["token_accuracy"], "val_tokens": r["tokens"],
                            "unigram_loss": r["unigram_loss"], "unigram_ppl": math.exp(r["unigram_loss"])})
    unsupported = [r["context"] for r in rows if not r["supported"] and "reason" not in r]
    short = [r["context"] for r in rows if "reason" in r]
    notes = [f"lengths {unsupported} exceed the learned position table of {model.config.max_seq_len}"] if unsupported else []
    notes += [f"lengths {short} not scored: no validation shard holds that many tokens + 1"] if short else []
    if masks is not None:  # task data: the loss on completion tokens at the trained context is the measure
        scaled, note = {}, [("task data (loss mask): only completion / assistant tokens scored, at the training "
                             "context; the length sweep and RoPE-scaled lengths are skipped")]
    else:
        scaled, note = _rope_scaled(model, val_buffers, train_seq_len=train_seq_len, opts=opts,
                                    byte_lengths=byte_lengths, metrics=metrics, doc_starts=doc_starts)
    out = {"metrics": metrics, "lengths": rows, "rope_scaled": scaled, "notes": notes + note,
           "train_seq_len": train_seq_len, "sliding_window": opts.sliding_window, "stride": opts.stride}
    if model.config.memory_len and masks is None and doc_starts is None:
        out["memory"] = _memory_rows(model, val_buffers, train_seq_len=train_seq_len, opts=opts,
                                     byte_lengths=byte_lengths, metrics=metrics)
    if doc_starts is not None:  # said only when on, so the default eval.json stays as it was
        out["packing"] = "documents"
    if masks is not None:
        out["loss_mask"] = True
    return out


def _memory_rows(model: torch.nn.Module, buffers: list[np.ndarray], *, train_seq_len: int, opts: EvalOptions,
                 byte_lengths: np.ndarray, metrics: dict[str, float]) -> dict[str, list]:
    """A segment-memory model at each length >= its context: windows of L read segment by segment with the memory
    (`memory`), and the same windows by sliding windows that give each target that context again (`sliding`)."""
    T, M = train_seq_len, model.config.memory_len
    readers = {"memory": lambda x: read_with_memory(model, x, segment_len=T),
               "sliding": lambda x: read_sliding(model, x, segment_len=T, context=M)}
    out: dict[str, list] = {kind: [] for kind in readers}
    for m in sorted(x for x in set(opts.context_multipliers) | {1.0} if x >= 1.0):
        L = max(2, int(round(T * m)))
        for kind, read in readers.items():
            r = _score_length(model, buffers, L, train_seq_len=T, opts=opts, byte_lengths=byte_lengths, read=read,
                              disjoint=True)
            if r is None:
                continue
            out[kind].append({"multiplier": m, "context": L, "segment": T, "memory_len": M, "supported": True, **r})
            metrics.update({f"ppl_ctx_{L}_{kind}": r["ppl"], f"loss_ctx_{L}_{kind}": r["loss"],
                            f"bpb_ctx_{L}_{kind}": r["bpb"], f"tokens_per_s_ctx_{L}_{kind}": r["tokens_per_s"]})
    return out


def _rope_scaled(model: torch.nn.Module, buffers: list[np.ndarray], *, train_seq_len: int, opts: EvalOptions,
                 byte_lengths: np.ndarray, metrics: dict[str, float],
                 doc_starts: list[np.ndarray] | None = None) -> tuple[dict[str, list], list[str]]:
    """Lengths past the training context again, with RoPE scaling factor = length / training context.
    At or below the context the factor would be 1, the unscaled model, so those lengths are not repeated."""
    kinds = [k for k in opts.rope_scalings if k != "none"]
    if not kinds:
        return {}, []
    if getattr(model, "rotary", None) is None:
        return {}, [f"evaluate.rope_scalings {kinds} ignored: pos_encoding is {model.config.pos_encoding!r}, not rope"]
    trained = model.config
    out: dict[str, list] = {}
    try:
        for kind in kinds:
            out[kind] = []
            for m in sorted(x for x in set(opts.context_multipliers) if x > 1.0):
                L = max(2, int(round(train_seq_len * m)))
                model.set_rope_scaling(kind, L / train_seq_len, original_max_seq_len=train_seq_len)
                r = _score_length(model, buffers, L, train_seq_len=train_seq_len, opts=opts, byte_lengths=byte_lengths,
                                  doc_starts=doc_starts)
                if r is None:
                    continue
                out[kind].append({"multiplier": m, "context": L, "factor": L / train_seq_len, "supported": True, **r})
                metrics.update({f"ppl_ctx_{L}_{kind}": r["ppl"], f"loss_ctx_{L}_{kind}": r["loss"],
                                f"bpb_ctx_{L}_{kind}": r["bpb"]})
    finally:
        model.set_rope_scaling(trained.rope_scaling, trained.rope_factor,
                               original_max_seq_len=trained.rope_original_max_seq_len)
    return out, []
