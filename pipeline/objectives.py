"""The training objectives other than next-token prediction, in the pipeline: masked LM (encoders), span
corruption (encoder-decoders) and permutation LM (XLNet).

Each corrupts a window into the model's inputs and targets as a pure function of
(seed, draw, window) (`tokenization.masking.Masker`, `tokenization.spans.SpanCorrupter`,
`tokenization.permutation.Permuter`, which share `model_inputs`, `draw_for`, `check_length` and a
`metric` prefix).
`objective_ids` looks up in the run's tokenizer the ids the objective needs (the
mask token and every special token; the sentinels, the end token and the
decoder's start token, the padding token as in T5), naming the config key when
one is missing; `objective_from_ids` binds them to the options and the seed, on
each training worker and in `evaluate`, from the same ids.

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
from tokenization.pairs import TaskPairs
from tokenization.permutation import PermutationOptions, Permuter
from tokenization.spans import SpanCorrupter, SpanOptions, sentinel_tokens

Objective = Masker | SpanCorrupter | Permuter


def objective_ids(cfg: Config, tokenizer_json: str | Path) -> dict[str, Any] | None:
    """The ids the run's objective needs from its tokenizer ({"kind": ..., ...}); None for causal LM."""
    if cfg.objective == "causal_lm":
        return None
    if cfg.objective == "permutation_lm":  # orders positions: no token of its own
        return {"kind": "permutation_lm"}
    from tokenization.bpe import load_tokenizer

    tok = load_tokenizer(str(tokenizer_json))
    specials = sorted(tok.get_added_tokens_decoder())
    if cfg.objective == "masked_lm":
        mask_id = tok.token_to_id(cfg.train.masking.mask_token)
        if mask_id is None or mask_id not in specials:
            raise ConfigError(f"train.masking.mask_token {cfg.train.masking.mask_token!r} is not a special token of the "
                              f"tokenizer {tokenizer_json}")
        return {"kind": "masked_lm", "mask_id": mask_id, "special_ids": specials}
    eos, pad = tok.token_to_id(cfg.tokenizer.eos_token), tok.token_to_id(PAD)
    if eos is None or pad is None:
        raise ConfigError(f"train.objective {cfg.objective}: the tokenizer {tokenizer_json} has no "
                          f"{cfg.tokenizer.eos_token if eos is None else PAD} (the end token; the decoder's start)")
    if cfg.objective == "seq2seq":
        return {"kind": "seq2seq", "eos_id": eos, "start_id": pad}
    sentinels = [tok.token_to_id(t) for t in sentinel_tokens(cfg.tokenizer.sentinels or 1000)]
    sentinels = sentinels[: sentinels.index(None)] if None in sentinels else sentinels
    spans = cfg.train.spans.shape(cfg.train_seq_len)[1]
    if len(sentinels) < spans:  # a given tokenizer (tokenizer.path): known only now
        raise ConfigError(f"train.objective span_corruption: a window of {cfg.train_seq_len} tokens has {spans} spans "
                          f"but the tokenizer {tokenizer_json} has {len(sentinels)} sentinel tokens (tokenizer.sentinels)")
    return {"kind": "span_corruption", "sentinel_ids": sentinels, "eos_id": eos, "start_id": pad}


def objective_from_ids(ids: dict[str, Any] | None, train: dict[str, Any], vocab_size: int) -> Objective | None:
    """The objective from `objective_ids`' ids and the train section as a dict (what a training worker gets); None
    for causal LM and seq2seq, whose data is not corrupted (seq2seq reads `tokenization.pairs.TaskPairs`)."""
    if ids is None or ids["kind"] == "seq2seq":
        return None
    if ids["kind"] == "permutation_lm":
        return Permuter(PermutationOptions(**train["permutation"]), seed=train["seed"])
    if ids["kind"] == "masked_lm":
        return Masker(MaskingOptions(**train["masking"]), mask_id=ids["mask_id"], special_ids=tuple(ids["special_ids"]),
                      vocab_size=vocab_size, seed=train["seed"])
    return SpanCorrupter(SpanOptions(**train["spans"]), sentinel_ids=tuple(ids["sentinel_ids"]), eos_id=ids["eos_id"],
                         start_id=ids["start_id"], seed=train["seed"])


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
def objective_scores(model: Any, windows: np.ndarray, objective: Objective, *, batch_size: int,
                     unigram_logp: np.ndarray | None = None) -> dict[str, float]:
    """<metric>_loss, _ppl, _accuracy and _tokens (targets scored) over these windows; with the training data's
    unigram log-probabilities, also <metric>_unigram_loss: the loss of predicting every target by its frequency."""
    device = next(model.parameters()).device
    nll, correct, count, unigram = 0.0, 0, 0, 0.0
    for start in range(0, len(windows), batch_size):
        ids = np.arange(start, min(start + batch_size, len(windows)))
        *inputs, targets = (torch.from_numpy(a).to(device) for a in objective.model_inputs(windows[ids], ids, draw=0))
        logits = model(*inputs).float()  # (B, T, vocab)
        chosen = targets >= 0
        nll += float(torch.nn.functional.cross_entropy(logits[chosen], targets[chosen], reduction="sum"))
        correct += int((logits[chosen].argmax(-1) == targets[chosen]).sum())
        count += int(chosen.sum())
        if unigram_logp is not None:
            unigram -= float(unigram_logp[targets[chosen].cpu().numpy()].sum())
    loss, m = nll / count, objective.metric
    out = {f"{m}_loss": loss, f"{m}_ppl": math.exp(min(loss, 700.0)), f"{m}_accuracy": correct / count,
           f"{m}_tokens": float(count)}
    return out | ({f"{m}_unigram_loss": unigram / count} if unigram_logp is not None else {})


