"""Documents out of input files, by format, with one bad-input policy.

Formats: `.txt` / `.md` are one document per file; `.jsonl`, `.jsonl.gz` and
`.jsonl.zst` one document per line (a configurable text field); `.json` an
array of records or strings (a `.json` file that does not start with `[` is
read as JSON Lines); `.parquet` a text column. A UTF-8 byte order mark at the
start of a file is dropped in every text format. `iter_documents` reads one
`Piece` (see `tokenization.inputs`): a whole file, or a byte range of a plain
`.jsonl` (the lines *starting* inside it) or of a `.parquet` (the row groups
starting inside it).

Bad records follow `on_error`: `raise` stops with an `InputError` naming the
file and the line (row group, or row); `skip` drops exactly that record and
notes it, with its reason and location, in a `SkipLog`. A file that cannot be
read on (a truncated or corrupted `.gz` / `.zst`, an unreadable row group) is
one `unreadable` skip naming where reading stopped; what came before it is
kept. Everything a reader yields encodes as UTF-8: invalid bytes and
`\\uD800`-style lone surrogate escapes are `invalid_utf8`; a `.txt`/`.md` file
holding a NUL byte is `binary` (an image, an archive, or UTF-16 text).

Memory: a text file (one document) is held about twice while it is decoded,
unless `max_chars` is given and the file is too large to hold that few
characters: then only the bytes that prove it are read. A plain JSONL piece is
read whole (about one shard plus the end of its last line) and its lines are
views into it; compressed JSON Lines and `.json` are streamed (one chunk and
the record being parsed); Parquet is read one row group at a time.
"""

from __future__ import annotations

import gzip
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa

from tokenization.inputs import (
    SUFFIXES,
    TEXT_SUFFIXES,
    InputError,
    Piece,
    display,
    one_line,
    open_input,
    suffix_of,
)
from tokenization.parquet import parquet_documents
from tokenization.records import CHUNK, iter_json_array, parse_line, record_text

BOM = b"\xef\xbb\xbf"
_BLANK = re.compile(rb"\s*")  # matched on a memoryview: no copy of a long line just to see it is blank
_STREAM_ERRORS = (OSError, EOFError, zlib.error)  # a truncated or corrupted compressed stream
Numbered = Iterator[tuple[int, bytes | memoryview]]


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


def read_range(uri: str, start: int, end: int) -> tuple[bytes, int]:
    """The bytes of the lines that start in [start, end), and the offset of the first one."""
    with open_input(uri) as f:
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
    with open_input(uri) as f:
        remaining = offset
        while remaining and (chunk := f.read(min(1 << 20, remaining))):
            n += chunk.count(b"\n")
            remaining -= len(chunk)
    return n


def _bad(log: SkipLog | None, reason: str, message: str, where: str) -> None:
    if log is None:
        raise InputError(message)
    log.add(reason, where)


def _replaced(log: SkipLog | None) -> None:
    if log is not None:
        log.counts["utf8_replaced"] += 1


def decode_utf8(data: bytes | memoryview, where: str, *, replace: bool, log: SkipLog | None, offset: int = 0) -> str | None:
    try:
        return str(data, "utf-8")
    except UnicodeDecodeError as e:
        if replace:
            _replaced(log)
            return str(data, "utf-8", "replace")
        _bad(log, "invalid_utf8", f"{where}: invalid UTF-8 at byte {offset + e.start}", where)
        return None


def iter_documents(piece: Piece | str, *, text_field: str = "text", log: SkipLog | None = None,
                   replace_invalid_utf8: bool = False, max_chars: int | None = None) -> Iterator[str]:
    """The documents of one piece in file order. `log=None` means on_error=raise. With `max_chars`, a text file
    too large to hold that many characters is read only far enough to yield a longer text (to be dropped)."""
    for _, text in iter_located_documents(piece, text_field=text_field, log=log,
                                          replace_invalid_utf8=replace_invalid_utf8, max_chars=max_chars):
        yield text


