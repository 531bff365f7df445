"""Bad inputs, injected for real: a 100 MB single line (text and JSONL), binary files under text names,
folders and globs with no inputs, file names that are not UTF-8, invalid UTF-8 among good JSONL lines, and
records that used to escape as Python errors (200,000 nested brackets, a 5,000-digit number, a truncated
Parquet file, a corrupted .jsonl.gz); and large compressed, Parquet and text files read in bounded memory.
Each either stops before any work with one line naming the file (and line), or, under
`data.on_error: skip` / `data.max_chars`, becomes exactly one counted skip listed with its file:line while
its neighbours are kept. That is the point against the peers: Hugging Face `datasets` stores invalid UTF-8
from JSON silently, and Ray Data's skip mode drops a whole block with its good lines.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
import tracemalloc
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import cli
from tests.conftest import tiny_raw
from tokenization.documents import DocOptions, documents
from tokenization.inputs import InputError, InputFile, Piece, resolve_inputs, split_file
from tokenization.readers import SkipLog, iter_documents

UNIT = b"the king rides to the sea and speaks. "
HUNDRED_MB = 100_000_000 // len(UNIT)  # repeats of UNIT in a 100 MB line


def _utf8(text: str) -> bool:
    """Whether the string can be written as UTF-8 (a lone surrogate cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _whole(path: Path) -> Piece:
    size = path.stat().st_size
    return Piece(str(path), 0, size, size)


def _peak_bytes(fn) -> tuple[object, int]:
    """fn()'s result and the peak of Python allocations (bytes and str objects) while it ran."""
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _config(tmp_path: Path, inputs: list[str], name: str = "c", **data) -> Path:
    raw = tiny_raw(tmp_path / "unused", tmp_path / f"store-{name}", data={"inputs": inputs, **data})
    raw["tracking"] = {"enabled": False}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# --- a 100 MB single line --------------------------------------------------------------------------------

def test_a_100mb_single_line_text_file_is_held_at_most_twice_and_max_chars_counts_it_too_long(tmp_path):
    path = tmp_path / "huge.txt"
    path.write_bytes(UNIT * HUNDRED_MB)
    size = path.stat().st_size

    filtered: Counter = Counter()
    docs, peak = _peak_bytes(lambda: [len(t) for t in documents([_whole(path)], DocOptions(max_chars=1_000_000),
                                                                 SkipLog(), filtered)])
    assert docs == [] and filtered == Counter({"too_long": 1})
    assert peak < 2.2 * size, f"peak {peak / size:.2f}x the file"  # the bytes and the decoded text, no more copies

    docs, peak = _peak_bytes(lambda: [len(t) for t in documents([_whole(path)], DocOptions(), SkipLog(), Counter())])
    assert docs == [size]  # without a limit it is one valid (ASCII) document, whole
    assert peak < 2.2 * size, f"peak {peak / size:.2f}x the file"


def test_a_100mb_jsonl_line_is_read_once_across_byte_ranges_and_max_chars_counts_it_too_long(tmp_path):
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"text": "before"}\n{"text": "' + UNIT * HUNDRED_MB + b'"}\n{"text": "after"}\n')
    st = path.stat()
    pieces = split_file(InputFile(str(path), st.st_size, st.st_mtime_ns), 8 << 20)
    assert len(pieces) > 10  # the line spans many ranges; exactly one of them owns it

    filtered: Counter = Counter()
    docs, peak = _peak_bytes(lambda: list(documents(pieces, DocOptions(max_chars=1_000_000), SkipLog(), filtered)))
    assert docs == ["before", "after"] and filtered == Counter({"too_long": 1})
    assert peak < 3.3 * st.st_size, f"peak {peak / st.st_size:.2f}x the file"  # the range, the line's text twice while parsed

    lengths = [len(t) for t in documents(pieces, DocOptions(), SkipLog(), Counter())]
    assert lengths == [6, len(UNIT) * HUNDRED_MB, 5]