def objective_sweep(model: Any, val: list[np.ndarray], *, train_seq_len: int, opts: EvalOptions,
                    objective: Objective, unigram_logp: np.ndarray | None = None) -> dict[str, Any]:
    """eval.json's content for an encoder or an encoder-decoder: the headline metrics at the training length, and
    one row per swept length (`<metric>_loss_ctx_<T>`, `<metric>_accuracy_ctx_<T>` in the metrics). Masked LM
    also gets the unigram baseline on the same targets (`mlm_unigram_loss`); span corruption's targets are half
    sentinels, which the text never holds, so no frequency baseline fits them."""
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
        scores = objective_scores(model, _windows(val, T, opts.max_tokens), objective, batch_size=opts.batch_size,
                                  unigram_logp=unigram_logp if m == "mlm" else None)
        lengths.append({"context": T, "multiplier": mult, "supported": True, **scores})
        metrics |= {f"{m}_loss_ctx_{T}": scores[f"{m}_loss"], f"{m}_accuracy_ctx_{T}": scores[f"{m}_accuracy"]}
        if mult == 1.0:
            metrics |= scores
    return {"family": "encoder" if m == "mlm" else "encoder-decoder", "metric": m, "train_seq_len": train_seq_len,
            "metrics": metrics, "lengths": lengths}


def objective_metrics(model: Any, val: list[np.ndarray], *, T: int, opts: EvalOptions, objective: Objective
                      ) -> dict[str, float]:
    """<metric>_loss, _ppl, _accuracy and _tokens over validation windows of T tokens (XLNet's permutation LM
    beside its left-to-right sweep)."""
    return objective_scores(model, _windows(val, T, opts.max_tokens), objective, batch_size=opts.batch_size)


@torch.inference_mode()
def pairs_scores(model: Any, pairs: TaskPairs, *, max_tokens: int, batch_size: int) -> dict[str, Any]:
    """eval.json's content for seq2seq: over the first validation pairs holding at most `max_tokens` source tokens,
    the mean cross-entropy of the target tokens (`seq2seq_loss`, `_ppl`), how often the top prediction is the target
    token (`seq2seq_accuracy`), and exact match: the share of pairs whose greedy answer is the whole target."""
    from model.generation import generate_batch
    from model.seq2seq import conditioned

    device = next(model.parameters()).device
    n, budget = 0, max_tokens
    while n < len(pairs) and budget >= len(pairs.sources[n]):
        budget -= len(pairs.sources[n])
        n += 1
    if n == 0:
        raise NoWindowError("evaluate: no validation pair (prompt/completion records) to score")
    nll, correct, count, exact = 0.0, 0, 0, 0
    rows = []
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        src, mask, tgt_in, tgt = (torch.from_numpy(a).to(device) for a in pairs.batch(idx))
        logits = model(src, tgt_in, src_mask=mask).float()
        chosen = tgt >= 0
        nll += float(torch.nn.functional.cross_entropy(logits[chosen], tgt[chosen], reduction="sum"))
        correct += int((logits[chosen].argmax(-1) == tgt[chosen]).sum())
        count += int(chosen.sum())
        sources = [pairs.sources[int(i)].tolist() for i in idx]
        targets = [pairs.targets[int(i)].tolist() for i in idx]
        answers = generate_batch(conditioned(model, sources), [[pairs.start_id]] * len(idx),
                                 max_new_tokens=[len(t) for t in targets], temperature=0.0, stop_tokens={pairs.eos_id})
        exact += sum(a == t for a, t in zip(answers, targets))
        rows += [{"source": s, "target": t, "answer": a} for s, t, a in zip(sources, targets, answers)][: max(0, 20 - len(rows))]
    loss = nll / count
    metrics = {"seq2seq_loss": loss, "seq2seq_ppl": math.exp(min(loss, 700.0)), "seq2seq_accuracy": correct / count,
               "seq2seq_tokens": float(count), "exact_match": exact / n, "pairs": float(n)}
    return {"family": "encoder-decoder", "metric": "seq2seq", "metrics": metrics, "lengths": [], "examples": rows}
