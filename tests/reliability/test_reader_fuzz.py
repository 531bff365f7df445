"""Hypothesis fuzzing of the data path: JSONL files of arbitrary byte lines mixed with good records (and lines
large enough to reach Python's limits: 200,000 nested brackets, numbers of thousands of digits, lines of
hundreds of kilobytes), read whole and in arbitrary byte ranges, where every non-blank line is either a
document or one counted skip at its own line number and no good line is ever lost; the same lines compressed
(.jsonl.gz, .jsonl.zst) with a byte corrupted, and Parquet files cut short or corrupted, from which nothing
but documents, counted skips and `InputError` ever comes; `.json` arrays parsed in chunks of any size exactly
as `json` parses them whole; and long documents tokenized (and trained on) in pieces, which must give exactly
the tokens and merges of the whole text."""

from __future__ import annotations

import gzip
import io
import json
import random
from decimal import Decimal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.reliability.test_bad_inputs import _utf8
from tokenization.bpe import encode_documents, split_text, splits_safely, train_bpe
from tokenization.inputs import InputError, Piece
from tokenization.readers import BOM, SkipLog, iter_documents
from tokenization.records import iter_json_array

good_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)  # any valid Unicode, "\n" included
big = st.integers(min_value=1_000, max_value=200_000)
large_line = st.one_of(  # past Python's recursion limit, its 4,300-digit int limit, and far past a 40-byte line
    st.builds(lambda n, c: c * n, big, st.sampled_from([b"[", b'{"a":', b"[{}"])),
    big.map(lambda n: b'{"text": ' + b"7" * n + b"}"),
    big.map(lambda n: b'{"text": "kept beside a long number", "n": -' + b"9" * n + b"}"),
    st.builds(lambda n, ch: b'{"text": "' + ch * n + b'"}', big, st.sampled_from([b"x", b"\xc3\xa9", b"\\n", b"\xff"])),
)
raw_line = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b'{"text": "caf\xe9"}', b'{"text": "\\ud800"}', b'{"text": "a\x00b"}', b'{"text": 3}', b'[1, 2]',
                     b'{"body": "x"}', b'{"text": "ok"', b"\xef\xbb\xbf{}", b"\r", b" \t ", b'{"text": "\\udfff\\ud800"}',
                     BOM + b'{"text": "after a byte order mark"}']),
    large_line,
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
       cuts=st.lists(st.integers(min_value=1, max_value=10_000_000), max_size=5))
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
    seen = [encoded[0].removeprefix(BOM), *encoded[1:]]  # a byte order mark starting the file is not part of line 1
    nonblank = [n for n, b in enumerate(seen, 1) if b.strip()]
    expected = [lines[n - 1][1] if lines[n - 1][0] == "good" else json.loads(seen[n - 1], parse_int=Decimal)["text"]
                for n in nonblank if n not in skipped]  # a raw line kept must really have been a JSON record
    assert docs == expected and len(docs) + len(skipped) == len(nonblank)
    assert all(map(_utf8, docs))  # nothing that cannot be written as UTF-8 gets through

    if skipped:  # on_error=raise stops at the first bad line, naming it
        with pytest.raises(InputError) as e:
            _read(path, edges, None)
        assert str(e.value).startswith(f"{path}:{skipped[0]}: ")
    else:
        assert _read(path, edges, None) == docs


def _compress(kind: str, data: bytes) -> bytes:
    if kind == ".jsonl.gz":
        return gzip.compress(data, mtime=0)
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as out:
        out.write(data)
    return sink.getvalue().to_pybytes()


def _only_documents_skips_or_one_input_error(path: Path) -> tuple[list[str], SkipLog]:
    """Read `path` under skip (nothing may escape) and under raise (only one `InputError` line naming it may)."""
    log = SkipLog()
    docs = list(iter_documents(str(path), log=log))
    assert all(map(_utf8, docs)) and all(r["where"].startswith(str(path)) for r in log.records)
    try:
        assert list(iter_documents(str(path))) == docs
    except InputError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e) and log.records
    return docs, log


