"""This node's private folder, and in it the cache of remote stage folders (one copy per commit).

The private folder is `$LLMPIPE_CACHE_DIR`, else `<tmp>/llmpipe-<uid>`: created
0700, and refused (one line naming it) when it is a link, belongs to someone
else or others can write to it, since whoever can write there could plant the
files a stage would read. It holds `cache/` (below), `staging/` (where stages
of a remote store write before their upload) and `locks/` (the stage locks of
remote stores, see `pipeline.engine.locks`).

A copy is keyed by the store (a hash of its URI), the stage, the fingerprint
and the commit (`ArtifactStore` gives the commit's key: its manifest's
`commit_id`, unique per commit), so a stage recommitted under the same
fingerprint (`--force`) is a new copy and never a stale one. A copy's files
never change once there; its lease (`pipeline.engine.leases`) is held by
every process that opened it, for that process's life.

The cache is bounded: after each download, copies are evicted least recently
opened first until the cache is under `$LLMPIPE_CACHE_MAX_GB` (default 50),
whole copies only, and never one a live process holds: the cache can go over
its cap while the copies in use alone exceed it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.engine import leases
from pipeline.errors import StoreError

if TYPE_CHECKING:
    import pyarrow.fs as pafs

    from pipeline.engine.store import Commit

DIR_ENV, MAX_ENV = "LLMPIPE_CACHE_DIR", "LLMPIPE_CACHE_MAX_GB"
DEFAULT_MAX_GB = 50.0


class Recommitted(Exception):
    """The stage folder was committed anew (or is being rebuilt) while its files were being downloaded."""


def private_dir() -> Path:
    """This user's folder for node-local state, created 0700; refused if others could plant files in it."""
    path = Path(os.environ.get(DIR_ENV) or Path(tempfile.gettempdir()) / f"llmpipe-{os.getuid()}")
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(path)
    except OSError as e:
        raise StoreError(f"node cache {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"node cache {path}: not a folder (a link?); remove it or set {DIR_ENV}")
    if st.st_uid != os.getuid():
        raise StoreError(f"node cache {path}: owned by uid {st.st_uid}, not by you (uid {os.getuid()}); "
                         f"set {DIR_ENV} to a folder of your own")
    if st.st_mode & 0o022:
        raise StoreError(f"node cache {path}: writable by other users (mode {oct(stat.S_IMODE(st.st_mode))}); "
                         f"make it yours alone (chmod 700) or set {DIR_ENV}")
    return path


def store_key(uri: str) -> str:
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()[:16]


def _cap_bytes() -> float:
    value = os.environ.get(MAX_ENV, "")
    try:
        return float(value) * 1e9 if value else DEFAULT_MAX_GB * 1e9
    except ValueError:
        raise StoreError(f"{MAX_ENV}={value!r}: not a number of gigabytes") from None


def _size(folder: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass  # removed meanwhile
    return total


def _download(fs: pafs.FileSystem, src: str, dest: Path, size: int) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with fs.open_input_stream(src) as f, open(dest, "wb") as out:
            shutil.copyfileobj(f, out, 1 << 20)
    except FileNotFoundError:
        raise Recommitted from None  # cleared by a rebuild
    if dest.stat().st_size != size:
        raise Recommitted


def _remove(folder: Path) -> bool:
    shutil.rmtree(folder, ignore_errors=True)
    return True


class NodeCache:
    """The copies of one remote store's committed stage folders on this node."""

    def __init__(self, store_uri: str):
        self.root = private_dir() / "cache"
        self.folder = self.root / store_key(store_uri)

    def open(self, stage: str, fp16: str, commit_key: str) -> Path:
        """The copy of this commit (created empty if new), leased by this process and marked as just used."""
        entry = self.folder / stage / fp16 / commit_key
        lease = entry.parent / f"{commit_key}.lease"
        while not leases.hold(lease):  # evicted while we waited for the lease: take a fresh one
            pass
        os.utime(lease)  # its mtime is when a process last opened it: the eviction order
        entry.mkdir(parents=True, exist_ok=True)
        return entry

    def fetch(self, fs: pafs.FileSystem, commit: Commit, stage: str, fp16: str, files: list[str] | None, *,
              recheck: Callable[[], str | None]) -> Path:
        """This node's copy of `commit` holding `files` (all, with the marker, if None). Each file is downloaded
        under a temporary name and checked against the manifest's size; then `recheck()` (the key of the commit
        the store holds now) must still be this commit's, else Recommitted: the bytes may be a rebuild's."""
        entry = self.open(stage, fp16, commit.key)
        sizes = {f["path"]: f["size"] for f in commit.manifest.get("files", [])}
        names = list(sizes) if files is None else files
        for name in names:
            if name not in sizes:
                raise StoreError(f"{commit.folder}/{name}: not a file of this commit")
        missing = [n for n in names if not ((entry / n).is_file() and (entry / n).stat().st_size == sizes[n])]
        tmps = {n: entry / f"{n}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part" for n in missing}
        try:
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda n: _download(fs, f"{commit.folder}/{n}", tmps[n], sizes[n]), missing))
            if missing and recheck() != commit.key:
                raise Recommitted
            for n in missing:
                os.replace(tmps[n], entry / n)
        finally:
            for tmp in tmps.values():
                tmp.unlink(missing_ok=True)
        if files is None and not (entry / "_COMPLETE.json").exists():
            tmp = entry / f"._COMPLETE.json.{os.getpid()}.part"
            tmp.write_bytes(commit.marker)
            os.replace(tmp, entry / "_COMPLETE.json")
        if missing:
            self.evict()
        return entry

    def evict(self) -> list[Path]:
        """Remove whole copies, least recently opened first, until the cache is under its cap; never a held one."""
        cap = _cap_bytes()
        found = []
        for lease in self.root.glob("*/*/*/*.lease"):
            entry = lease.with_name(lease.name.removesuffix(".lease"))
            try:
                found.append((lease.stat().st_mtime, lease, entry, _size(entry)))
            except FileNotFoundError:
                continue  # evicted by another process meanwhile
        total = sum(size for *_, size in found)
        removed = []
        for _, lease, entry, size in sorted(found):
            if total <= cap:
                break
            if leases.remove_unless_held(lease, lambda entry=entry: _remove(entry)):
                total -= size
                removed.append(entry)
        return removed
