"""The training objectives other than next-token prediction, in the pipeline: masked LM (encoders) and span
corruption (encoder-decoders).

Each corrupts a window into the model's inputs and targets as a pure function of
(seed, draw, window) (`tokenization.masking.Masker`, `tokenization.spans.SpanCorrupter`,
which share `model_inputs`, `draw_for`, `check_length` and a `metric` prefix).
`objective_ids` looks up in the run's tokenizer the ids the objective needs (the
mask token and every special token; the sentinels, the end token and the
decoder's start token, the padding token as in T5), naming the config key when
one is missing; `objective_for` binds them to the options and the seed. Training
(`pipeline.stages.train`) rebuilds the same object on each worker from the ids.

`objective_sweep` is the `evaluate` stage's measure for these families:
validation windows of each swept length T are cut from the start of each
validation shard's token stream (as training cuts them), corrupted as
validation in training is (draw 0: the same on every run), and scored on the
targets only: the mean cross-entropy (`<metric>_loss`, `<metric>_ppl`) and how
often the most likely token is the target (`<metric>_accuracy`), over at most
`evaluate.max_tokens` source tokens per length; `mlm_...` for masked LM,
`span_...` for span corruption. Lengths the positions cannot hold (a learned
table) or that need more sentinels than the tokenizer has are reported as
unsupported.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.scoring import EvalOptions, NoWindowError
from pipeline.errors import ConfigError
from pipeline.schema import Config
from tokenization.bpe import PAD
from tokenization.masking import Masker, MaskingOptions
from tokenization.spans import SpanCorrupter, SpanOptions, sentinel_tokens

Objective = Masker | SpanCorrupter


def objective_ids(cfg: Config, tokenizer_json: str | Path) -> dict[str, Any] | None:
    """The ids the run's objective needs from its tokenizer ({"kind": ..., ...}); None for causal LM."""
    if cfg.objective == "causal_lm":
        return None
    from tokenization.bpe import load_tokenizer

    tok = load_tokenizer(str(tokenizer_json))
    specials = sorted(tok.get_added_tokens_decoder())
    if cfg.objective == "masked_lm":
        mask_id = tok.token_to_id(cfg.train.masking.mask_token)
        if mask_id is None or mask_id not in specials:
            raise ConfigError(f"train.masking.mask_token {cfg.train.masking.mask_token!r} is not a special token of the "
                              f"tokenizer {tokenizer_json}")
        return {"kind": "masked_lm", "mask_id": mask_id, "special_ids": specials}
    sentinels = [tok.token_to_id(t) for t in sentinel_tokens(cfg.tokenizer.sentinels or 1000)]
    sentinels = sentinels[: sentinels.index(None)] if None in sentinels else sentinels
    eos, pad = tok.token_to_id(cfg.tokenizer.eos_token), tok.token_to_id(PAD)
    if not sentinels or eos is None or pad is None:
        missing = "sentinel tokens (tokenizer.sentinels)" if not sentinels else f"{cfg.tokenizer.eos_token if eos is None else PAD}"
        raise ConfigError(f"train.objective span_corruption: the tokenizer {tokenizer_json} has no {missing}")
    return {"kind": "span_corruption", "sentinel_ids": sentinels, "eos_id": eos, "start_id": pad}


def objective_from_ids(ids: dict[str, Any] | None, train: dict[str, Any], vocab_size: int) -> Objective | None:
    """The objective from `objective_ids`' ids and the train section as a dict (what a training worker gets)."""
    if ids is None:
        return None
    if ids["kind"] == "masked_lm":
        return Masker(MaskingOptions(**train["masking"]), mask_id=ids["mask_id"], special_ids=tuple(ids["special_ids"]),
                      vocab_size=vocab_size, seed=train["seed"])
    return SpanCorrupter(SpanOptions(**train["spans"]), sentinel_ids=tuple(ids["sentinel_ids"]), eos_id=ids["eos_id"],
                         start_id=ids["start_id"], seed=train["seed"])


def objective_for(cfg: Config, tokenizer_json: str | Path, vocab_size: int) -> Objective | None:
    """The run's objective (None for causal LM): what training corrupts with, and validation with draw 0."""
    return objective_from_ids(objective_ids(cfg, tokenizer_json), cfg.train.model_dump(mode="json"), vocab_size)


def _windows(buffers: list[np.ndarray], T: int, max_tokens: int) -> np.ndarray:
    """(N, T) int64: consecutive windows of each buffer, at most max_tokens tokens in all."""
    rows: list[np.ndarray] = []
    budget = max(1, max_tokens // T)
    for b in buffers:
        for start in range(0, len(b) - T + 1, T):
            if len(rows) == budget:
                return np.stack(rows)
            rows.append(b[start : start + T].astype(np.int64))
    if not rows:
        raise NoWindowError(f"evaluate: no validation document stream holds {T} tokens (a shorter context, or more data)")
    return np.stack(rows)


@torch.inference_mode()
def objective_scores(model: Any, windows: np.ndarray, objective: Objective, *, batch_size: int) -> dict[str, float]:
    """<metric>_loss, _ppl, _accuracy and _tokens (targets scored) over these windows."""
    device = next(model.parameters()).device
    nll, correct, count = 0.0, 0, 0
    for start in range(0, len(windows), batch_size):
        ids = np.arange(start, min(start + batch_size, len(windows)))
        *inputs, targets = (torch.from_numpy(a).to(device) for a in objective.model_inputs(windows[ids], ids, draw=0))
        logits = model(*inputs).float()  # (B, T, vocab)
        chosen = targets >= 0
        nll += float(torch.nn.functional.cross_entropy(logits[chosen], targets[chosen], reduction="sum"))
        correct += int((logits[chosen].argmax(-1) == targets[chosen]).sum())
        count += int(chosen.sum())
    loss, m = nll / count, objective.metric
    return {f"{m}_loss": loss, f"{m}_ppl": math.exp(min(loss, 700.0)), f"{m}_accuracy": correct / count,
            f"{m}_tokens": float(count)}


def objective_sweep(model: Any, val: list[np.ndarray], *, train_seq_len: int, opts: EvalOptions,
                    objective: Objective) -> dict[str, Any]:
    """eval.json's content for an encoder or an encoder-decoder: the headline metrics at the training length, and
    one row per swept length (`<metric>_loss_ctx_<T>`, `<metric>_accuracy_ctx_<T>` in the metrics)."""
    lengths: list[dict[str, Any]] = []
    metrics: dict[str, float] = {}
    m = objective.metric
    for mult in sorted(set(opts.context_multipliers) | {1.0}):
        T = max(2, int(round(train_seq_len * mult)))
        try:
            objective.check_length(T)
        except ValueError as e:
            lengths.append({"context": T, "multiplier": mult, "supported": False, "why": str(e)})
            continue
        if not model.supports_length(T):
            lengths.append({"context": T, "multiplier": mult, "supported": False, "why": "a learned position table"})
            continue
        scores = objective_scores(model, _windows(val, T, opts.max_tokens), objective, batch_size=opts.batch_size)
        lengths.append({"context": T, "multiplier": mult, "supported": True, **scores})
        metrics |= {f"{m}_loss_ctx_{T}": scores[f"{m}_loss"], f"{m}_accuracy_ctx_{T}": scores[f"{m}_accuracy"]}
        if mult == 1.0:
            metrics |= scores
    return {"family": "encoder" if m == "mlm" else "encoder-decoder", "metric": m, "train_seq_len": train_seq_len,
            "metrics": metrics, "lengths": lengths}
