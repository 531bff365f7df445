"""Stage `index` (optional): a knowledge corpus cut into passages and indexed for retrieval.

Enabled by an `index:` section. The driver resolves `index.inputs` (the same
forms as `data.inputs`; their stable names and sha256 enter the fingerprint,
so editing the knowledge corpus reruns `index` and its readers, never
`train`), splits the files into contiguous groups and sends each to a Ray task
that reads its documents exactly as `prepare` would and cuts them into
passages of `index.passage_tokens` tokens with `index.overlap`
(`tokenization.passages`). One more Ray task assembles the groups in file
order (so the output is byte-identical for any `index.num_tasks`), builds the
`model.retrieval.Retriever` of `index.kind` (dense kinds embed with the
trained model, on a GPU when the cluster has one) and writes its files; the
driver adds `index.json` (counts, sizes, build seconds) and `skipped.jsonl`.
`pipeline.ray_tasks.build_index` is the same work without Ray.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import numpy as np

from pipeline import ray_tasks as tasks
from pipeline.cluster.resources import cluster_gpus, task_options
from pipeline.engine.stage import Stage, StageContext
from pipeline.fingerprints import as_dict, fingerprint_view, task_view
from pipeline.ray_tasks import DENSE_KINDS
from pipeline.schema import Config, IndexConfig
from tokenization.inputs import (
    InputError,
    InputFile,
    describe_ignored,
    input_identity,
    resolve_inputs,
)
from tokenization.passages import PassageOptions


def knowledge_files(ix: IndexConfig, ignored: Counter | None = None) -> list[InputFile]:
    """`index.inputs` resolved; errors name `index.inputs` (the resolver speaks of data.inputs, its usual caller)."""
    try:
        return resolve_inputs(ix.inputs, ignored)
    except InputError as e:
        raise InputError(str(e).replace("data.inputs", "index.inputs", 1)) from None


def _section(cfg: Config) -> dict[str, Any]:
    if cfg.index is None:  # the stage is disabled (not in the plan); callers that list every stage still get a section
        return {"index": None}
    ix = task_view(fingerprint_view(cfg.index))  # always text: the task-format keys stay out
    ix["inputs"] = input_identity(knowledge_files(cfg.index))
    return {"index": ix}


def passage_options(ix: IndexConfig) -> PassageOptions:
    return PassageOptions(passage_tokens=ix.passage_tokens, overlap=ix.overlap)


def groups(n: int, num_tasks: int | None) -> list[list[int]]:
    """Contiguous groups of file indices, one per task (default: one file each)."""
    k = min(n, num_tasks or n)
    return [g.tolist() for g in np.array_split(np.arange(n), k) if len(g)]


def run(ctx: StageContext) -> dict[str, float]:
    import ray

    cfg = ctx.config
    ix = cfg.index
    assert ix is not None
    ignored: Counter = Counter()
    files = knowledge_files(ix, ignored)
    if ignored:
        ctx.progress.note(f"warning: {describe_ignored(ignored).replace('data.inputs', 'index.inputs', 1)}")
    res = cfg.resources.index
    chunk = ray.remote(tasks.passages_task).options(**{**task_options(res, "index", max_retries=ix.max_retries),
                                                       "num_gpus": 0, "num_returns": 2})  # text never needs a GPU
    plan = groups(len(files), ix.num_tasks)
    t0 = time.monotonic()
    ctx.progress.update(done=0, total=len(files), status=f"cutting {len(files)} files into passages ({len(plan)} tasks)")
    pairs = [chunk.remote([files[i] for i in g], ctx.inputs["tokenizer"].ref, ix.doc_options(), passage_options(ix),
                         res.num_cpus) for g in plan]
    tables, counts = [t for t, _ in pairs], [c for _, c in pairs]
    pending, done = list(counts), 0
    sizes = {ref: len(g) for ref, g in zip(counts, plan)}
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        done += sizes[ready[0]]
        ctx.progress.update(done=done, total=len(files), status=f"cut {done}/{len(files)} files into passages")
    chunk_s = time.monotonic() - t0
    build_opts = task_options(res, "index", max_retries=ix.max_retries)
    if res.num_gpus is None:  # embedding runs on a GPU when the cluster has one; BM25 on CPUs
        build_opts["num_gpus"] = 1.0 if ix.kind in DENSE_KINDS and cluster_gpus() > 0 else 0.0
    ctx.progress.update(status=f"building the {ix.kind} index (one Ray task)")
    train = ctx.inputs["train"].ref if ix.kind in DENSE_KINDS else None
    info = ray.get(ray.remote(tasks.index_task).options(**build_opts).remote(ctx.output, ctx.inputs["tokenizer"].ref,
                                                                        train, ix.kind, *tables))
    parts = ray.get(counts)  # the tables went to the build task, never through the driver
    return _finish(ctx, info, parts, len(files), chunk_s, sum(ignored.values()))


def _finish(ctx: StageContext, info: dict[str, Any], parts: list[dict[str, Any]], n_files: int, chunk_s: float,
            ignored: int) -> dict[str, float]:
    skipped, filtered = Counter(), Counter()
    with open(ctx.out_dir / "skipped.jsonl", "w", encoding="utf-8") as f:
        for p in parts:
            skipped.update(p["skipped"])
            filtered.update(p["filtered"])
            f.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in p["skipped_records"])
    if info["passages"] == 0:
        raise InputError(f"index.inputs: no passages: the knowledge corpus ({n_files} files) holds no documents "
                         f"(skipped {dict(skipped)}, filtered {dict(filtered)})")
    sizes = info["sizes"]
    index_bytes = sum(v for k, v in sizes.items() if k != "passages.parquet")
    summary = {"kind": ctx.config.index.kind, "passages": info["passages"], "documents": info["documents"],
               "input_files": n_files, "duplicate_documents": info["duplicates"], "build_s": info["build_s"],
               "chunk_s": chunk_s, "index_bytes": index_bytes, "passages_bytes": sizes["passages.parquet"],
               "files": sizes, "skipped": dict(sorted(skipped.items())), "filtered": dict(sorted(filtered.items()))}
    (ctx.out_dir / "index.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    ctx.tracker.log_artifact(ctx.run_id, ctx.out_dir / "index.json")
    metrics = {"passages": float(info["passages"]), "documents": float(info["documents"]), "index_bytes": float(index_bytes),
               "passages_bytes": float(sizes["passages.parquet"]), "build_s": info["build_s"], "chunk_s": chunk_s,
               "input_files": float(n_files), "ignored_files": float(ignored)}
    metrics.update({f"skipped_{k}": float(v) for k, v in skipped.items()})
    metrics.update({f"filtered_{k}": float(v) for k, v in filtered.items()})
    return metrics


STAGE = Stage(name="index", needs=("tokenizer",), section=_section, version=1, run=run, reads_inputs=True,
              params=lambda cfg: as_dict(cfg.index), input_context="retrieval",
              enabled=lambda cfg: cfg.index is not None,
              extra_needs=lambda cfg: ("train",) if cfg.index is not None and cfg.index.kind in DENSE_KINDS else ())
