"""Retrieval-augmented inputs: retrieved passages as a token prefix within a context budget, and scoring targets after it.

The template is deliberately plain, so a small model trained on ordinary text
can use it: each passage's text followed by a blank line (`SEPARATOR`), best
passage first, then the prompt (or the document being scored). A block longer
than its budget is cut at its end, so the lowest-ranked passage loses its tail
first; the final blank line is always kept, so the prompt starts its own
paragraph. `score_targets` gives the summed loss and bytes of the last n
tokens of each sequence (each predicted from everything before it), so the
same targets can be scored with a passage prefix and without one.
Pure PyTorch and NumPy: the tokenizer is anything with `encode(text,
add_special_tokens=False).ids` (a `tokenizers.Tokenizer`), hits are
`model.retrieval.Hit`s.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model.retrieval import Hit

SEPARATOR = "\n\n"
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class RetrieveOptions:
    """Retrieval in `evaluate`: each validation document's first tokens are the query, the rest is scored with and
    without the retrieved passages in front (the `evaluate.retrieve` config section)."""

    __pydantic_config__ = {"extra": "forbid", "use_attribute_docstrings": True, "allow_inf_nan": False}

    k: int = 4
    """Passages retrieved per document (never from the document itself)."""
    query_tokens: int = 32
    """The document's first tokens, decoded to text, are the query; they stay in front of the scored targets."""
    target_tokens: int = 32
    """Tokens after the query scored per document (fewer when the document is shorter)."""
    max_docs: int = 256
    """Validation documents scored (the first ones in shard order that hold more than query_tokens tokens)."""

    def __post_init__(self) -> None:
        for name in ("k", "query_tokens", "target_tokens", "max_docs"):
            if getattr(self, name) < 1:
                raise ValueError(f"RetrieveOptions.{name}: must be >= 1, got {getattr(self, name)}")


def passage_prefix(tokenizer: Any, hits: Sequence[Hit], budget: int) -> list[int]:
    """Token ids of the passages (each followed by `SEPARATOR`), at most `budget` tokens; [] when nothing fits."""
    sep = tokenizer.encode(SEPARATOR, add_special_tokens=False).ids
    if budget <= len(sep) or not hits:
        return []
    ids: list[int] = []
    for h in hits:
        ids += tokenizer.encode(h.text, add_special_tokens=False).ids + sep
    return ids if len(ids) <= budget else ids[: budget - len(sep)] + sep


def sources(hits: Sequence[Hit]) -> list[dict[str, Any]]:
    """What a sample cites: passage id, file:line and retrieval score of each hit, best first."""
    return [{"passage_id": h.passage_id, "file": h.file, "line": h.line, "score": round(h.score, 6)} for h in hits]


@torch.no_grad()
def score_targets(model: torch.nn.Module, rows: Sequence[tuple[Sequence[int], int]], byte_lengths: np.ndarray, *,
                  batch_size: int = 8) -> list[tuple[float, float]]:
    """(summed nats, summed UTF-8 bytes) of the last `n` tokens of each `(sequence, n)` row, each token predicted
    from everything before it. Rows are right-padded: the model is causal, so padding never reaches them."""
    device = next(model.parameters()).device
    out: list[tuple[float, float]] = []
    for at in range(0, len(rows), batch_size):
        chunk = rows[at:at + batch_size]
        T = max(len(s) for s, _ in chunk) - 1
        x = torch.zeros((len(chunk), T), dtype=torch.long)
        for r, (s, _) in enumerate(chunk):
            x[r, :len(s) - 1] = torch.as_tensor(list(s[:-1]))
        logp = F.log_softmax(model(x.to(device)).float(), dim=-1).cpu()  # (B, T, vocab)
        for r, (s, n) in enumerate(chunk):
            ys = torch.as_tensor(list(s[len(s) - n:]))
            pred = logp[r, len(s) - 1 - n:len(s) - 1]  # position t predicts token t + 1
            out.append((-float(pred.gather(1, ys[:, None]).sum()), float(byte_lengths[ys.numpy()].sum())))
    return out


def answer_matches(completion: str, answer: str) -> bool:
    """Exact match of the completion's first words with the answer's words (case and punctuation ignored)."""
    want = _WORD.findall(answer.lower())
    return bool(want) and _WORD.findall(completion.lower())[:len(want)] == want
