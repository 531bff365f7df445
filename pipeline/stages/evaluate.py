"""Stage `evaluate`: validation loss, perplexity, bits per byte, token accuracy, and a length sweep.

Bits per byte divide the summed loss (in bits) by the UTF-8 bytes the scored
tokens stand for, so runs with different tokenizers compare. As a floor to beat,
the stage also scores a unigram model of the training tokens (add-one smoothed)
on the same validation targets. The sweep scores the same validation stream at
multiples of the training context (length extrapolation) and records the loss by
position within the window, averaged over buckets of positions; RoPE models can
also be swept past their context with inference-time scaling (`linear`, `ntk`,
`yarn`, factor = length / training context). Learned position tables cannot
score windows longer than the table: those lengths are reported as unsupported,
never guessed. With `sliding_window`, windows overlap by `window - stride` tokens
and each scores only the targets no earlier window scored, so every token is
scored once with at least `window - stride` tokens of context (the first window
of a shard scores all of its targets). The work runs as one Ray task (a GPU one
when the cluster has GPUs); `evaluate_model` is the same work without Ray.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.artifacts import MODEL_FILES
from pipeline.cluster.resources import task_options
from pipeline.config import Config, EvaluateConfig, fingerprint_view
from pipeline.engine.stage import Stage, StageContext
from pipeline.engine.store import StageRef
from pipeline.plots import line_chart
from tokenization.inputs import InputError
from tokenization.shards import shard_paths

Window = tuple[int, int, int]  # (buffer, first token, first scored target within the window)


@dataclass(frozen=True)
class EvalOptions:
    multipliers: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
    max_tokens: int = 200_000  # scored targets per length (a window more at most)
    batch_size: int = 8  # windows of the training context per forward; longer windows get fewer
    sliding_window: bool = False
    stride: int | None = None  # sliding-window step (default: half the window)
    rope_scalings: tuple[str, ...] = ("none",)
    position_buckets: int = 16

    @classmethod
    def from_config(cls, e: EvaluateConfig) -> EvalOptions:
        return cls(multipliers=tuple(e.context_multipliers), max_tokens=e.max_tokens, batch_size=e.batch_size,
                   sliding_window=e.sliding_window, stride=e.stride, rope_scalings=tuple(e.rope_scalings),
                   position_buckets=e.position_buckets)


def _section(cfg: Config) -> dict[str, Any]:
    return fingerprint_view(cfg.evaluate)


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


@torch.no_grad()
def score_windows(model: torch.nn.Module, buffers: list[np.ndarray], plan: list[Window], *, L: int, batch_size: int,
                  byte_lengths: np.ndarray, unigram_logp: np.ndarray | None = None,
                  position_buckets: int = 16) -> dict[str, Any]:
    """Loss, perplexity, bits per byte, token accuracy and loss by position over the planned windows."""
    assert plan, f"no window of {L} tokens fits in the validation data"
    device = next(model.parameters()).device
    nats = correct = tokens = nbytes = uni = 0.0
    pos_nats, pos_count = np.zeros(L), np.zeros(L)
    for i in range(0, len(plan), batch_size):
        chunk = plan[i : i + batch_size]
        batch = torch.from_numpy(np.stack([buffers[b][s : s + L + 1].astype(np.int64) for b, s, _ in chunk])).to(device)
        x, y = batch[:, :-1], batch[:, 1:]  # (b, L), (b, L)
        logits = model(x).float()  # (b, L, vocab)
        loss = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # (b, L)
        keep = torch.arange(L, device=device)[None] >= torch.tensor([k for *_, k in chunk], device=device)[:, None]
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
    out = {"loss": nats / tokens, "ppl": math.exp(min(nats / tokens, 700.0)), "bpb": nats / math.log(2) / max(1.0, nbytes),
           "token_accuracy": correct / tokens, "tokens": tokens,
           "loss_by_position": _buckets(pos_nats, pos_count, position_buckets)}
    if unigram_logp is not None:
        out["unigram_loss"] = uni / tokens
    return out


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
                  byte_lengths: np.ndarray, unigram_logp: np.ndarray | None = None) -> dict[str, Any] | None:
    """None when no validation shard holds a window of L + 1 tokens."""
    stride = min(L, opts.stride or max(1, L // 2)) if opts.sliding_window else L
    plan = window_plan([len(b) for b in buffers], L, stride=stride, max_targets=opts.max_tokens)
    if not plan:
        return None
    return score_windows(model, buffers, plan, L=L, batch_size=max(1, opts.batch_size * train_seq_len // L),
                         byte_lengths=byte_lengths, unigram_logp=unigram_logp, position_buckets=opts.position_buckets)


def sweep(model: torch.nn.Module, val_buffers: list[np.ndarray], *, train_seq_len: int, opts: EvalOptions,
          byte_lengths: np.ndarray, unigram_logp: np.ndarray) -> dict[str, Any]:
    """Every metric of the stage: the unscaled sweep (`lengths`), RoPE-scaled sweeps (`rope_scaled`), notes."""
    metrics: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    for m in sorted(set(opts.multipliers) | {1.0}):
        L = max(2, int(round(train_seq_len * m)))
        if not model.supports_length(L):
            rows.append({"multiplier": m, "context": L, "supported": False})
            continue
        r = _score_length(model, val_buffers, L, train_seq_len=train_seq_len, opts=opts, byte_lengths=byte_lengths,
                          unigram_logp=unigram_logp if m == 1.0 else None)
        if r is None:
            if m == 1.0:
                raise InputError(f"evaluate: no validation shard holds a window of the training context ({L} + 1 tokens); "
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
    scaled, note = _rope_scaled(model, val_buffers, train_seq_len=train_seq_len, opts=opts, byte_lengths=byte_lengths,
                                metrics=metrics)
    return {"metrics": metrics, "lengths": rows, "rope_scaled": scaled, "notes": notes + note,
            "train_seq_len": train_seq_len, "sliding_window": opts.sliding_window, "stride": opts.stride}


def _rope_scaled(model: torch.nn.Module, buffers: list[np.ndarray], *, train_seq_len: int, opts: EvalOptions,
                 byte_lengths: np.ndarray, metrics: dict[str, float]) -> tuple[dict[str, list], list[str]]:
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
            for m in sorted(x for x in set(opts.multipliers) if x > 1.0):
                L = max(2, int(round(train_seq_len * m)))
                model.set_rope_scaling(kind, L / train_seq_len, original_max_seq_len=train_seq_len)
                r = _score_length(model, buffers, L, train_seq_len=train_seq_len, opts=opts, byte_lengths=byte_lengths)
                if r is None:
                    continue
                out[kind].append({"multiplier": m, "context": L, "factor": L / train_seq_len, "supported": True, **r})
                metrics.update({f"ppl_ctx_{L}_{kind}": r["ppl"], f"loss_ctx_{L}_{kind}": r["loss"],
                                f"bpb_ctx_{L}_{kind}": r["bpb"]})
    finally:
        model.set_rope_scaling(trained.rope_scaling, trained.rope_factor,
                               original_max_seq_len=trained.rope_original_max_seq_len)
    return out, []


def evaluate_model(model_dir: str, val_shards: list[str], train_shards: list[str], *, train_seq_len: int,
                   opts: EvalOptions) -> dict[str, Any]:
    """The whole stage's work as a plain function (no Ray): load, score, return eval.json's content."""
    from model import load_model
    from tokenization.bpe import load_tokenizer, token_byte_lengths
    from tokenization.shards import read_tokens

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = load_model(model_dir, device=device)
    byte_lengths = token_byte_lengths(load_tokenizer(f"{model_dir}/tokenizer.json"))
    val = [b for b in (read_tokens(p) for p in val_shards) if len(b)]
    unigram = unigram_logprobs([read_tokens(p) for p in train_shards], model.config.vocab_size)
    return sweep(model, val, train_seq_len=train_seq_len, opts=opts, byte_lengths=byte_lengths, unigram_logp=unigram)


def plot(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """extrapolation.png (perplexity by context length, one line per RoPE scaling) and
    loss_by_position.png (loss by position within the window, one line per length)."""
    ok = [r for r in result["lengths"] if r["supported"]]
    series = {"none": [(r["context"], r["ppl"]) for r in ok]}
    for kind, rows in result["rope_scaled"].items():  # scaled lines start from the unscaled value at the context
        series[kind] = [(r["context"], r["ppl"]) for r in ok if r["multiplier"] == 1.0] + [(r["context"], r["ppl"]) for r in rows]
    bad = [r["context"] for r in result["lengths"] if not r["supported"]]
    paths = [out_dir / "extrapolation.png", out_dir / "loss_by_position.png"]
    line_chart(paths[0], series, title=f"validation perplexity by context (trained at {result['train_seq_len']})",
               x_label="context (tokens)", y_label="perplexity", log_x=True, log_y=True,
               note=f"unsupported (learned table): {bad}" if bad else "")
    by_pos = {f"ctx {r['context']}": [((a + b - 1) / 2, v) for a, b, v in zip(*r["loss_by_position"].values()) if v is not None]
              for r in ok}
    line_chart(paths[1], by_pos, title="validation loss by position within the window", x_label="position (tokens)",
               y_label="loss (nats)", log_x=False)
    return paths


def _log_position_curves(ctx: StageContext, result: dict[str, Any]) -> None:
    """`pos_loss_ctx_<T>` as MLflow step series (step = a bucket's first position), drawn as curves in the UI."""
    by_step: dict[int, dict[str, float]] = {}
    for r in result["lengths"]:
        if r["supported"]:
            for start, _, v in zip(*r["loss_by_position"].values()):
                if v is not None:
                    by_step.setdefault(start, {})[f"pos_loss_ctx_{r['context']}"] = v
    for step, values in sorted(by_step.items()):
        ctx.tracker.log_metrics(ctx.run_id, values, step=step)


def _evaluate_task(train: StageRef, prepare: StageRef, **kw: Any) -> dict[str, Any]:
    """On the task's node: open the model and the prepared data there, then evaluate."""
    folder = prepare.local()
    return evaluate_model(str(train.local(list(MODEL_FILES))), shard_paths(folder, split="val"),
                          shard_paths(folder, split="train"), **kw)


def run(ctx: StageContext) -> dict[str, float]:
    import ray

    cfg = ctx.config
    task = ray.remote(_evaluate_task).options(**task_options(cfg.resources.evaluate, "evaluate"))
    result = ray.get(task.remote(ctx.inputs["train"].ref, ctx.inputs["prepare"].ref, train_seq_len=cfg.train_seq_len,
                                 opts=EvalOptions.from_config(cfg.evaluate)))
    (ctx.out_dir / "eval.json").write_text(json.dumps(result, indent=2))
    for path in [ctx.out_dir / "eval.json", *plot(result, ctx.out_dir)]:
        ctx.tracker.log_artifact(ctx.run_id, path)
    _log_position_curves(ctx, result)
    return result["metrics"]


STAGE = Stage(name="evaluate", needs=("tokenizer", "prepare", "train"), section=_section, version=2, run=run,
              params=lambda cfg: cfg.evaluate.model_dump(mode="json"))