def test_a_100mb_jsonl_line_with_one_bad_byte_is_one_counted_skip_naming_file_and_line(tmp_path):
    path = tmp_path / "huge.jsonl"
    bad_at = 99_000_000
    line = b'{"text": "' + UNIT * HUNDRED_MB + b'"}\n'
    with open(path, "wb") as f:
        f.write(b'{"text": "before"}\n' + line[:bad_at] + b"\xff" + line[bad_at + 1:] + b'{"text": "after"}\n')
    with pytest.raises(InputError, match=rf"^{path}:2: invalid UTF-8 at byte {bad_at} of the line$"):
        list(iter_documents(_whole(path)))

    log = SkipLog()
    docs, peak = _peak_bytes(lambda: list(iter_documents(_whole(path), log=log)))
    assert docs == ["before", "after"]
    assert log.counts == Counter({"invalid_utf8": 1}) and log.records == [{"where": f"{path}:2", "reason": "invalid_utf8"}]
    assert peak < 3.3 * path.stat().st_size, f"peak {peak / path.stat().st_size:.2f}x the file"  # the line, its text, the error


LONG_DOC = r"""
import resource, sys
import numpy as np
from tokenization.bpe import encode_documents, train_bpe
unit = "the king rides to the sea and speaks. "
tok = train_bpe([unit * 200], vocab_size=300)
text = unit * (int(sys.argv[1]) // len(unit))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ids = encode_documents(tok, [text], np.uint16)[0]
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(len(ids), (after - before) * 1024)
"""


def test_a_long_document_is_tokenized_in_bounded_memory(tmp_path):
    # `tokenizers` holds ~170 bytes per character of a text it encodes whole: 4 MB would cost ~650 MiB, 100 MB ~16 GiB.
    size = 4_000_000
    out = subprocess.run([sys.executable, "-c", LONG_DOC, str(size)], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[2])
    tokens, grew = map(int, out.stdout.split())
    assert tokens > size // 8
    assert grew < 75 * size, f"peak RSS grew by {grew >> 20} MiB for a {size >> 20} MiB document"


# --- records that escaped on_error: skip as Python errors -------------------------------------------------

def _skip_and_raise(path: Path) -> tuple[list[str], SkipLog, str]:
    """The documents and skips under on_error=skip, and the one InputError line under raise."""
    log = SkipLog()
    docs = list(iter_documents(str(path), log=log))
    with pytest.raises(InputError) as e:
        list(iter_documents(str(path)))
    assert "\n" not in str(e.value)
    return docs, log, str(e.value)


