"""The artifact store: `<root>/<stage>/<fingerprint>/`, committed by `_COMPLETE.json`.

A stage folder is *complete* only when `_COMPLETE.json` exists, names the same
full fingerprint as the folder (the folder name is a prefix, so a prefix
collision is detected rather than silently reused) and every file it lists is
present with the listed size. Anything else is incomplete: never read
downstream, and either resumed (training) or cleared and redone. Each commit
has a unique `commit_id` in its manifest.

The root is a local folder or any `pyarrow.fs` URI. Stages always work in a
local folder: for a local root that is a new generation of the stage folder
(`pipeline.engine.generations`: a rebuild never touches the files readers have
open); for a remote root it is a staging folder uploaded at commit time, before
the marker. The marker is written last: locally after every data file and
folder is fsynced, via write-to-temp + fsync + rename (atomic on POSIX); on
object stores as a single PUT (atomic per object). Nodes read a remote stage
through their cache (`pipeline.engine.nodecache`), one copy per commit.

Reading a marker: only "not found" means absent. Any other error is retried
with a short back-off and then raised as a `StoreError` naming the path, so a
flaky disk never makes a committed stage look missing (and get cleared). A
marker that is read but does not decode is *damaged*, not half-written (it is
written atomically): a disk fault, a hand edit, a copy cut short. It cannot
vouch for its files, so the folder counts as incomplete and is redone.

`<root>/_runs/<experiment>.json`, the pointer that explains staleness, is
`pipeline.engine.run_pointer`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from pipeline.engine.generations import Generations, sync_tree
from pipeline.engine.nodecache import NodeCache, Recommitted, private_dir, store_key
from pipeline.errors import StoreError

MARKER = "_COMPLETE.json"
SHORT = 16  # hex chars of the fingerprint used in folder names
READ_BACKOFF_S = (0.05, 0.2, 0.5)  # waits before each retry of a read that failed other than "not found"
NOT_FOUND = (FileNotFoundError, NotADirectoryError)  # a path below a regular file cannot exist either


def _is_uri(root: str) -> bool:
    return "://" in root and not root.startswith("file://")


@dataclass(frozen=True)
class Commit:
    """One commit of a stage folder: where its files are, its unique key and its manifest."""

    folder: str  # a local generation folder, or the remote stage folder
    key: str  # the manifest's commit_id (or, for a commit made before there was one, the marker's sha256)
    manifest: dict[str, Any]
    marker: bytes


def open_lock_file(path: Path) -> int:
    """A descriptor of the lock file `path` (created with its folder), for `fcntl.flock`; one error line naming it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise StoreError(f"cannot create lock file {path}: {e.strerror}") from None


