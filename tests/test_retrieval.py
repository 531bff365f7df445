"""The retrieval library: passages with provenance, BM25 / dense / hybrid search, the leakage guard, persistence."""

from __future__ import annotations

import json
from collections import Counter
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from model import GPT, ModelConfig
from model.retrieval import Retriever, embed, words
from tests.conftest import WORDS
from tokenization.bpe import train_bpe
from tokenization.documents import DocOptions, doc_hash, documents
from tokenization.inputs import Piece, resolve_inputs
from tokenization.passages import (
    PassageOptions,
    assemble,
    chunk_text,
    file_passages,
    windows,
)
from tokenization.readers import SkipLog

FACT = "The lighthouse keeper Oswin Marrable painted the lamp room vermilion in 1907."
FILLER = WORDS


@pytest.fixture(scope="module")
def knowledge(tmp_path_factory) -> Path:
    """Six text files of filler lines and a JSONL file; the fact is on line 4 of notes_3.txt."""
    root = tmp_path_factory.mktemp("knowledge")
    rng = np.random.default_rng(0)
    for i in range(6):
        lines = [" ".join(rng.choice(FILLER, 10)) for _ in range(8)]
        if i == 3:
            lines[3] = FACT
        (root / f"notes_{i}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    records = [{"text": " ".join(rng.choice(FILLER, 12))} for _ in range(3)]
    (root / "records.jsonl").write_text("\n".join(json.dumps(r) for r in records[:2]) + "\n\n"
                                        + json.dumps(records[2]) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tok(knowledge: Path):
    return train_bpe([p.read_text() for p in sorted(knowledge.iterdir())] * 3, vocab_size=300)


@pytest.fixture(scope="module")
def passages(knowledge: Path, tok):
    table, _, _ = file_passages(resolve_inputs([str(knowledge)]), tok, DocOptions(), PassageOptions(24, 6))
    return table


@pytest.fixture(scope="module")
def tiny_model(tok) -> GPT:
    import torch

    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, d_model=32, max_seq_len=64))


def test_windows_overlap_and_end_at_the_last_token():
    assert windows(0, 4, 1) == []
    assert windows(3, 4, 1) == [(0, 3)]
    assert windows(10, 4, 1) == [(0, 4), (3, 7), (6, 10)]
    assert windows(11, 4, 0) == [(0, 4), (4, 8), (8, 11)]
    with pytest.raises(ValueError, match="overlap"):
        PassageOptions(4, 4)


def test_passages_keep_provenance_and_share_doc_hash_with_documents(knowledge: Path, passages, tok):
    rows = passages.to_pylist()
    assert [r["id"] for r in rows] == list(range(len(rows)))
    fact = [r for r in rows if "Marrable" in r["text"]]
    assert fact and all(r["file"] == "notes_3.txt" for r in fact)
    text = (knowledge / "notes_3.txt").read_text()
    for r in rows:  # a text file's passage starts on the line it says
        if r["file"] == "notes_3.txt":
            start = text.index(r["text"])
            assert r["line"] == text.count("\n", 0, start) + 1
    # a JSON Lines record cites its own line (the blank line 3 is no record)
    assert sorted({r["line"] for r in rows if r["file"] == "records.jsonl"}) == [1, 2, 4]
    # the same documents, the same hashes, as prepare reads them
    files = resolve_inputs([str(knowledge)])
    docs = documents([Piece(f.uri, 0, f.size, f.size) for f in files], DocOptions(), SkipLog(), Counter())
    assert {doc_hash(d) for d in docs} == set(passages.column("doc_hash").to_pylist())
    # overlap: consecutive passages of a document share characters; every passage has at most 24 tokens
    spans = chunk_text(tok, text, PassageOptions(24, 6))
    assert len(spans) > 2 and all(a1 < b0 for (_, b0, _), (a1, _, _) in pairwise(spans))
    assert spans[0][0] == 0 and spans[-1][1] >= len(text.rstrip()) and all(n <= 24 for *_, n in spans)


def test_assemble_is_the_same_whatever_the_grouping_and_drops_duplicates(knowledge: Path, tok, tmp_path: Path):
    (tmp_path / "a.txt").write_text("one fact here\n")
    (tmp_path / "b.txt").write_text("another fact there\n")
    (tmp_path / "c.txt").write_text("one fact here\n")  # a copy of a.txt: kept once
    files = resolve_inputs([str(tmp_path)])
    opts = PassageOptions(4, 1)
    whole, dropped_whole = assemble([file_passages(files, tok, DocOptions(), opts)[0]])
    split, dropped = assemble([file_passages([f], tok, DocOptions(), opts)[0] for f in files])
    assert whole.equals(split) and dropped == 1 and dropped_whole == 0
    assert set(split.column("file").to_pylist()) == {"a.txt", "b.txt"}


def test_bm25_finds_the_planted_fact(passages):
    r = Retriever.build(passages, "bm25")
    (hit, *_), = r.search(["What colour did Oswin Marrable paint the lamp room?"], 3)
    assert "Marrable" in hit.text and hit.file == "notes_3.txt" and hit.score > 0


