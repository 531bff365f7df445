"""Masked LM in the pipeline: the tokenizer's ids it needs (train and evaluate), and evaluate's measures for an
encoder: masked-LM loss and masked-token accuracy, by context length.

`masking_ids` looks the mask token and the special tokens up in the run's
tokenizer (a mask token the tokenizer lacks is a config error naming
`train.masking.mask_token`); `masker_for` binds them to `train.masking` and the
seed, which is what validation masks with, in training and in `evaluate`.

Validation windows of each swept length T are cut from the start of each
validation shard's token stream (as training cuts them), corrupted with the
masks training uses for validation (`tokenization.masking`, draw 0: the same
masks on every run), and scored at the masked positions only: the mean
cross-entropy there (`mlm_loss`, and its exponential `mlm_ppl`) and how often
the most likely token is the original one (`mlm_accuracy`), over at most
`evaluate.max_tokens` tokens per length. Lengths a learned position table
cannot hold are reported as unsupported, as for decoders.
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
from tokenization.masking import Masker


def masking_ids(cfg: Config, tokenizer_json: str | Path) -> dict[str, Any] | None:
    """Masked LM: the mask token's id and every special token's (never masked, never a random replacement)."""
    if cfg.objective != "masked_lm":
        return None
    from tokenization.bpe import load_tokenizer

    tok = load_tokenizer(str(tokenizer_json))
    specials = sorted(tok.get_added_tokens_decoder())
    mask_id = tok.token_to_id(cfg.train.masking.mask_token)
    if mask_id is None or mask_id not in specials:
        raise ConfigError(f"train.masking.mask_token {cfg.train.masking.mask_token!r} is not a special token of the "
                          f"tokenizer {tokenizer_json}")
    return {"mask_id": mask_id, "special_ids": specials}


def masker_for(cfg: Config, tokenizer_json: str | Path, vocab_size: int) -> Masker | None:
    """The run's masked-LM corruption (None for causal LM): what validation masks with, in training and evaluation."""
    ids = masking_ids(cfg, tokenizer_json)
    if ids is None:
        return None
    return Masker(cfg.train.masking, mask_id=ids["mask_id"], special_ids=tuple(ids["special_ids"]), vocab_size=vocab_size,
                  seed=cfg.train.seed)


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
def masked_scores(model: Any, windows: np.ndarray, masker: Masker, *, batch_size: int) -> dict[str, float]:
    """mlm_loss, mlm_ppl, mlm_accuracy and masked_tokens over these windows."""
    device = next(model.parameters()).device
    nll, correct, count = 0.0, 0, 0
    for start in range(0, len(windows), batch_size):
        ids = np.arange(start, min(start + batch_size, len(windows)))
        inputs, targets = masker.apply(windows[ids], ids, draw=0)
        logits = model(torch.from_numpy(inputs).to(device)).float()  # (B, T, vocab)
        t = torch.from_numpy(targets).to(device)
        chosen = t >= 0
        nll += float(torch.nn.functional.cross_entropy(logits[chosen], t[chosen], reduction="sum"))
        correct += int((logits[chosen].argmax(-1) == t[chosen]).sum())
        count += int(chosen.sum())
    loss = nll / count
    return {"mlm_loss": loss, "mlm_ppl": math.exp(min(loss, 700.0)), "mlm_accuracy": correct / count,
            "masked_tokens": float(count)}


def masked_sweep(model: Any, val: list[np.ndarray], *, train_seq_len: int, opts: EvalOptions,
                 masker: Masker) -> dict[str, Any]:
    """eval.json's content for an encoder: the headline metrics at the training length, and one row per swept
    length (`mlm_loss_ctx_<T>`, `mlm_accuracy_ctx_<T>` in the metrics)."""
    lengths: list[dict[str, Any]] = []
    metrics: dict[str, float] = {}
    for m in sorted(set(opts.context_multipliers) | {1.0}):
        T = max(2, int(round(train_seq_len * m)))
        if not model.supports_length(T):
            lengths.append({"context": T, "multiplier": m, "supported": False})
            continue
        scores = masked_scores(model, _windows(val, T, opts.max_tokens), masker, batch_size=opts.batch_size)
        lengths.append({"context": T, "multiplier": m, "supported": True, **scores})
        metrics |= {f"mlm_loss_ctx_{T}": scores["mlm_loss"], f"mlm_accuracy_ctx_{T}": scores["mlm_accuracy"]}
        if m == 1.0:
            metrics |= scores
    return {"family": "encoder", "train_seq_len": train_seq_len, "metrics": metrics, "lengths": lengths}