class ArtifactStore:
    def __init__(self, root: str):
        self.uri = root
        try:
            if _is_uri(root):
                self.fs, self.base = pafs.FileSystem.from_uri(root)
                self.is_local = False
            else:
                path = root.removeprefix("file://")
                self.fs, self.base = pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())
                self.is_local = True
        except (ValueError, OSError) as e:  # pyarrow.ArrowInvalid is a ValueError
            raise StoreError(f"store.root {root!r}: {e}") from None
        self.generations = Generations(self.base)

    # --- paths ----------------------------------------------------------
    def stage_path(self, stage: str, fingerprint: str) -> str:
        return f"{self.base}/{stage}/{fingerprint[:SHORT]}"

    def stage_uri(self, stage: str, fingerprint: str) -> str:
        """A path for local roots, a full URI for remote ones (for Ray Train storage_path)."""
        p = self.stage_path(stage, fingerprint)
        if self.is_local:
            return p
        scheme = self.uri.split("://", 1)[0]
        return f"{scheme}://{p}"

    @property
    def location(self) -> str:
        """The root as every process can reopen it: an absolute path or the full URI."""
        return self.base if self.is_local else self.uri

    def ref(self, stage: str, fingerprint: str, commit: Commit | None = None) -> StageRef:
        """A stage folder for other processes; pinned to `commit` (the files this run read) when given."""
        pin = (Path(commit.folder).name if self.is_local else commit.key) if commit else None
        return StageRef(self.location, stage, fingerprint, pin)

    def output_ref(self, stage: str, fingerprint: str, workdir: Path) -> StageRef:
        """The folder a stage being built writes into, for its tasks on any node (locally: its generation)."""
        return StageRef(self.location, stage, fingerprint, workdir.name if self.is_local else None)

    def output_uri(self, stage: str, fingerprint: str, workdir: Path) -> str:
        """Where a stage being built writes in the store: its generation locally, the stage folder's URI remotely."""
        return str(workdir) if self.is_local else self.stage_uri(stage, fingerprint)

    # --- reading --------------------------------------------------------
    def read_bytes(self, path: str) -> bytes | None:
        """A file's bytes; None only when it does not exist. Other errors are retried, then a StoreError."""
        for wait in (*READ_BACKOFF_S, None):
            try:
                with self.fs.open_input_stream(path) as f:
                    return f.read()
            except NOT_FOUND:
                return None
            except OSError as e:
                if wait is None:
                    raise StoreError(f"cannot read {path}: {e}") from None
                time.sleep(wait)
        raise AssertionError("unreachable")

    def read_json(self, path: str) -> dict[str, Any] | None:
        """A JSON object; None when absent or damaged (see the module docstring); a StoreError if unreadable."""
        return _json_object(self.read_bytes(path))

    def _commit_in(self, folder: str, fingerprint: str, *, check_files: bool = True) -> Commit | None:
        """The commit whose marker is in `folder`, if it names `fingerprint` and (checked) lists files that are there."""
        data = self.read_bytes(f"{folder}/{MARKER}")
        m = _json_object(data)
        if m is None or m.get("fingerprint") != fingerprint:
            return None
        files = m.get("files", []) if check_files else []
        infos = self.fs.get_file_info([f"{folder}/{f['path']}" for f in files]) if files else []
        for f, info in zip(files, infos):
            if info.type != pafs.FileType.File or info.size != f["size"]:
                return None
        key = m.get("commit_id") or hashlib.sha256(data).hexdigest()[:16]
        return Commit(folder, str(key), m, data)

    def _key_now(self, folder: str, fingerprint: str) -> str | None:
        commit = self._commit_in(folder, fingerprint, check_files=False)
        return commit.key if commit else None

    def committed(self, stage: str, fingerprint: str) -> Commit | None:
        """The stage folder's commit, or None if it is not complete."""
        if not self.is_local:
            return self._commit_in(self.stage_path(stage, fingerprint), fingerprint)
        folder = self.generations.current(stage, fingerprint[:SHORT])
        return self._commit_in(str(folder), fingerprint) if folder else None

    def open(self, stage: str, fingerprint: str) -> Commit | None:
        """Like `committed`, for a reader: locally the generation is leased, so it stays while this process lives."""
        if not self.is_local:
            return self.committed(stage, fingerprint)
        folder = self.generations.open(stage, fingerprint[:SHORT])
        return self._commit_in(str(folder), fingerprint) if folder else None

    def manifest(self, stage: str, fingerprint: str) -> dict[str, Any] | None:
        """The committed manifest, or None if the folder is not complete."""
        commit = self.committed(stage, fingerprint)
        return commit.manifest if commit else None

    @staticmethod
    def of_folder(folder: Path) -> tuple[ArtifactStore, str]:
        """The store and stage of a local stage folder `<root>/<stage>/<fp16>`, or of a generation of one."""
        root = folder.parent.parent
        return ArtifactStore(str(root.parent if root.name == "_generations" else root)), folder.parent.name

    def folder_manifest(self, stage: str, folder_name: str) -> dict[str, Any] | None:
        """The committed manifest of `<root>/<stage>/<folder_name>` (or of a generation of it) when all you have is
        the folder."""
        folder = self.generations.folder(stage, folder_name) if self.is_local else f"{self.base}/{stage}/{folder_name}"
        m = self.read_json(f"{folder}/{MARKER}")
        fp = m.get("fingerprint") if isinstance(m, dict) else None
        return self.manifest(stage, fp) if isinstance(fp, str) and fp[:SHORT] == folder_name.split(".")[0] else None

    def exists(self, stage: str, fingerprint: str) -> bool:
        info = self.fs.get_file_info(self.stage_path(stage, fingerprint))
        return info.type == pafs.FileType.Directory

    def collect(self, stage: str, fingerprint: str) -> list[str]:
        """Remove the old generations of a local stage folder that no process reads any more; returns them."""
        return self.generations.collect(stage, fingerprint[:SHORT]) if self.is_local else []

    def local_dir(self, stage: str, fingerprint: str, files: list[str] | None = None,
                  generation: str | None = None) -> Path:
        """A local folder holding a committed stage's files, kept for this process: locally the (pinned or current)
        generation, leased; remotely this node's copy of the (pinned or current) commit, downloaded if needed (only
        `files` if given)."""
        if self.is_local:
            folder = self.generations.open(stage, fingerprint[:SHORT], generation)
            if folder is None and generation:
                raise StoreError(f"{self.base}/{stage}/{generation}: the generation of {stage} this run reads is gone")
            self.collect(stage, fingerprint)
            return folder or Path(self.stage_path(stage, fingerprint))
        uri, folder = self.stage_uri(stage, fingerprint), self.stage_path(stage, fingerprint)
        for _ in range(3):  # committed anew during the download: the newest commit, unless the run pinned one
            commit = self._commit_in(folder, fingerprint, check_files=False)
            if commit is None:
                raise StoreError(f"{uri}: not committed (being rebuilt?)")
            if generation and commit.key != generation:
                raise StoreError(f"{uri} was committed anew while this run read it (commit {generation} -> "
                                 f"{commit.key}); run again")
            try:
                return NodeCache(self.uri).fetch(self.fs, commit, stage, fingerprint[:SHORT], files,
                                                 recheck=lambda: self._key_now(folder, fingerprint))
            except Recommitted:
                if generation:
                    raise StoreError(f"{uri} is being rebuilt while this run reads it; run again") from None
        raise StoreError(f"{uri}: committed anew again and again while being downloaded")

    # --- writing --------------------------------------------------------
    def working_dir(self, stage: str, fingerprint: str, *, keep_partial: bool) -> Path:
        """Where a stage writes. Locally: the incomplete generation (resumed), or a new one; remotely a staging
        folder, a partial one kept (resume) or cleared with the stage folder."""
        if self.is_local:
            try:
                return self._local_working_dir(stage, fingerprint[:SHORT], fingerprint, keep_partial)
            except OSError as e:
                raise StoreError(f"cannot create {self.stage_path(stage, fingerprint)}: {e.strerror}") from None
        path = private_dir() / "staging" / store_key(self.uri) / stage / fingerprint[:SHORT]
        if not keep_partial:  # a crashed run's files in the store would otherwise be listed at commit
            shutil.rmtree(path, ignore_errors=True)
            folder = self.stage_path(stage, fingerprint)
            try:  # the marker first: readers stop trusting the folder before any of its files goes
                if self.fs.get_file_info(f"{folder}/{MARKER}").type == pafs.FileType.File:
                    self.fs.delete_file(f"{folder}/{MARKER}")
                self.fs.delete_dir_contents(folder, missing_dir_ok=True)
            except OSError as e:
                raise StoreError(f"cannot clear {self.stage_uri(stage, fingerprint)}: {e}") from None
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _local_working_dir(self, stage: str, fp16: str, fingerprint: str, keep_partial: bool) -> Path:
        gens = self.generations
        current = gens.current(stage, fp16)
        committed = current is not None and self._commit_in(str(current), fingerprint) is not None
        if current is not None and not committed and keep_partial:
            gens.resume(stage, fp16, current)
            return gens.link(stage, fp16)
        fresh = gens.new(stage, fp16)
        gens.collect(stage, fp16)
        if committed:  # a rebuild: written beside the committed generation, linked at its commit
            return fresh
        gens.point(stage, fp16, fresh)  # nothing committed to protect: the new generation is the stage folder at once
        return gens.link(stage, fp16)

    def _list_files(self, folder: str) -> list[dict[str, Any]]:
        infos = self.fs.get_file_info(pafs.FileSelector(folder, recursive=True))
        return sorted(({"path": i.path[len(folder) + 1:], "size": i.size} for i in infos
                       if i.type == pafs.FileType.File and not i.base_name.startswith(f".{MARKER}") and i.base_name != MARKER),
                      key=lambda f: f["path"])

    def commit(self, stage: str, fingerprint: str, workdir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
        """Upload the driver's files if remote, list everything in the stage folder (tasks on other nodes
        may have written there too), then write the marker last; locally, then make it the stage folder."""
        folder = str(workdir) if self.is_local else self.stage_path(stage, fingerprint)
        try:
            if not self.is_local:
                pafs.copy_files(str(workdir), folder, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
            files = self._list_files(folder)
            if self.is_local:
                sync_tree(workdir, [f["path"] for f in files])
        except OSError as e:
            raise StoreError(f"cannot commit {folder}: {e}") from None
        manifest = {**manifest, "fingerprint": fingerprint, "files": files, "committed_at": time.time(),
                    "commit_id": uuid.uuid4().hex}
        data = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode("utf-8")
        try:
            if self.is_local:
                self.generations.commit(stage, fingerprint[:SHORT], workdir, MARKER, data)
            else:
                with self.fs.open_output_stream(f"{folder}/{MARKER}") as f:
                    f.write(data)
        except OSError as e:
            raise StoreError(f"cannot commit {folder}: {e}") from None
        return manifest

    def write_bytes(self, path: str, data: bytes) -> None:
        try:
            self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            with self.fs.open_output_stream(path) as f:
                f.write(data)
        except OSError as e:
            raise StoreError(f"cannot write {path}: {e}") from None

    def delete(self, path: str) -> None:
        try:
            self.fs.delete_file(path)
        except OSError:
            pass  # already gone


def _json_object(data: bytes | None) -> dict[str, Any] | None:
    """The JSON object in `data`; None when there is none or it does not decode (damaged)."""
    try:
        value = json.loads(data.decode("utf-8")) if data is not None else None
    except ValueError:  # UnicodeDecodeError is one too
        return None
    return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class StageRef:
    """A stage folder as a Ray task on any node reopens it: committed inputs are read through
    `local()` (a generation of the shared folder, or a copy in this node's cache), and a task's
    output files go into `output_dir()` and are published to the stage folder by `publish()`."""

    root: str  # ArtifactStore.location
    stage: str
    fingerprint: str
    # pinned by the run that hands it out: locally the generation folder's name (the one it read, or the one it
    # writes), remotely the commit's key; None: whatever is committed when `local()` is called
    generation: str | None = None

    def store(self) -> ArtifactStore:
        return ArtifactStore(self.root)

    def local(self, files: list[str] | None = None) -> Path:
        return self.store().local_dir(self.stage, self.fingerprint, files, self.generation)

    def output_dir(self) -> Path:
        store = self.store()
        if store.is_local:
            # a rebuild's generation lives under _generations/ (not beside the stage folder's link)
            path = (store.generations.folder(self.stage, self.generation) if self.generation
                    else Path(store.stage_path(self.stage, self.fingerprint)))
            path.mkdir(parents=True, exist_ok=True)
            return path
        return Path(tempfile.mkdtemp(prefix=f"llmpipe-{self.stage}-"))

    def publish(self, folder: Path, names: list[str]) -> None:
        """Upload a task's finished files to the stage folder and drop the local copies (a no-op for a
        local store: they are already there)."""
        store = self.store()
        if store.is_local:
            return
        dest = store.stage_path(self.stage, self.fingerprint)
        for name in names:
            with open(folder / name, "rb") as src, store.fs.open_output_stream(f"{dest}/{name}") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        shutil.rmtree(folder, ignore_errors=True)