def test_exclude_never_returns_the_query_document_even_when_it_ranks_first(passages, tiny_model, tok):
    fact_doc = next(r["doc_hash"] for r in passages.to_pylist() if "Marrable" in r["text"])
    n_fact_doc = sum(h == fact_doc for h in passages.column("doc_hash").to_pylist())
    k = len(passages) - n_fact_doc  # every other passage: the guard must not cost any of them
    for kind in ("bm25", "dense", "hybrid"):
        r = Retriever.build(passages, kind, model=tiny_model, tokenizer=tok)
        query = FACT
        assert r.search([query], 1)[0][0].doc_hash == fact_doc, kind  # unguarded, its own document comes first
        hits = r.search([query, query], k, exclude=[fact_doc, None])
        # BM25 returns only passages sharing a word with the query; the guard costs none of those either
        want = k if kind != "bm25" else sum(bool(set(words(t)) & set(words(query))) and h != fact_doc for t, h in
                                            zip(passages.column("text").to_pylist(), passages.column("doc_hash").to_pylist()))
        assert len(hits[0]) == want and all(h.doc_hash != fact_doc for h in hits[0]), kind
        assert len({h.passage_id for h in hits[0]}) == want
        assert hits[1][0].doc_hash == fact_doc


def test_dense_embeddings_are_normalised_and_self_retrieval_works(passages, tiny_model, tok):
    texts = passages.column("text").to_pylist()[:5]
    vectors = embed(tiny_model, [tok.encode(t).ids for t in texts] + [[]], batch_size=2)
    assert vectors.shape == (6, 32) and np.allclose(np.linalg.norm(vectors[:5], axis=1), 1.0, atol=1e-5)
    assert not vectors[5].any()  # an empty sequence embeds to zeros
    r = Retriever.build(passages, "dense", model=tiny_model, tokenizer=tok)
    assert [hits[0].passage_id for hits in r.search(texts, 2)] == list(range(5))


@pytest.mark.parametrize("kind", ["bm25", "hybrid"])
def test_save_and_load_give_identical_results_and_pickle_nothing(passages, tiny_model, tok, tmp_path: Path, kind):
    r = Retriever.build(passages, kind, model=tiny_model, tokenizer=tok)
    files = r.save(tmp_path / "index")
    assert not [f for f in files if f.endswith((".pkl", ".pickle"))]
    for f in files:
        if f.endswith(".npy"):  # plain arrays: loadable without pickle
            np.load(tmp_path / "index" / f, allow_pickle=False)
    again = Retriever.load(tmp_path / "index", model=tiny_model, tokenizer=tok)
    queries = ["Oswin Marrable lamp", "the fool answers with a song", "zzz unknown"]
    assert len(again) == len(r)
    assert again.search(queries, 4, exclude=[None, 1, None]) == r.search(queries, 4, exclude=[None, 1, None])


def test_k_beyond_the_index_and_dense_without_a_model_are_clear_errors(passages, tmp_path: Path, tiny_model, tok):
    r = Retriever.build(passages, "bm25")
    with pytest.raises(ValueError, match=rf"k={len(passages) + 1} .* \({len(passages)}\)"):
        r.search(["x"], len(passages) + 1)
    with pytest.raises(ValueError, match="pass model= and tokenizer="):
        Retriever.build(passages, "dense")
    Retriever.build(passages, "dense", model=tiny_model, tokenizer=tok).save(tmp_path / "d")
    with pytest.raises(ValueError, match="pass model= and tokenizer="):
        Retriever.load(tmp_path / "d")


def test_top_k_is_exact_and_breaks_ties_by_lower_index():
    from model.retrieval import _top

    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 30))
        scores = rng.integers(0, 4, n).astype(np.float32)  # many ties
        scores[rng.random(n) < 0.2] = -np.inf  # excluded passages
        k = int(rng.integers(1, n + 1))
        want = sorted((i for i in range(n) if np.isfinite(scores[i])), key=lambda i: (-scores[i], i))[:k]
        assert _top(scores, k).tolist() == want


def test_bm25_never_returns_a_passage_that_shares_no_word_with_the_query(passages, tiny_model, tok):
    r = Retriever.build(passages, "bm25")
    assert r.search(["zzz qqq"], 3) == [[]]  # nothing in common: nothing to prepend, however large k
    hits = r.search(["Oswin Marrable"], len(passages))[0]
    assert [h.file for h in hits] == ["notes_3.txt"] and hits[0].score > 0  # the one passage naming him, alone
    fused = Retriever.build(passages, "hybrid", model=tiny_model, tokenizer=tok).search(["zzz qqq"], 3)[0]
    assert len(fused) == 3  # hybrid still has its dense list; BM25's zero scores add nothing to the fusion


def test_a_saved_bm25_index_is_the_same_bytes_whatever_the_process_string_hashing():
    """The index stage's output must be a function of its inputs: bm25s numbers a corpus's words in set order,
    which follows PYTHONHASHSEED, so the vocabulary is ours, sorted."""
    import os
    import subprocess
    import sys

    code = ("import hashlib, pathlib, sys, tempfile\n"
            "from model.retrieval import _bm25_index\n"
            "d = tempfile.mkdtemp()\n"
            "_bm25_index(['the king is dead', 'long live the queen', 'a fool thinks he is wise']).save("
            "d, allow_pickle=False, show_progress=False)\n"
            "print(hashlib.sha256(b''.join(p.read_bytes() for p in sorted(pathlib.Path(d).iterdir()))).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                              capture_output=True, text=True, check=True).stdout.split()[-1] for seed in ("1", "2")}
    assert len(digests) == 1
