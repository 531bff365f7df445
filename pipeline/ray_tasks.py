"""The Ray-side entry points of the data stages, kept in a module with light imports.

Ray ships a task to a worker by reference to its module; importing a stage
module there would drag in every stage (torch, DeepSpeed) just to tokenize.
These wrappers import only `tokenization` (numpy, pyarrow, tokenizers) and the
fault-injection hook, and call the plain functions that do the work. The index
task imports `model.retrieval` when it runs, and torch only for the dense kinds
(a BM25 index is built without it).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import faults
from pipeline.engine.store import StageRef

DENSE_KINDS = ("dense", "hybrid")  # index kinds that embed with the trained model


def _limit_threads(num_cpus: float) -> None:
    """Keep HF tokenizers' Rust thread pool to the CPUs Ray reserved for this task (it would
    otherwise start one thread per core in every task). Must run before the pool's first use."""
    os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, int(num_cpus))))


def hash_task(shards: list, indices: list[int], opts: Any) -> list[np.ndarray]:
    from tokenization.corpus import hash_shards

    return hash_shards([shards[i] for i in indices], opts)


def tokenize_task(shards: list, indices: list[int], drops: list[np.ndarray], kw: dict[str, Any], tokenizer: StageRef,
                  output: StageRef, num_cpus: float) -> list[dict]:
    """Tokenize whole shards into the stage folder, wherever this task runs (see `StageRef`)."""
    from tokenization.corpus import tokenize_shard

    _limit_threads(num_cpus)
    tok_path = str(tokenizer.local(["tokenizer.json"]) / "tokenizer.json")
    out_dir = output.output_dir()
    out = []
    for i, drop in zip(indices, drops):
        faults.maybe_fail("prepare.shard", i)
        out.append(tokenize_shard(i, shards[i], drop, tokenizer_path=tok_path, out_dir=str(out_dir), **kw))
    output.publish(out_dir, [sh[split]["file"] for sh in out for split in ("train", "val")])
    return out


def tokenizer_task(files: list, **kw: Any) -> tuple[dict[str, float], str]:
    """Train the BPE; returns its metrics and tokenizer.json's text (small) for the driver to commit."""
    import tempfile

    from tokenization.bpe import build_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        metrics = build_tokenizer(files, out_dir=tmp, **kw)
        return metrics, (Path(tmp) / "tokenizer.json").read_text(encoding="utf-8")


def passages_task(files: list, tokenizer: StageRef, doc_opts: Any, opts: Any, num_cpus: float) -> tuple[Any, dict]:
    """Cut whole knowledge files into passages (the `index` stage): (the table, what was skipped and filtered),
    two Ray objects, so the tables go to the index-building task and only the counts to the driver."""
    from tokenization.bpe import load_tokenizer
    from tokenization.passages import file_passages

    _limit_threads(num_cpus)
    tok = load_tokenizer(tokenizer.local(["tokenizer.json"]) / "tokenizer.json")
    table, log, filtered = file_passages(files, tok, doc_opts, opts)
    return table, {"skipped": dict(log.counts), "skipped_records": log.records, "filtered": dict(filtered)}


def build_index(tables: list, out_dir: Path, *, kind: str, tokenizer_path: str | None = None,
                model_dir: str | None = None) -> dict[str, Any]:
    """Assemble the passage tables of the file groups (in order), build the retriever, save it into `out_dir`:
    its files and sizes."""
    from model.retrieval import Retriever
    from tokenization.passages import assemble

    table, duplicates = assemble(tables)
    if table.num_rows == 0:
        return {"passages": 0, "files": [], "duplicates": duplicates}
    model = tok = None
    t0 = time.perf_counter()
    if kind in DENSE_KINDS:
        import torch

        from model import load_model
        from tokenization.bpe import load_tokenizer

        model, _ = load_model(model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
        tok = load_tokenizer(tokenizer_path)
    retriever = Retriever.build(table, kind, model=model, tokenizer=tok)
    files = retriever.save(out_dir)
    return {"passages": len(retriever), "documents": len(np.unique(table.column("doc_hash").to_numpy())),
            "files": files, "duplicates": duplicates, "build_s": time.perf_counter() - t0,
            "sizes": {f: (out_dir / f).stat().st_size for f in files}}


def index_task(output: StageRef, tokenizer: StageRef, train: StageRef | None, kind: str, *tables) -> dict[str, Any]:
    """On the task's node: open the tokenizer and model there, build, publish the files to the stage folder. The
    tables come as separate arguments: Ray resolves object refs passed at the top level, not inside a list."""
    from pipeline.artifacts import MODEL_FILES

    out_dir = output.output_dir()
    info = build_index(list(tables), out_dir, kind=kind,
                       tokenizer_path=str(tokenizer.local(["tokenizer.json"]) / "tokenizer.json"),
                       model_dir=str(train.local(list(MODEL_FILES))) if train is not None else None)
    output.publish(out_dir, info["files"])
    return info