def test_a_line_of_200000_brackets_is_one_malformed_record_naming_its_line(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_bytes(b'{"text": "before"}\n' + b"[" * 200_000 + b'\n{"text": "after", "deep": ' + b"[" * 200_000
                     + b"]" * 200_000 + b"}\n")  # a RecursionError in json, even when the JSON itself is valid
    docs, log, error = _skip_and_raise(path)
    assert docs == ["before"]
    assert log.records == [{"where": f"{path}:2", "reason": "malformed_json"}, {"where": f"{path}:3", "reason": "malformed_json"}]
    assert error == f"{path}:2: malformed JSON (nested too deeply)"


def test_a_number_of_5000_digits_is_read_and_is_a_skip_only_where_the_text_should_be(tmp_path):
    path = tmp_path / "digits.jsonl"
    path.write_bytes(b'{"text": "kept", "id": ' + b"7" * 5000 + b'}\n{"text": ' + b"7" * 5000 + b"}\n")
    docs, log, error = _skip_and_raise(path)
    assert docs == ["kept"]  # Python's 4,300-digit limit on int() no longer fails a record over a field we ignore
    assert log.records == [{"where": f"{path}:2", "reason": "not_a_string"}]
    assert error == f"{path}:2: field 'text' is int, not a string"


def test_a_truncated_parquet_file_and_a_damaged_row_group_are_counted_skips_naming_file_and_row_group(tmp_path):
    texts = [f"row {i}: the king rides to the sea" for i in range(400)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "good.parquet", row_group_size=100, compression="none")
    data = (tmp_path / "good.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])  # no footer: ArrowInvalid before any row
    docs, log, error = _skip_and_raise(tmp_path / "cut.parquet")
    assert docs == [] and log.records == [{"where": f"{tmp_path}/cut.parquet", "reason": "unreadable"}]
    assert error.startswith(f"{tmp_path}/cut.parquet: cannot read (ArrowInvalid: Parquet magic bytes not found")

    meta = pq.ParquetFile(tmp_path / "good.parquet").metadata
    page = meta.row_group(2).column(0).data_page_offset  # the third row group's page header, footer intact
    damaged = bytearray(data)
    damaged[page: page + 16] = b"\xff" * 16
    (tmp_path / "damaged.parquet").write_bytes(bytes(damaged))
    docs, log, error = _skip_and_raise(tmp_path / "damaged.parquet")
    assert docs == texts[:200] + texts[300:]  # the other row groups are read
    assert log.records == [{"where": f"{tmp_path}/damaged.parquet: row group 2", "reason": "unreadable"}]
    assert error.startswith(f"{tmp_path}/damaged.parquet: row group 2: cannot read from row 201 on (")


def test_200_random_one_byte_corruptions_of_a_jsonl_gz_are_only_documents_and_counted_skips(tmp_path):
    lines = [json.dumps({"text": f"Letter {i}: the queen writes to the king."}).encode() for i in range(2000)]
    packed = gzip.compress(b"\n".join(lines) + b"\n", mtime=0)
    rng, zlib_errors = random.Random(0), 0
    for _ in range(200):
        broken = bytearray(packed)
        broken[rng.randrange(len(broken))] = rng.randrange(256)
        path = tmp_path / "broken.jsonl.gz"
        path.write_bytes(bytes(broken))
        log = SkipLog()
        docs = list(iter_documents(str(path), log=log))  # nothing escapes
        assert all(map(_utf8, docs)) and all(r["where"].startswith(str(path)) for r in log.records)
        try:
            assert list(iter_documents(str(path))) == docs
        except InputError as e:  # one line naming the file (and the first line lost)
            assert str(e).startswith(str(path)) and "\n" not in str(e)
            zlib_errors += "(zlib.error: " in str(e)
    assert zlib_errors >= 20  # the case that used to escape as a zlib.error traceback is really reached

    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(packed[: len(packed) // 2])
    log = SkipLog()
    docs = list(iter_documents(str(path), log=log))
    n = len(docs)
    assert 100 < n < 2000 and docs == [json.loads(line)["text"] for line in lines[:n]]  # what came before is kept
    assert log.records == [{"where": f"{path}:{n + 1}", "reason": "unreadable"}]
    with pytest.raises(InputError, match=rf"^{path}:{n + 1}: cannot read past line {n} \(EOFError: "):
        list(iter_documents(str(path)))


# --- large files in bounded memory -----------------------------------------------------------------------

READ_ALL = r"""
import collections, sys
from tokenization.documents import DocOptions, documents
from tokenization.inputs import resolve_inputs, split_file
from tokenization.readers import SkipLog


def peak():  # VmHWM, unlike ru_maxrss, starts afresh at exec: the parent's size does not hide the child's
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))


def read(spec):
    (f,) = resolve_inputs([spec])
    n = chars = 0
    for text in documents(split_file(f, 1 << 40), DocOptions(), SkipLog(), collections.Counter()):
        n += 1
        chars += len(text)
    return n, chars


read(sys.argv[1])  # a small file first: thread pools and allocator arenas are not what is measured
before = peak()
n, chars = read(sys.argv[2])
print(n, chars, peak() - before)
"""
LETTER = "Letter {i}: the queen writes to the king of the castle by the sea, and the fool answers with a song. "


def _write_large(path: Path, kind: str, docs: int) -> None:
    """`docs` records (about 41 MB of text for 400,000), written out without holding them."""
    if kind == ".parquet":
        with pq.ParquetWriter(path, pa.schema([("text", pa.string())])) as w:
            for start in range(0, docs, 40_000):  # row groups of about 4 MB of text
                w.write_table(pa.table({"text": [LETTER.format(i=i) for i in range(start, min(docs, start + 40_000))]}))
        return
    with pa.output_stream(str(path), compression="gzip" if kind == ".jsonl.gz" else "zstd") as out:
        for start in range(0, docs, 10_000):
            out.write("".join(json.dumps({"text": LETTER.format(i=i)}) + "\n"
                              for i in range(start, min(docs, start + 10_000))).encode())


@pytest.mark.parametrize("kind", [".jsonl.gz", ".jsonl.zst", ".parquet"])
def test_large_compressed_and_parquet_files_are_read_in_bounded_memory(tmp_path, kind):
    docs = 400_000
    _write_large(tmp_path / f"small{kind}", kind, 50_000)  # two row groups, one full
    _write_large(tmp_path / f"large{kind}", kind, docs)
    out = subprocess.run([sys.executable, "-c", READ_ALL, str(tmp_path / f"small{kind}"), str(tmp_path / f"large{kind}")],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2])
    n, chars, grew = map(int, out.stdout.split())
    assert n == docs and chars > 40_000_000  # about 41 MB of text, read whole
    assert grew < 16 << 20, f"peak RSS grew by {grew >> 20} MiB reading {chars >> 20} MiB of text"  # a chunk or row group


def test_a_text_file_far_over_max_chars_is_read_only_that_far(tmp_path):
    path = tmp_path / "huge.txt"
    path.write_bytes(UNIT * (50_000_000 // len(UNIT)))
    filtered: Counter = Counter()
    docs, peak = _peak_bytes(lambda: list(documents([_whole(path)], DocOptions(max_chars=100_000), SkipLog(), filtered)))
    assert docs == [] and filtered == Counter({"too_long": 1})
    assert peak < 2_000_000, f"peak {peak >> 20} MiB for a 50 MB file over max_chars of 100,000"  # ~4 bytes a character


# --- binary files ----------------------------------------------------------------------------------------

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4
NOISE = random.Random(0).randbytes(4096)
BINARY = [
    ("image.txt", PNG, "binary", r"image\.txt: binary data, not UTF-8 text \(NUL byte at byte 8\)"),
    ("noise.md", NOISE, "binary", rf"noise\.md: binary data, not UTF-8 text \(NUL byte at byte {NOISE.find(0)}\)"),
    ("utf16.txt", "KING: hello".encode("utf-16"), "binary", r"utf16\.txt: binary data, not UTF-8 text \(NUL byte at byte 3\)"),
    ("latin1.md", "café".encode("latin-1"), "invalid_utf8", r"latin1\.md: invalid UTF-8 at byte 3"),
]


@pytest.mark.parametrize("name,data,reason,message", BINARY, ids=[c[0] for c in BINARY])
def test_a_binary_file_under_a_text_name_is_an_error_naming_it_or_one_counted_skip(tmp_path, name, data, reason, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(InputError, match=rf"^{tmp_path}/{message}$"):
        list(iter_documents(str(path)))
    (tmp_path / "good.txt").write_text("KING:\nA good play.\n")
    log = SkipLog()
    assert [d for p in (path, tmp_path / "good.txt") for d in iter_documents(str(p), log=log)] == ["KING:\nA good play.\n"]
    assert log.counts == Counter({reason: 1}) and log.records == [{"where": str(path), "reason": reason}]


def test_nul_bytes_in_jsonl_are_errors_naming_file_and_line_and_skip_only_those_lines(tmp_path):
    path = tmp_path / "nul.jsonl"
    path.write_bytes(b'{"text": "one"}\n{"text": "t\x00o"}\n{"text": "three"}\n\x00\x00\x00\x00\n{"text": "five"}\n')
    with pytest.raises(InputError, match=rf"^{path}:2: malformed JSON \(Invalid control character"):
        list(iter_documents(str(path)))
    log = SkipLog()
    assert list(iter_documents(str(path), log=log)) == ["one", "three", "five"]
    assert log.records == [{"where": f"{path}:2", "reason": "malformed_json"}, {"where": f"{path}:4", "reason": "malformed_json"}]


# --- inputs that name nothing ----------------------------------------------------------------------------

def _no_inputs(tmp_path: Path, case: str) -> tuple[str, str]:
    """(the input spec, the tail of the expected message) for each way of naming no input file."""
    if case == "empty-folder":
        (tmp_path / "empty").mkdir()
        return str(tmp_path / "empty"), ("matches no files: the folder holds no .txt, .md, .jsonl, .jsonl.gz, .jsonl.zst, "
                                         ".json, .parquet files")
    if case == "folder-of-other-files":
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "notes.csv").write_text("a,b\n")
        (tmp_path / "other" / "figure.png").write_bytes(PNG)
        return str(tmp_path / "other"), ("matches no files: the folder holds no .txt, .md, .jsonl, .jsonl.gz, .jsonl.zst, "
                                         ".json, .parquet files (it holds 1 .csv, 1 .png)")
    if case == "glob-matching-nothing":
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "a.txt").write_text("a play")
        return str(tmp_path / "data" / "*.jsonl"), "matches no files"
    return str(tmp_path / "no-such-folder"), "matches no files"


@pytest.mark.parametrize("case", ["empty-folder", "folder-of-other-files", "glob-matching-nothing", "missing-path"])
def test_inputs_that_name_no_file_are_one_line_naming_the_input_before_any_work(tmp_path, capsys, case):
    spec, tail = _no_inputs(tmp_path, case)
    cfg = _config(tmp_path, [spec])
    assert cli.main(["run", str(cfg)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"llmpipe: error: data.inputs: {spec!r} {tail}\n"
    assert not (tmp_path / "store-c").exists() and not (tmp_path / "mlflow.db").exists()  # nothing started
    assert "plan for" not in captured.out  # it failed while planning, before any stage


def test_a_file_name_that_is_not_utf8_is_refused_by_name_before_any_work(tmp_path, capsys):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "good.txt").write_text("a play")
    bad = os.fsencode(folder) + b"/caf\xe9.txt"
    with open(bad, "wb") as f:
        f.write(b"a play about a cafe")
    cfg = _config(tmp_path, [str(folder)])
    assert cli.main(["run", str(cfg)]) == 2
    assert capsys.readouterr().err == f"llmpipe: error: data.inputs: file name {bad!r} is not valid UTF-8; rename the file\n"
    assert not (tmp_path / "store-c").exists()


# --- invalid UTF-8 among good JSONL lines ----------------------------------------------------------------

BAD_LINES = {  # line number -> (bytes, reason), around and between good lines
    1: (b'{"text": "caf\xe9"}', "invalid_utf8"),  # Latin-1
    2: (b'{"text": "\xc0\xaf overlong"}', "invalid_utf8"),
    250: (b'{"text": "\xed\xa0\x80 encoded surrogate"}', "invalid_utf8"),
    251: (b'{"text": "cut \xe2\x82"}', "invalid_utf8"),  # a truncated sequence
    252: (b'{"text": "lone \\ud800 surrogate escape"}', "invalid_utf8"),  # valid JSON, not valid Unicode
    600: (b'{"text": "pair \\udc00\\ud800 reversed"}', "invalid_utf8"),
    777: (b'{"text": "\x00"}', "malformed_json"),
    1000: (b'{"text": "last \xff"}', "invalid_utf8"),
}


def _mixed_jsonl(path: Path, n: int = 1000) -> list[str]:
    """n lines, the BAD_LINES among unique good ones (accents, emoji, escaped surrogate pairs); the good texts."""
    good, lines = [], []
    for i in range(1, n + 1):
        if i in BAD_LINES:
            lines.append(BAD_LINES[i][0])
            continue
        text = f"Letter {i}: the queen writes café, naïve, 😀 and \U0001f3b5 to the king."
        good.append(text)
        lines.append(json.dumps({"text": text, "n": i}, ensure_ascii=i % 2 == 0).encode("utf-8"))  # \ud83d\ude00 pairs too
    path.write_bytes(b"\n".join(lines) + b"\n")
    return good


def test_invalid_utf8_among_good_jsonl_lines_skips_exactly_those_records_across_byte_ranges(tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = _mixed_jsonl(path)
    (f,) = resolve_inputs([str(path)])
    pieces = split_file(f, 997)  # ranges that cut lines anywhere, like a prepare task's share
    assert len(pieces) > 50

    with pytest.raises(InputError, match=rf"^{path}:1: invalid UTF-8 at byte 13 of the line$"):
        [d for p in pieces for d in iter_documents(p)]

    log = SkipLog()
    docs = [d for p in pieces for d in iter_documents(p, log=log)]
    assert docs == good  # every neighbour kept, in order
    assert log.records == [{"where": f"{path}:{n}", "reason": reason} for n, (_, reason) in sorted(BAD_LINES.items())]
    assert log.counts == Counter(reason for _, reason in BAD_LINES.values())
    assert all(map(_utf8, docs))  # every kept string is encodable: no surrogate got through

    log = SkipLog()
    replaced = [d for p in pieces for d in iter_documents(p, log=log, replace_invalid_utf8=True)]
    assert len(replaced) == len(good) + 7 and replaced[0] == "caf\ufffd" and replaced[-1] == "last \ufffd"
    assert sum("\ufffd" in d for d in replaced) == 7
    assert log.counts == Counter({"utf8_replaced": 7, "malformed_json": 1})
    assert all(map(_utf8, replaced))


def _strings(value: object) -> list[str]:
    """Every string in a JSON value, keys included."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (k, *_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _shard_texts(folder: Path, tokenizer) -> list[str]:
    texts = []
    for shard in sorted(folder.glob("*.arrow")):
        table = pa.ipc.open_file(pa.memory_map(str(shard))).read_all()
        assert not any(pa.types.is_string(f.type) or pa.types.is_large_string(f.type) for f in table.schema)
        texts += [tokenizer.decode(ids[:-1]) for ids in table.column("input_ids").to_pylist()]  # drop the EOS
    return texts


@pytest.mark.slow
def test_prepare_skips_exactly_the_bad_records_and_writes_only_valid_utf8(ray_local, tmp_path, capsys):
    from tokenization.bpe import load_tokenizer

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    good = _mixed_jsonl(corpus / "mixed.jsonl")
    cfg = _config(tmp_path, [str(corpus)], on_error="skip", shard_size_mb=0.02, num_tasks=2)
    assert cli.main(["run", str(cfg), "--only", "tokenizer"]) == 0
    assert cli.main(["run", str(cfg), "--only", "prepare"]) == 0
    (folder,) = [m.parent for m in (tmp_path / "store-c" / "prepare").glob("*/_COMPLETE.json")]

    shards = json.loads((folder / "shards.json").read_text())
    assert shards["skipped"] == dict(Counter(reason for _, reason in BAD_LINES.values()))
    assert len(shards["shards"]) > 3  # several tasks, each with some of the bad lines
    listed = [json.loads(line) for line in (folder / "skipped.jsonl").read_text(encoding="utf-8").splitlines()]
    assert listed == [{"where": f"{corpus}/mixed.jsonl:{n}", "reason": r} for n, (_, r) in sorted(BAD_LINES.items())]
    (tok_dir,) = [m.parent for m in (tmp_path / "store-c" / "tokenizer").glob("*/_COMPLETE.json")]
    assert sorted(_shard_texts(folder, load_tokenizer(tok_dir))) == sorted(good)  # the good records, each exactly once

    for written in folder.glob("*.json*"):  # shards.json, skipped.jsonl, _COMPLETE.json: strict UTF-8, no surrogates
        text = written.read_bytes().decode("utf-8")
        for line in text.splitlines() if written.suffix == ".jsonl" else [text]:
            assert all(map(_utf8, _strings(json.loads(line))))


@pytest.mark.slow
def test_a_100mb_line_through_tokenizer_and_prepare_is_counted_too_long_or_named_by_file_and_line(ray_local, tmp_path,
                                                                                                   capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"play_{i:02d}.md").write_text(f"KING:\nThe play number {i} opens at the castle by the sea.\n")
    (corpus / "huge.txt").write_bytes(UNIT * HUNDRED_MB)
    with open(corpus / "letters.jsonl", "wb") as f:
        f.write(b'{"text": "a short letter"}\n{"text": "' + UNIT * HUNDRED_MB + b'"}\n{"text": "another letter"}\n')
    cfg = _config(tmp_path, [str(corpus)], max_chars=100_000, shard_size_mb=64)
    assert cli.main(["run", str(cfg), "--only", "tokenizer"]) == 0
    assert cli.main(["run", str(cfg), "--only", "prepare"]) == 0
    (folder,) = [m.parent for m in (tmp_path / "store-c" / "prepare").glob("*/_COMPLETE.json")]
    shards = json.loads((folder / "shards.json").read_text())
    assert {k: v for k, v in shards["filtered"].items() if v} == {"too_long": 2}
    assert shards["totals"]["train"]["docs"] + shards["totals"]["val"]["docs"] == 32

    with open(corpus / "letters.jsonl", "r+b") as f:  # one bad byte deep inside the long line
        f.seek(len(b'{"text": "a short letter"}\n') + 50_000_000)
        f.write(b"\xff")
    capsys.readouterr()
    # The tokenizer's sample reads only the parts of files it draws, and it does not draw the block where line 2
    # starts (tokenization.sample): prepare, which reads everything, is the one to find the bad byte.
    assert cli.main(["run", str(cfg), "--only", "tokenizer"]) == 0
    assert cli.main(["run", str(cfg), "--only", "prepare"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"llmpipe: error: {corpus}/letters.jsonl:2: invalid UTF-8 at byte 50000000 of the line"
