"""Retrieval-augmented evaluation, prompts and the facts check: an `index` stage's retriever put to use.

Shared by `evaluate` (loss and bits per byte of validation documents with and
without retrieved passages), `decode` and `llmpipe generate` (passages
prepended to prompts, each sample citing its sources) and the facts check
(questions answered greedily with and without retrieval, exact match). Like
`pipeline.completion` it imports only torch, `model` and `tokenization`, so it
runs inside any Ray task or server. The template and the scoring are
`model.rag`.

The leakage guard of the evaluation: a validation document's query never
retrieves its own document. Prepare and index read a document the same way
(`tokenization.documents`), so the document's text, hence its `doc_hash`, is
the same in both; here the text is recovered by decoding the document's
token ids (without its EOS), which the byte-level tokenizer reverses exactly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.generation import SamplingOptions
from model.rag import (
    RetrieveOptions,
    answer_matches,
    passage_prefix,
    score_targets,
    sources,
)
from model.retrieval import Retriever
from pipeline.completion import complete
from tokenization.documents import doc_hash
from tokenization.inputs import InputError


def check_k(retriever_size: int, k: int, key: str) -> None:
    """One line naming the config key when k exceeds the passages of the index."""
    if k > retriever_size:
        raise InputError(f"{key}: k={k} exceeds the {retriever_size} passages of the index; lower it or add knowledge")


def open_retriever(folder: str | Path, model: torch.nn.Module, tokenizer: Any) -> Retriever:
    """The retriever an `index` stage folder holds (dense kinds embed queries with this model)."""
    return Retriever.load(folder, model=model, tokenizer=tokenizer)


def document_hash(tokenizer: Any, ids: Sequence[int], eos_id: int | None) -> int:
    """The `doc_hash` of a prepared document: its token ids (EOS dropped) decoded back to its text."""
    ids = [int(t) for t in ids if t != eos_id]
    return doc_hash(tokenizer.decode(ids, skip_special_tokens=False))


def rag_evaluate(model: torch.nn.Module, tokenizer: Any, retriever: Retriever, docs: list[np.ndarray], *,
                 opts: RetrieveOptions, context: int, eos_id: int | None, byte_lengths: np.ndarray,
                 batch_size: int = 8) -> dict[str, Any]:
    """`rag/...` metrics over validation documents: the same targets (the `target_tokens` after each document's first
    `query_tokens`) scored after the document's prefix alone and after the retrieved passages + that prefix, all within
    `context` tokens. Also returns one row per document (its hash, sources, and both losses)."""
    check_k(len(retriever), opts.k, "evaluate.retrieve.k")
    if opts.query_tokens + opts.target_tokens > context:
        raise InputError(f"evaluate.retrieve: query_tokens + target_tokens ({opts.query_tokens} + {opts.target_tokens}) "
                         f"exceed the training context ({context}): no room for passages")
    picked = []
    for d in docs:
        ids = [int(t) for t in d if t != eos_id]
        if len(ids) > opts.query_tokens:
            picked.append(ids)
        if len(picked) == opts.max_docs:
            break
    if not picked:
        raise InputError(f"evaluate.retrieve.query_tokens: no validation document holds more than {opts.query_tokens} "
                         "tokens; lower it")
    queries = [tokenizer.decode(ids[:opts.query_tokens], skip_special_tokens=False) for ids in picked]
    own = [doc_hash(tokenizer.decode(ids, skip_special_tokens=False)) for ids in picked]
    hits = retriever.search(queries, opts.k, exclude=own)
    base_rows, rag_rows, rows = [], [], []
    for ids, h, found in zip(picked, own, hits):
        n = min(len(ids) - opts.query_tokens, opts.target_tokens)
        doc = ids[:opts.query_tokens + n]
        prefix = passage_prefix(tokenizer, found, context + 1 - len(doc))  # the model reads len(sequence) - 1 tokens
        base_rows.append((doc, n))
        rag_rows.append((prefix + doc, n))
        rows.append({"doc_hash": str(h), "targets": n, "prefix_tokens": len(prefix), "sources": sources(found)})
    totals = {}
    for key, scored in (("base", base_rows), ("rag", rag_rows)):
        per_doc = score_targets(model, scored, byte_lengths, batch_size=batch_size)
        for row, (nats, _) in zip(rows, per_doc):
            row[f"{key}_loss"] = nats / row["targets"]
        nats, nbytes = (sum(x) for x in zip(*per_doc))
        count = sum(n for _, n in scored)
        totals[key] = (nats / count, nats / math.log(2) / max(1.0, nbytes))
    (base_loss, base_bpb), (rag_loss, rag_bpb) = totals["base"], totals["rag"]
    metrics = {"rag/loss": rag_loss, "rag/bpb": rag_bpb, "rag/base_loss": base_loss, "rag/base_bpb": base_bpb,
               "rag/delta_bpb": rag_bpb - base_bpb, "rag/k": float(opts.k), "rag/docs": float(len(picked)),
               "rag/tokens": float(count), "rag/mean_prefix_tokens": float(np.mean([r["prefix_tokens"] for r in rows]))}
    return {"metrics": metrics, "documents": rows}


def rag_prefixes(model: torch.nn.Module, tokenizer: Any, retriever: Retriever, prompts: list[str], k: int,
                 max_new_tokens: int) -> tuple[list[list[int]], list[list[dict[str, Any]]]]:
    """Each prompt's top-k passages as a token prefix (within the model's context once the prompt and the new tokens
    are in), and the sources they cite."""
    hits = retriever.search(prompts, k)
    prefixes = []
    for prompt, found in zip(prompts, hits):
        used = len(tokenizer.encode(prompt, add_special_tokens=False).ids) + max_new_tokens
        prefixes.append(passage_prefix(tokenizer, found, model.config.max_seq_len - used))
    return prefixes, [sources(found) for found in hits]


def complete_with_retrieval(model: torch.nn.Module, tokenizer: Any, retriever: Retriever | None, prompts: list[str],
                            opts: SamplingOptions, *, k: int | None, eos_token: str, key: str) -> list[dict[str, Any]]:
    """`pipeline.completion.complete`, with each prompt's top-k passages in front when k is set; every row then holds
    its `sources` (passage id, file, line, score). `key` names the setting in errors."""
    if not k:
        return complete(model, tokenizer, prompts, opts, eos_token=eos_token)
    if retriever is None:
        raise InputError(f"{key}: retrieval needs an index (an `index:` section, or --index FOLDER)")
    check_k(len(retriever), k, key)
    prefixes, cited = rag_prefixes(model, tokenizer, retriever, prompts, k, opts.max_new_tokens)
    rows = complete(model, tokenizer, prompts, opts, eos_token=eos_token, prefixes=prefixes)
    for r in rows:
        r["sources"] = cited[prompts.index(r["prompt"])]
    return rows


def read_questions(path: str | Path, key: str = "decode.qa_file") -> list[dict[str, str]]:
    """The facts check's questions: one JSON object per line with string fields "question" and "answer"."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"{key}: {path} not found")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{key}: {path}:{n}: invalid JSON ({e.msg})") from None
        if not (isinstance(item, dict) and isinstance(item.get("question"), str) and isinstance(item.get("answer"), str)):
            raise InputError(f'{key}: {path}:{n}: expected {{"question": "...", "answer": "..."}}')
        out.append({"question": item["question"], "answer": item["answer"]})
    if not out:
        raise InputError(f"{key}: {path} holds no questions")
    return out


