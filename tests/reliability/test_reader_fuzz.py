"""Hypothesis fuzzing of the data path: JSONL files of arbitrary byte lines mixed with good records, read
whole and in arbitrary byte ranges, where every non-blank line is either a document or one counted skip at
its own line number and no good line is ever lost; and long documents tokenized (and trained on) in pieces,
which must give exactly the tokens and merges of the whole text."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.reliability.test_bad_inputs import _utf8
from tokenization.bpe import encode_documents, split_text, splits_safely, train_bpe
from tokenization.inputs import InputError, Piece
from tokenization.readers import SkipLog, iter_documents

good_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)  # any valid Unicode, "\n" included
raw_line = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b'{"text": "caf\xe9"}', b'{"text": "\\ud800"}', b'{"text": "a\x00b"}', b'{"text": 3}', b'[1, 2]',
                     b'{"body": "x"}', b'{"text": "ok"', b"\xef\xbb\xbf{}", b"\r", b" \t ", b'{"text": "\\udfff\\ud800"}']),
).map(lambda b: b.replace(b"\n", b""))
line = st.one_of(st.tuples(st.just("good"), good_text, st.booleans()), st.tuples(st.just("raw"), raw_line, st.none()))


def _encode(kind: str, value, ascii_only: bool | None) -> bytes:
    return json.dumps({"text": value}, ensure_ascii=ascii_only).encode("utf-8") if kind == "good" else value


def _read(path: Path, edges: list[int], log: SkipLog | None) -> list[str]:
    """The documents of the byte ranges between `edges`, in order (`log=None` is on_error=raise)."""
    size = path.stat().st_size
    return [d for a, b in zip(edges, edges[1:]) for d in iter_documents(Piece(str(path), a, b, size), log=log)]


@settings(max_examples=150, deadline=None)
@given(lines=st.lists(line, min_size=1, max_size=30).filter(lambda ls: any(k == "good" for k, _, _ in ls)),
       cuts=st.lists(st.integers(min_value=1, max_value=4000), max_size=5))
def test_every_jsonl_line_is_a_document_or_a_counted_skip_at_its_line_and_good_lines_are_never_lost(tmp_path_factory,
                                                                                                    lines, cuts):
    path = tmp_path_factory.mktemp("fuzz") / "f.jsonl"
    encoded = [_encode(*item) for item in lines]
    path.write_bytes(b"\n".join(encoded) + b"\n")
    size = path.stat().st_size
    edges = sorted({0, size, *(c % size for c in cuts)})

    log = SkipLog()
    docs = _read(path, edges, log)
    skipped = [int(r["where"].rsplit(":", 1)[1]) for r in log.records]
    assert all(r["where"] == f"{path}:{n}" for r, n in zip(log.records, skipped))
    assert skipped == sorted(set(skipped)) and sum(log.counts.values()) == len(skipped)  # each once, in file order
    assert not any(lines[n - 1][0] == "good" for n in skipped)  # a good record is never the one skipped
    nonblank = [n for n, b in enumerate(encoded, 1) if b.strip()]
    expected = [lines[n - 1][1] if lines[n - 1][0] == "good" else json.loads(encoded[n - 1])["text"]
                for n in nonblank if n not in skipped]  # a raw line kept must really have been a JSON record
    assert docs == expected and len(docs) + len(skipped) == len(nonblank)
    assert all(map(_utf8, docs))  # nothing that cannot be written as UTF-8 gets through

    if skipped:  # on_error=raise stops at the first bad line, naming it
        with pytest.raises(InputError) as e:
            _read(path, edges, None)
        assert str(e.value).startswith(f"{path}:{skipped[0]}: ")
    else:
        assert _read(path, edges, None) == docs


# Characters and strings where a cut could go wrong: Unicode spaces, a separator Python calls space but GPT-2's
# regex does not (\x1c), contractions, a combining accent, the special token itself, CRLF, runs of spaces.
PARTS = list("ab XY\n\t.,'!09é\u00a0\u2003日😀\x1c\u0301") + ["'s", "<|endoftext|>", "  ", "\r\n"]
texts = st.lists(st.lists(st.sampled_from(PARTS), max_size=150).map("".join), min_size=1, max_size=5)


@pytest.fixture(scope="module")
def bpe():
    rng = random.Random(0)
    return train_bpe(["".join(rng.choice(PARTS) for _ in range(3000)) for _ in range(10)], vocab_size=400)


@settings(max_examples=100, deadline=None)
@given(batch=texts, piece_chars=st.integers(min_value=1, max_value=40), batch_chars=st.integers(min_value=1, max_value=200))
def test_a_document_encoded_in_pieces_has_exactly_the_tokens_of_the_whole(bpe, batch, piece_chars, batch_chars):
    assert all("".join(split_text(t, piece_chars)) == t for t in batch)
    whole = [e.ids for e in bpe.encode_batch(batch, add_special_tokens=False)]
    pieces = encode_documents(bpe, batch, np.dtype(np.uint32), piece_chars=piece_chars, batch_chars=batch_chars)
    assert [p.tolist() for p in pieces] == whole


@settings(max_examples=30, deadline=None)
@given(corpus=texts, piece_chars=st.integers(min_value=1, max_value=40))
def test_training_on_pieces_learns_exactly_the_merges_of_the_whole_texts(corpus, piece_chars):
    whole = train_bpe(corpus, vocab_size=320, min_frequency=1).to_str()
    assert train_bpe([p for t in corpus for p in split_text(t, piece_chars)], vocab_size=320, min_frequency=1).to_str() == whole


def test_only_tokenizers_whose_pre_tokenizer_allows_it_are_cut(bpe):
    from tokenizers import Tokenizer, models, pre_tokenizers

    assert splits_safely(bpe)
    metaspace = Tokenizer(models.BPE())
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace()  # SentencePiece-style: every piece would gain a "▁"
    assert not splits_safely(metaspace)
    spaced = train_bpe(["a b c"], vocab_size=270, special_tokens=["<end of text>"])  # a special token with a space
    assert not splits_safely(spaced)
