"""Task accuracy: multiple-choice and last-word cloze questions scored by log-likelihood, as lm-evaluation-harness does.

Records come as JSON lines in lm-evaluation-harness's shapes. Multiple choice:
HellaSwag-like `{"ctx", "endings", "label"}` (the context is `ctx` as given) or
ARC-like `{"question", "choices": {"text", "label"}, "answerKey"}` (the context is
`"Question: {question}\\nAnswer:"`, lm_eval's ARC prompt). Cloze, LAMBADA-like
`{"text"}`: the context is every word but the last (split on " "), the target
" " + the last word. Every convention is lm_eval's (0.4), so the numbers agree
with `lm_eval` run on the exported Hugging Face folder:

- a choice is scored as the continuation `" " + choice` (the target delimiter);
- a context's trailing whitespace moves to the continuation, and the pair is
  encoded *jointly* (`encode(context + continuation)`, split after the
  context's own tokens): `HFLM._encode_pair`;
- a pair longer than the model's context keeps its last `max_len + 1` tokens;
- `acc` picks the choice of highest log-likelihood, `acc_norm` the highest
  log-likelihood per character of the choice (lm_eval's `len(choice)`, without
  the delimiter); ties go to the first; the cloze's `acc` is whether greedy
  decoding yields the target's tokens exactly (`is_greedy`), its `ppl`
  exp(-mean log-likelihood) of the target;
- a standard error is the sample standard deviation over sqrt(n).

`chance` is what guessing scores: the mean of 1 / choices for multiple choice;
for a cloze, the accuracy of always answering the task's most common target.
Pure PyTorch: the tokenizer comes in as an `encode(str) -> ids` function.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch

Kind = Literal["multiple_choice", "cloze"]
KINDS: tuple[str, ...] = ("multiple_choice", "cloze")
TARGET_DELIMITER = " "  # lm_eval's default between a context and a choice


class TaskFormatError(ValueError):
    """A task record that cannot be scored; the message names the file and line."""


@dataclass(frozen=True)
class Question:
    """One scored record: a context and its continuations (cloze: one, the target), `gold` the right one."""

    context: str
    choices: tuple[str, ...]
    gold: int

    def continuations(self, kind: Kind) -> list[str]:
        """What is scored after the context: the delimiter and a choice, or the cloze target (it holds its space)."""
        return [TARGET_DELIMITER + c for c in self.choices] if kind == "multiple_choice" else list(self.choices)


# --- reading records ------------------------------------------------------------------------------

def _label_index(label: Any, n: int) -> int:
    """A HellaSwag label: an int or a string of digits (the Hub's HellaSwag has "0".."3"), in [0, n)."""
    if isinstance(label, bool) or not (isinstance(label, int) or (isinstance(label, str) and label.strip().isdigit())):
        raise ValueError(f'"label" must be an integer index into "endings", got {json.dumps(label)}')
    i = int(label)
    if not 0 <= i < n:
        raise ValueError(f'"label" {i} is out of range for {n} endings')
    return i


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{what} must be a list of at least 2 non-empty strings")
    return tuple(value)


def _multiple_choice(r: dict[str, Any]) -> Question:
    if "endings" in r or "ctx" in r:  # HellaSwag-like
        if not isinstance(r.get("ctx"), str) or not r["ctx"].strip():
            raise ValueError('"ctx" must be a non-empty string')
        endings = _strings(r.get("endings"), '"endings"')
        if "label" not in r:
            raise ValueError('no "label" (the index of the right ending)')
        return Question(r["ctx"], endings, _label_index(r["label"], len(endings)))
    if "question" in r or "choices" in r:  # ARC-like
        if not isinstance(r.get("question"), str) or not r["question"].strip():
            raise ValueError('"question" must be a non-empty string')
        choices = r.get("choices")
        if not isinstance(choices, dict):
            raise ValueError('"choices" must be an object {"text": [...], "label": [...]}')
        text = _strings(choices.get("text"), '"choices.text"')
        labels = choices.get("label")
        if not isinstance(labels, list) or len(labels) != len(text):
            raise ValueError(f'"choices.label" must be a list of {len(text)} labels, one per choice')
        if "answerKey" not in r:
            raise ValueError('no "answerKey" (the label of the right choice)')
        if r["answerKey"] not in labels:
            raise ValueError(f'"answerKey" {json.dumps(r["answerKey"])} is not one of the labels {json.dumps(labels)}')
        return Question(f"Question: {r['question']}\nAnswer:", text, labels.index(r["answerKey"]))
    raise ValueError('expected {"ctx", "endings", "label"} or {"question", "choices", "answerKey"}')


def _cloze(r: dict[str, Any]) -> Question:
    text = r.get("text")
    if not isinstance(text, str):
        raise ValueError('expected {"text": "..."} (the target is its last word)')  # noqa: TRY004 - bad data, one error kind
    words = text.split(" ")  # lm_eval's lambada: text.split(' ')
    context = " ".join(words[:-1])
    if not context.strip() or not words[-1]:
        raise ValueError('"text" needs a context and a last word after a space')
    return Question(context, (" " + words[-1],), 0)


def parse_record(record: Any, kind: Kind) -> Question:
    """One decoded JSON record as a question; a ValueError says what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")  # noqa: TRY004 - bad data, one error kind
    return _multiple_choice(record) if kind == "multiple_choice" else _cloze(record)


def read_questions(lines: Iterable[str], kind: Kind, *, source: str, limit: int | None = None) -> list[Question]:
    """The questions of a JSON Lines file's lines (blank lines skipped), the first `limit` of them when given.
    Every line is checked, also past the limit: a broken file is an error however much of it is used."""
    assert kind in KINDS, f"unknown task kind {kind!r}"
    out: list[Question] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(parse_record(json.loads(line), kind))
        except json.JSONDecodeError as e:
            raise TaskFormatError(f"{source}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
        except ValueError as e:
            raise TaskFormatError(f"{source}:{n}: {e}") from None
    if not out:
        raise TaskFormatError(f"{source}: holds no records")
    return out[:limit]


# --- scoring ----------------------------------------------------------------------------------------

Encode = Callable[[str], list[int]]


def encode_pair(encode: Encode, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm_eval's `_encode_pair`: trailing whitespace moves from the context to the continuation, then the whole
    string is encoded and split after the context's own tokens (so a merge across the boundary counts as the
    continuation's)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole, ctx = encode(context + continuation), encode(context)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihoods(model: torch.nn.Module, pairs: list[tuple[list[int], list[int]]], *, max_len: int,
                   batch_size: int = 32) -> list[tuple[float, bool]]:
    """(log p(continuation | context), whether greedy decoding gives the continuation) per (context, continuation)
    token pair. Rows are batched longest first and right-padded (a causal model's padding after a row changes
    nothing before it); a pair longer than `max_len` + 1 keeps its last `max_len` + 1 tokens, as lm_eval does."""
    device = next(model.parameters()).device
    out: list[tuple[float, bool] | None] = [None] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        inputs = [(pairs[i][0] + pairs[i][1])[-(max_len + 1):][:-1] for i in rows]
        T = max(len(x) for x in inputs)
        idx = torch.zeros(len(rows), T, dtype=torch.long)
        for r, x in enumerate(inputs):
            idx[r, : len(x)] = torch.tensor(x)
        logp = torch.log_softmax(model(idx.to(device)).float(), dim=-1)  # (B, T, vocab)
        for r, i in enumerate(rows):
            cont = torch.tensor(pairs[i][1], device=device)
            n = len(inputs[r])
            pred = logp[r, n - len(cont) : n]  # (len(cont), vocab): position t predicts token t + 1
            out[i] = (float(pred.gather(1, cont[:, None]).sum()), bool((pred.argmax(-1) == cont).all()))
    return out  # type: ignore[return-value]


def mean_stderr(values: list[float]) -> float:
    """lm_eval's `mean_stderr`: the sample standard deviation / sqrt(n) (0 for a single value, where it is undefined)."""
    n = len(values)
    if n < 2:
        return 0.0
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # the first of equal maxima, as np.argmax


def task_metrics(kind: Kind, questions: list[Question],
                 results: list[list[tuple[float, bool]]]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The task's metrics and one row per question, from each question's (log-likelihood, greedy) per continuation."""
    n = len(questions)
    rows: list[dict[str, Any]] = []
    if kind == "multiple_choice":
        for q, res in zip(questions, results):
            lls = [ll for ll, _ in res]
            pred, pred_norm = _argmax(lls), _argmax([ll / len(c) for ll, c in zip(lls, q.choices)])
            rows.append({"gold": q.gold, "pred": pred, "pred_norm": pred_norm, "loglikelihoods": lls,
                         "acc": float(pred == q.gold), "acc_norm": float(pred_norm == q.gold)})
        acc, acc_norm = [r["acc"] for r in rows], [r["acc_norm"] for r in rows]
        metrics = {"acc": sum(acc) / n, "chance": sum(1 / len(q.choices) for q in questions) / n,
                   "acc_stderr": mean_stderr(acc), "acc_norm": sum(acc_norm) / n, "acc_norm_stderr": mean_stderr(acc_norm)}
    else:
        for q, ((ll, greedy),) in zip(questions, results):
            rows.append({"target": q.choices[0], "loglikelihood": ll, "acc": float(greedy)})
        acc = [r["acc"] for r in rows]
        most_common = Counter(q.choices[0] for q in questions).most_common(1)[0][1]
        mean_ll = sum(r["loglikelihood"] for r in rows) / n
        metrics = {"acc": sum(acc) / n, "chance": most_common / n, "acc_stderr": mean_stderr(acc),
                   "ppl": math.exp(min(-mean_ll, 700.0))}
    return {**metrics, "n": float(n)}, rows


def score_task(model: torch.nn.Module, encode: Encode, questions: list[Question], kind: Kind, *, source: str = "task",
               batch_size: int = 32) -> dict[str, Any]:
    """`{"metrics", "records"}` of one task. A continuation longer than the model's context cannot be scored:
    a TaskFormatError naming the record."""
    max_len = model.config.max_seq_len
    pairs, owner = [], []
    for k, q in enumerate(questions):
        for cont in q.continuations(kind):
            ctx, tokens = encode_pair(encode, q.context, cont)
            if not tokens or len(tokens) > max_len:
                raise TaskFormatError(f"{source}: record {k + 1}: a continuation of {len(tokens)} tokens does not fit "
                                      f"the model's context of {max_len}")
            pairs.append((ctx, tokens))
            owner.append(k)
    flat = loglikelihoods(model, pairs, max_len=max_len, batch_size=batch_size)
    results: list[list[tuple[float, bool]]] = [[] for _ in questions]
    for k, r in zip(owner, flat):
        results[k].append(r)
    metrics, rows = task_metrics(kind, questions, results)
    return {"metrics": metrics, "records": rows}
