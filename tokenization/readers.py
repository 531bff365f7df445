"""Documents out of input files, by format, with one bad-input policy.

Formats: `.txt` / `.md` are one document per file; `.jsonl` and `.jsonl.gz`
one document per line (a configurable text field); `.parquet` a text column.
`iter_documents` reads one `Piece` (see `tokenization.inputs`): a whole file,
or a byte range of a plain `.jsonl` from which `read_range` takes exactly the
lines *starting* inside it.

Bad records follow `on_error`: `raise` stops with an `InputError` naming the
file and the line or byte offset; `skip` drops exactly that record and notes
it, with its reason and location, in a `SkipLog`. Everything a reader yields
encodes as UTF-8: invalid bytes, and JSON `\\uD800`-style lone surrogate
escapes (which `json` decodes to unencodable strings), are `invalid_utf8`;
a `.txt`/`.md` file holding a NUL byte is `binary` (an image, an archive, or
UTF-16 text), not a document. Memory: a text file is held about twice while
it is decoded; a JSONL piece is read whole (at most about one shard plus the
end of its last line) and its lines are views into it, so a 100 MB line costs
that piece plus about twice the line while it is parsed.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from tokenization.inputs import (
    LINE_SUFFIXES,
    SUFFIXES,
    TEXT_SUFFIXES,
    InputError,
    Piece,
    suffix_of,
)

_SURROGATE = re.compile("[\ud800-\udfff]")  # what a JSON "\\ud800" escape decodes to; no UTF-8 encoding exists
_BLANK = re.compile(rb"\s*")  # matched on a memoryview: no copy of a long line just to see it is blank


@dataclass
class SkipLog:
    """Skipped records: exact counts by reason and every record's location."""

    counts: Counter = field(default_factory=Counter)
    records: list[dict] = field(default_factory=list)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        self.records.append({"where": where, "reason": reason})

    def merge(self, other: SkipLog) -> None:
        self.counts.update(other.counts)
        self.records.extend(other.records)


def _open(uri: str):
    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs.open_input_file(path)
    return open(uri, "rb")


def read_range(uri: str, start: int, end: int) -> tuple[bytes, int]:
    """The bytes of the lines that start in [start, end), and the offset of the first one."""
    with _open(uri) as f:
        if start > 0:
            f.seek(start - 1)
            at_line_start = f.read(1) == b"\n"
        else:
            at_line_start = True
        block = f.read(end - start)
        first = 0 if at_line_start else block.find(b"\n") + 1
        if not at_line_start and first == 0:
            return b"", end  # no line starts inside this range
        tail = []
        if block and not block.endswith(b"\n"):  # finish the last line, which may run past `end`
            while chunk := f.read(1 << 16):
                cut = chunk.find(b"\n")
                tail.append(chunk if cut < 0 else chunk[: cut + 1])
                if cut >= 0:
                    break
        if not first and not tail:
            return block, start
        return b"".join([memoryview(block)[first:], *tail]), start + first  # one copy, however long the last line


def _line_base(uri: str, offset: int) -> int:
    """Number of lines before byte `offset` (only computed when a location must be reported)."""
    if offset == 0:
        return 0
    n = 0
    with _open(uri) as f:
        remaining = offset
        while remaining and (chunk := f.read(min(1 << 20, remaining))):
            n += chunk.count(b"\n")
            remaining -= len(chunk)
    return n


def _bad(log: SkipLog | None, reason: str, message: str, where: str) -> None:
    if log is None:
        raise InputError(message)
    log.add(reason, where)


def decode_utf8(data: bytes, where: str, *, replace: bool, log: SkipLog | None, offset: int = 0) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if replace:
            if log is not None:
                log.counts["utf8_replaced"] += 1
            return data.decode("utf-8", errors="replace")
        _bad(log, "invalid_utf8", f"{where}: invalid UTF-8 at byte {offset + e.start}", where)
        return None