def facts_check(model: torch.nn.Module, tokenizer: Any, retriever: Retriever, questions: list[dict[str, str]], k: int,
                *, eos_token: str) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Each question completed greedily with and without its top-k passages; exact match of the completion's first
    words with the answer (`model.rag.answer_matches`). Rows per question, and `rag/facts_em`, `rag/facts_em_base`."""
    check_k(len(retriever), k, "decode.retrieve")
    new = max(len(tokenizer.encode(" " + q["answer"], add_special_tokens=False).ids) for q in questions) + 2
    opts = SamplingOptions(max_new_tokens=new, temperature=0.0, top_k=None, seed=0)
    prompts = [q["question"] for q in questions]
    base = complete(model, tokenizer, prompts, opts, eos_token=eos_token)
    prefixes, cited = rag_prefixes(model, tokenizer, retriever, prompts, k, new)
    rag = complete(model, tokenizer, prompts, opts, eos_token=eos_token, prefixes=prefixes)
    rows = [{"question": q["question"], "answer": q["answer"], "completion": r["completion"],
             "correct": answer_matches(r["completion"], q["answer"]), "completion_base": b["completion"],
             "correct_base": answer_matches(b["completion"], q["answer"]), "sources": json.dumps(c)}
            for q, r, b, c in zip(questions, rag, base, cited)]
    n = len(rows)
    return rows, {"rag/facts_em": sum(r["correct"] for r in rows) / n,
                  "rag/facts_em_base": sum(r["correct_base"] for r in rows) / n, "rag/facts_questions": float(n)}