@settings(max_examples=80, deadline=None)
@given(lines=st.lists(line, min_size=1, max_size=20), kind=st.sampled_from([".jsonl.gz", ".jsonl.zst"]),
       at=st.integers(min_value=0), value=st.integers(min_value=0, max_value=255))
def test_compressed_jsonl_reads_like_plain_jsonl_and_a_corrupted_byte_is_only_ever_a_counted_skip(tmp_path_factory, lines,
                                                                                                 kind, at, value):
    folder = tmp_path_factory.mktemp("packed")
    data = b"\n".join(_encode(*item) for item in lines) + b"\n"
    (folder / "f.jsonl").write_bytes(data)
    packed = _compress(kind, data)
    (folder / f"f{kind}").write_bytes(packed)
    plain, compressed = SkipLog(), SkipLog()
    assert list(iter_documents(str(folder / f"f{kind}"), log=compressed)) == list(iter_documents(str(folder / "f.jsonl"),
                                                                                                 log=plain))
    assert [(r["where"].removeprefix(f"{folder}/f{kind}"), r["reason"]) for r in compressed.records] == \
           [(r["where"].removeprefix(f"{folder}/f.jsonl"), r["reason"]) for r in plain.records]  # the same lines

    broken = bytearray(packed)
    broken[at % len(broken)] = value
    (folder / f"g{kind}").write_bytes(bytes(broken))
    _only_documents_skips_or_one_input_error(folder / f"g{kind}")


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(st.one_of(st.none(), good_text), min_size=1, max_size=300), group=st.integers(min_value=1, max_value=80),
       damage=st.sampled_from(["cut", "byte"]), at=st.integers(min_value=0), value=st.integers(min_value=0, max_value=255))
def test_a_parquet_file_cut_short_or_corrupted_is_only_ever_documents_and_counted_skips(tmp_path_factory, texts, group,
                                                                                        damage, at, value):
    folder = tmp_path_factory.mktemp("parquet")
    pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), folder / "f.parquet", row_group_size=group)
    log = SkipLog()
    assert list(iter_documents(str(folder / "f.parquet"), log=log)) == [t for t in texts if t is not None]
    assert log.counts == ({"not_a_string": texts.count(None)} if None in texts else {})
    data = bytearray((folder / "f.parquet").read_bytes())
    if damage == "cut":
        data = data[: at % len(data)]
    else:
        data[at % len(data)] = value
    (folder / "g.parquet").write_bytes(bytes(data))
    _only_documents_skips_or_one_input_error(folder / "g.parquet")


json_value = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                          | good_text, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(good_text, inner, max_size=3),
                          max_leaves=12)
element = st.one_of(json_value, good_text, good_text.map(lambda t: {"text": t}))


@settings(max_examples=150, deadline=None)
@given(elements=st.lists(element, max_size=15), indent=st.sampled_from([None, 0, 2]), ascii_only=st.booleans(),
       sizes=st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=8), cut=st.integers(min_value=0))
def test_a_json_array_read_in_chunks_of_any_size_is_what_json_parses_and_a_cut_one_only_ever_counted_skips(
        tmp_path_factory, elements, indent, ascii_only, sizes, cut):
    data = json.dumps(elements, indent=indent, ensure_ascii=ascii_only).encode("utf-8")
    stream, turn = io.BytesIO(data), iter(sizes * (len(data) + 1))
    got = list(iter_json_array(lambda n: stream.read(next(turn))))  # chunk boundaries anywhere, even inside a character
    assert [value for _, value, _ in got] == elements and not any(error for _, _, error in got)
    starts = [line for line, _, _ in got]
    assert starts == sorted(starts) and all(1 <= n <= data.count(b"\n") + 1 for n in starts)

    folder = tmp_path_factory.mktemp("json")
    (folder / "f.json").write_bytes(data[: cut % (len(data) + 1)])
    _only_documents_skips_or_one_input_error(folder / "f.json")


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