def iter_located_documents(piece: Piece | str, *, text_field: str = "text", log: SkipLog | None = None,
                           replace_invalid_utf8: bool = False, max_chars: int | None = None
                           ) -> Iterator[tuple[int, str]]:
    """`iter_documents` with where each document starts: (1-based line, text); the row for Parquet, 1 for a text
    file. Line numbers count from the piece's first line, so they are the file's for a whole file (what the
    retrieval index reads: its passages cite file:line)."""
    if isinstance(piece, str):  # a whole file, size unknown (-1): read to the end
        piece = Piece(piece, 0, -1, -1)
    uri, kind, name = piece.uri, suffix_of(piece.uri), display(piece.uri)
    try:
        if kind in TEXT_SUFFIXES:
            yield from _text(uri, name, log, replace_invalid_utf8, max_chars)
        elif kind == ".jsonl":
            yield from _jsonl(piece, name, text_field, log, replace_invalid_utf8)
        elif kind in (".jsonl.gz", ".jsonl.zst", ".json"):
            yield from _stream(uri, kind, name, text_field, log, replace_invalid_utf8)
        elif kind == ".parquet":
            yield from parquet_documents(piece, name, text_field, lambda *a: _bad(log, *a),
                                         (lambda: _replaced(log)) if replace_invalid_utf8 else None)
        else:
            raise InputError(f"{name}: unsupported file type {kind!r} (expected one of {', '.join(SUFFIXES)})")
    except (OSError, EOFError) as e:  # unreadable path, permissions
        _bad(log, "unreadable", f"{name}: cannot read ({one_line(e)})", name)


def _text(uri: str, name: str, log: SkipLog | None, replace: bool, max_chars: int | None) -> Iterator[tuple[int, str]]:
    # A character is at most 4 bytes: a file holding more than this many bytes has more than max_chars characters.
    limit = None if max_chars is None else len(BOM) + 4 * (max_chars + 1)
    with open_input(uri) as f:
        data = f.read() if limit is None else f.read(limit)
        if limit is not None and len(data) == limit and f.read(1):  # too long, whatever it holds: read no further
            yield 1, str(memoryview(data)[len(BOM) if data.startswith(BOM) else 0:], "utf-8", "replace")
            return
    start = len(BOM) if data.startswith(BOM) else 0
    view = memoryview(data)[start:]  # no copy to drop the BOM
    if _BLANK.fullmatch(view):  # not data.strip(): that copies a whole large file
        _bad(log, "empty_file", f"{name}: empty file", name)
        return
    if (nul := data.find(b"\0")) >= 0:  # valid UTF-8, but no text file holds NUL: binary or UTF-16
        _bad(log, "binary", f"{name}: binary data, not UTF-8 text (NUL byte at byte {nul})", name)
        return
    text = decode_utf8(view, name, replace=replace, log=log, offset=start)
    del view, data  # the bytes and the text of a large file are held together only while decoding
    if text is not None:
        yield 1, text


def _records(lines: Numbered, line_no: Callable[[int], int], name: str, text_field: str, log: SkipLog | None,
             replace: bool) -> Iterator[tuple[int, str]]:
    """The (line number, document) pairs of numbered JSON Lines; `line_no` turns a number into the file's line number (computed only
    for a bad line)."""
    for n, line in lines:
        if _BLANK.fullmatch(line):
            continue
        record = parse_line(line, text_field)
        if isinstance(record, str):
            yield n, record
            continue
        reason, detail = record
        if reason == "invalid_utf8" and replace:
            record = parse_line(line, text_field, replace=True)
            if isinstance(record, str):
                _replaced(log)
                yield n, record
                continue
            reason, detail = record
        where = f"{name}:{line_no(n)}"
        _bad(log, reason, f"{where}: {detail}", where)


def _jsonl(piece: Piece, name: str, text_field: str, log: SkipLog | None, replace: bool) -> Iterator[tuple[int, str]]:
    uri = piece.uri
    if piece.whole:
        with open_input(uri) as f:
            data, base_offset = f.read(), 0
    else:
        data, base_offset = read_range(uri, piece.start, piece.end)
    start = len(BOM) if base_offset == 0 and data[:3] == BOM else 0
    if piece.whole and _BLANK.fullmatch(memoryview(data)[start:]):
        _bad(log, "empty_file", f"{name}: empty file", name)
        return
    base: list[int] = [] if base_offset else [0]  # lines before this piece, counted on the first bad line

    def line_no(i: int) -> int:
        if not base:
            base.append(_line_base(uri, base_offset))
        return base[0] + i

    yield from _records(enumerate(_lines(data, start), 1), line_no, name, text_field, log, replace)


