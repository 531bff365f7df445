"""Stage `evaluate`: validation loss, perplexity, bits per byte, token accuracy, and the
same at multiples of the training context (length extrapolation).

Bits per byte divide the summed loss (in bits) by the UTF-8 bytes the scored
tokens stand for, so runs with different tokenizers compare. As a floor to beat,
the stage also scores a unigram model of the training tokens (add-one smoothed)
on the same validation targets. Learned position tables cannot score windows
longer than the table: those lengths are reported as unsupported, not guessed.
The work runs as one Ray task (a GPU one when the cluster has GPUs).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model import load_model
from pipeline.config import Config, fingerprint_view
from pipeline.stages.prepare import shard_paths
from pipeline.stages.train import seq_len
from pipeline.workflow import Stage, StageContext
from tokenization.bpe import load_tokenizer, token_byte_lengths
from tokenization.dataset import TokenWindows


def _section(cfg: Config) -> dict[str, Any]:
    return fingerprint_view(cfg.evaluate)


@torch.no_grad()
def score(model: torch.nn.Module, windows: TokenWindows, *, max_tokens: int, batch_size: int,
          byte_lengths: np.ndarray, unigram_logp: np.ndarray | None = None) -> dict[str, float]:
    """Sum loss / bytes / correct over the first windows holding up to `max_tokens` targets."""
    device = next(model.parameters()).device
    n = min(len(windows), max(1, max_tokens // windows.seq_len))
    nats = correct = tokens = nbytes = uni = 0.0
    for i in range(0, n, batch_size):
        batch = torch.from_numpy(windows.batch(np.arange(i, min(n, i + batch_size)))).to(device)  # (b, T+1)
        x, y = batch[:, :-1], batch[:, 1:]
        logits = model(x).float()  # (b, T, vocab)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), reduction="none")
        nats += loss.sum().item()
        correct += (logits.argmax(-1) == y).sum().item()
        tokens += y.numel()
        ys = y.cpu().numpy()
        nbytes += float(byte_lengths[ys].sum())
        if unigram_logp is not None:
            uni -= float(unigram_logp[ys].sum())
    out = {"loss": nats / tokens, "ppl": math.exp(nats / tokens), "bpb": nats / math.log(2) / max(1.0, nbytes),
           "token_accuracy": correct / tokens, "tokens": tokens}
    if unigram_logp is not None:
        out["unigram_loss"] = uni / tokens
    return out


def unigram_logprobs(train_shards: list[str], vocab_size: int) -> np.ndarray:
    counts = np.ones(vocab_size, dtype=np.float64)  # add-one smoothing
    for w in TokenWindows(train_shards, 1).buffers:
        counts += np.bincount(w, minlength=vocab_size)[:vocab_size]
    return np.log(counts / counts.sum())


def evaluate_model(model_dir: str, val_shards: list[str], train_shards: list[str], *, train_seq_len: int,
                   multipliers: list[float], max_tokens: int, batch_size: int) -> dict[str, Any]:
    """Plain function (no Ray): every metric of the stage, plus a per-length table."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = load_model(model_dir, device=device)
    byte_lengths = token_byte_lengths(load_tokenizer(f"{model_dir}/tokenizer.json"))
    metrics: dict[str, float] = {}
    table = []
    for m in sorted(set(multipliers) | {1.0}):
        L = max(2, int(round(train_seq_len * m)))
        if not model.supports_length(L):
            table.append({"multiplier": m, "context": L, "supported": False})
            continue
        r = score(model, TokenWindows(val_shards, L), max_tokens=max_tokens, batch_size=batch_size,
                  byte_lengths=byte_lengths,
                  unigram_logp=unigram_logprobs(train_shards, model.config.vocab_size) if m == 1.0 else None)
        table.append({"multiplier": m, "context": L, "supported": True, **r})
        metrics.update({f"ppl_ctx_{L}": r["ppl"], f"loss_ctx_{L}": r["loss"], f"bpb_ctx_{L}": r["bpb"]})
        if m == 1.0:
            metrics.update({"val_loss": r["loss"], "val_ppl": r["ppl"], "val_bpb": r["bpb"],
                            "val_token_accuracy": r["token_accuracy"], "val_tokens": r["tokens"],
                            "unigram_loss": r["unigram_loss"], "unigram_ppl": math.exp(r["unigram_loss"])})
    return {"metrics": metrics, "lengths": table}


def run(ctx: StageContext) -> dict[str, float]:
    import ray

    cfg = ctx.config
    train_dir, prep_dir = ctx.inputs["train"].path, ctx.inputs["prepare"].path
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    task = ray.remote(num_cpus=cfg.evaluate.num_cpus, num_gpus=1 if use_gpu else 0)(evaluate_model)
    result = ray.get(task.remote(str(train_dir), shard_paths(prep_dir, split="val"), shard_paths(prep_dir, split="train"),
                                 train_seq_len=seq_len(cfg), multipliers=cfg.evaluate.context_multipliers,
                                 max_tokens=cfg.evaluate.max_tokens, batch_size=cfg.evaluate.batch_size))
    (ctx.out_dir / "eval.json").write_text(json.dumps(result, indent=2))
    ctx.tracker.log_artifact(ctx.run_id, ctx.out_dir / "eval.json")
    return result["metrics"]


STAGE = Stage(name="evaluate", needs=("tokenizer", "prepare", "train"), section=_section, version=1, run=run,
              params=lambda cfg: cfg.evaluate.model_dump(mode="json"))