def iter_documents(piece: Piece | str, *, text_field: str = "text", log: SkipLog | None = None,
                   replace_invalid_utf8: bool = False) -> Iterator[str]:
    """The documents of one piece in file order. `log=None` means on_error=raise."""
    if isinstance(piece, str):  # a whole file, size unknown (-1): read to the end
        piece = Piece(piece, 0, -1, -1)
    uri, kind = piece.uri, suffix_of(piece.uri)
    try:
        if kind in TEXT_SUFFIXES:
            with _open(uri) as f:
                data = f.read()
            if not data or data.isspace():  # not data.strip(): that copies a whole large file
                _bad(log, "empty_file", f"{uri}: empty file", uri)
                return
            if (nul := data.find(b"\0")) >= 0:  # valid UTF-8, but no text file holds NUL: binary or UTF-16
                _bad(log, "binary", f"{uri}: binary data, not UTF-8 text (NUL byte at byte {nul})", uri)
                return
            text = decode_utf8(data, uri, replace=replace_invalid_utf8, log=log)
            del data  # the bytes and the text of a large file are held together only while decoding
            if text is not None:
                yield text
        elif kind in LINE_SUFFIXES:
            yield from _jsonl(piece, text_field, log, replace_invalid_utf8)
        elif kind == ".parquet":
            yield from _parquet(uri, text_field, log)
        else:
            raise InputError(f"{uri}: unsupported file type {kind!r} (expected one of {', '.join(SUFFIXES)})")
    except (OSError, EOFError, gzip.BadGzipFile) as e:  # unreadable path, truncated archive, permissions
        _bad(log, "unreadable", f"{uri}: cannot read ({type(e).__name__}: {e})", uri)


def _jsonl(piece: Piece, text_field: str, log: SkipLog | None, replace: bool) -> Iterator[str]:
    uri = piece.uri
    if suffix_of(uri) == ".jsonl.gz":
        with _open(uri) as f:
            data, base_offset = gzip.GzipFile(fileobj=f).read(), 0
    else:
        data, base_offset = read_range(uri, piece.start, piece.end) if not piece.whole else (_read_all(uri), 0)
    if piece.whole and (not data or data.isspace()):
        _bad(log, "empty_file", f"{uri}: empty file", uri)
        return
    line_base: int | None = 0 if base_offset == 0 else None
    for i, line in enumerate(_lines(data)):
        if _BLANK.fullmatch(line):
            continue
        record = _parse_line(line, text_field)
        if isinstance(record, str):
            yield record
            continue
        if line_base is None:
            line_base = _line_base(uri, base_offset)
        where = f"{uri}:{line_base + i + 1}"
        reason, detail = record
        if reason == "invalid_utf8" and replace:
            text = _parse_line(line, text_field, replace=True)
            if isinstance(text, str):
                if log is not None:
                    log.counts["utf8_replaced"] += 1
                yield text
                continue
            reason, detail = text
        _bad(log, reason, f"{where}: {detail}", where)


def _lines(data: bytes) -> Iterator[memoryview]:
    """The lines of `data` as views (a 100 MB line is not copied to be looked at)."""
    view, pos = memoryview(data), 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        end = len(data) if end < 0 else end + 1
        yield view[pos:end]
        pos = end


def _parse_line(line: bytes | memoryview, text_field: str, *, replace: bool = False) -> str | tuple[str, str]:
    """The text of one JSONL line, or (reason, detail) if it is bad. `replace` puts U+FFFD for invalid UTF-8."""
    try:
        s = str(line, "utf-8", "replace" if replace else "strict")
    except UnicodeDecodeError as e:
        return "invalid_utf8", f"invalid UTF-8 at byte {e.start} of the line"
    try:
        record = json.loads(s)
    except json.JSONDecodeError as e:
        return "malformed_json", f"malformed JSON ({e.msg}, column {e.colno})"
    if not isinstance(record, dict) or text_field not in record:
        return "missing_field", f"field {text_field!r} is missing"
    text = record[text_field]
    if not isinstance(text, str):
        return "not_a_string", f"field {text_field!r} is {type(text).__name__}, not a string"
    if not text.isascii() and (bad := _SURROGATE.search(text)):  # isascii() is O(1): the common case costs nothing
        if not replace:
            return "invalid_utf8", (f"field {text_field!r} holds a lone surrogate \\u{ord(bad.group()):04x} at character "
                                    f"{bad.start()}, which is not valid Unicode")
        text = _SURROGATE.sub("\ufffd", text)
    return text


def _read_all(uri: str) -> bytes:
    with _open(uri) as f:
        return f.read()


def _parquet(uri: str, text_field: str, log: SkipLog | None) -> Iterator[str]:
    import pyarrow.parquet as pq

    with _open(uri) as f:
        pf = pq.ParquetFile(f)
        if text_field not in pf.schema_arrow.names:
            _bad(log, "missing_field", f"{uri}: column {text_field!r} is missing (columns: {pf.schema_arrow.names})", uri)
            return
        row = 0
        for batch in pf.iter_batches(columns=[text_field], batch_size=8192):
            for value in batch.column(0).to_pylist():
                row += 1
                if isinstance(value, str):
                    yield value
                else:
                    where = f"{uri}: row {row}"
                    _bad(log, "not_a_string", f"{where}: column {text_field!r} is {type(value).__name__}, not a string", where)