def _lines(data: bytes, pos: int = 0) -> Iterator[memoryview]:
    """The lines of `data` from `pos` as views (a 100 MB line is not copied to be looked at)."""
    view = memoryview(data)
    while pos < len(data):
        end = data.find(b"\n", pos)
        end = len(data) if end < 0 else end + 1
        yield view[pos:end]
        pos = end


def _decompressed(raw, kind: str):
    if kind == ".jsonl.gz":
        return gzip.GzipFile(fileobj=raw)
    if kind == ".jsonl.zst":  # pyarrow's own codec: no extra dependency
        return pa.CompressedInputStream(raw if isinstance(raw, pa.NativeFile) else pa.PythonFile(raw, mode="r"), "zstd")
    return raw


def _stream(uri: str, kind: str, name: str, text_field: str, log: SkipLog | None, replace: bool
            ) -> Iterator[tuple[int, str]]:
    """Compressed JSON Lines and `.json`, read front to back in chunks; where reading fails, one `unreadable`
    skip naming the first line lost (or the file, if none was read), and the lines before it kept."""
    with open_input(uri) as raw, _decompressed(raw, kind) as f:
        reader = _Reader(f.read1 if kind == ".jsonl.gz" else f.read, name)  # read1: what was inflated before an error
        first = reader.peek()
        if kind == ".json" and first == b"[":
            for line, value, error in iter_json_array(reader.read):
                yield from _element(value, error, line, name, text_field, log, replace)
        else:
            yield from _records(reader.lines(), lambda n: n, name, text_field, log, replace)
    if reader.failure:
        _bad(log, "unreadable", *reader.failure)
    elif not first:
        _bad(log, "empty_file", f"{name}: empty file", name)


def _element(value, error: str | None, line: int, name: str, text_field: str, log: SkipLog | None, replace: bool
             ) -> Iterator[tuple[int, str]]:
    """The document of one `.json` array element (with its line), or its skip."""
    where = f"{name}:{line}"
    result = ("malformed_json", error) if error else record_text(value, text_field, strings=True)
    if not isinstance(result, str) and result[0] == "invalid_utf8" and replace:
        result = record_text(value, text_field, replace=True, strings=True)
        _replaced(log)
    if isinstance(result, str):
        yield line, result
    else:
        _bad(log, result[0], f"{where}: {result[1]}", where)


class _Reader:
    """A (decompressing) stream read in chunks, BOM dropped. A read that fails ends the stream and sets `failure`
    to (message, where), which the caller reports after the documents read before it."""

    def __init__(self, read: Callable[[int], bytes], name: str):
        self._read, self.name = read, name
        self.pending, self.newlines, self.started = b"", 0, False
        self.failure: tuple[str, str] | None = None

    def _chunk(self, n: int) -> bytes:
        if self.failure:
            return b""
        try:
            data = self._read(n)
        except _STREAM_ERRORS as e:
            done, name = self.newlines, self.name  # the lines read whole before the failure
            self.failure = ((f"{name}:{done + 1}: cannot read past line {done} ({one_line(e)})", f"{name}:{done + 1}")
                            if done else (f"{name}: cannot read ({one_line(e)})", name))
            return b""
        if not self.started:
            self.started = True
            data = data.removeprefix(BOM)
        self.newlines += data.count(b"\n")
        return data

    def peek(self) -> bytes:
        """The first non-blank byte (b"" for an empty stream), keeping what was read for the next read."""
        while not self.failure:
            data = self._chunk(CHUNK)
            self.pending += data
            stripped = self.pending.lstrip()
            if stripped or not data:
                return stripped[:1]
        return b""

    def read(self, n: int) -> bytes:
        if self.pending:
            data, self.pending = self.pending, b""
            return data
        return self._chunk(n)

    def lines(self) -> Numbered:
        """(line number, line) pairs; a line spanning chunks is joined once, others are views of their chunk."""
        parts: list[bytes | memoryview] = []
        n = 0
        while data := self.read(CHUNK):
            view, pos = memoryview(data), 0
            while (nl := data.find(b"\n", pos)) >= 0:
                line = view[pos:nl + 1]
                if parts:
                    parts.append(line)
                    line, parts = b"".join(parts), []
                n += 1
                yield n, line
                pos = nl + 1
            if pos < len(data):
                parts.append(view[pos:])
        if parts and not self.failure:  # a last line without "\n" (not one cut short by a failed read)
            yield n + 1, b"".join(parts)
