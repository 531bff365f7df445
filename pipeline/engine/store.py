"""The artifact store: `<root>/<stage>/<fingerprint>/`, committed by `_COMPLETE.json`.

A stage folder is *complete* only when `_COMPLETE.json` exists, names the same
full fingerprint as the folder (the folder name is a prefix, so a prefix
collision is detected rather than silently reused) and every file it lists is
present with the listed size. Anything else is incomplete: never read
downstream, and either resumed (training) or cleared and redone.

The root is a local folder or any `pyarrow.fs` URI. Stages always work in a
local folder: for a local root that *is* the stage folder; for a remote root it
is a staging folder uploaded at commit time, before the marker. The marker is
written last: locally via write-to-temp + rename (atomic on POSIX), on object
stores as a single PUT (atomic per object).

`<root>/_runs/<experiment>.json` remembers the fingerprint each stage had the
last time this experiment committed it, so `status` can say *why* a stage is
stale (which config keys changed), not only that it is.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from pipeline.errors import StoreError

MARKER = "_COMPLETE.json"
SHORT = 16  # hex chars of the fingerprint used in folder names



def _is_uri(root: str) -> bool:
    return "://" in root and not root.startswith("file://")


class ArtifactStore:
    def __init__(self, root: str):
        self.uri = root
        try:
            if _is_uri(root):
                self.fs, self.base = pafs.FileSystem.from_uri(root)
                self.is_local = False
            else:
                path = root[len("file://"):] if root.startswith("file://") else root
                self.fs, self.base = pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())
                self.is_local = True
        except (ValueError, OSError) as e:  # pyarrow.ArrowInvalid is a ValueError
            raise StoreError(f"store.root {root!r}: {e}") from None
        self._cache = Path(tempfile.gettempdir()) / "llmpipe-cache"

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

    def ref(self, stage: str, fingerprint: str) -> StageRef:
        return StageRef(self.location, stage, fingerprint)

    # --- reading --------------------------------------------------------
    def read_json(self, path: str) -> dict[str, Any] | None:
        try:
            with self.fs.open_input_stream(path) as f:
                return json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None  # unreadable or half-written JSON is the same as absent

    def manifest(self, stage: str, fingerprint: str) -> dict[str, Any] | None:
        """The committed manifest, or None if the folder is not complete."""
        folder = self.stage_path(stage, fingerprint)
        m = self.read_json(f"{folder}/{MARKER}")
        if m is None or m.get("fingerprint") != fingerprint:
            return None
        files = m.get("files", [])
        infos = self.fs.get_file_info([f"{folder}/{f['path']}" for f in files]) if files else []
        for f, info in zip(files, infos):
            if info.type != pafs.FileType.File or info.size != f["size"]:
                return None
        return m

    def folder_manifest(self, stage: str, folder_name: str) -> dict[str, Any] | None:
        """The committed manifest of `<root>/<stage>/<folder_name>` when all you have is the folder."""
        m = self.read_json(f"{self.base}/{stage}/{folder_name}/{MARKER}")
        fp = m.get("fingerprint") if isinstance(m, dict) else None
        return self.manifest(stage, fp) if isinstance(fp, str) and fp[:SHORT] == folder_name else None

    def exists(self, stage: str, fingerprint: str) -> bool:
        info = self.fs.get_file_info(self.stage_path(stage, fingerprint))
        return info.type == pafs.FileType.Directory

    def local_dir(self, stage: str, fingerprint: str, files: list[str] | None = None) -> Path:
        """A local folder holding a committed stage's files (downloaded if remote; only `files` if given)."""
        if self.is_local:
            return Path(self.stage_path(stage, fingerprint))
        dest = self._cache / stage / fingerprint[:SHORT]
        if files is not None:
            folder = self.stage_path(stage, fingerprint)
            for name in files:
                target = dest / name
                info = self.fs.get_file_info(f"{folder}/{name}")
                if not target.is_file() or target.stat().st_size != info.size:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
                    with self.fs.open_input_stream(f"{folder}/{name}") as src, open(tmp, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
                    os.replace(tmp, target)
            return dest
        if not (dest / MARKER).exists():
            self._cache.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=self._cache))
            pafs.copy_files(self.stage_path(stage, fingerprint), str(tmp), source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem())
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(dest, ignore_errors=True)
            tmp.rename(dest)
        return dest

    # --- writing --------------------------------------------------------
    def working_dir(self, stage: str, fingerprint: str, *, keep_partial: bool) -> Path:
        """Where a stage writes. A partial local folder is kept (resume) or cleared."""
        if self.is_local:
            path = Path(self.stage_path(stage, fingerprint))
            if path.exists() and not keep_partial:
                shutil.rmtree(path)
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create {path}: {e.strerror}") from None
            return path
        path = self._cache / "staging" / stage / fingerprint[:SHORT]
        if not keep_partial:  # a crashed run's files in the store would otherwise be listed at commit
            shutil.rmtree(path, ignore_errors=True)
            try:
                self.fs.delete_dir_contents(self.stage_path(stage, fingerprint), missing_dir_ok=True)
            except OSError as e:
                raise StoreError(f"cannot clear {self.stage_uri(stage, fingerprint)}: {e}") from None
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _list_files(self, folder: str) -> list[dict[str, Any]]:
        infos = self.fs.get_file_info(pafs.FileSelector(folder, recursive=True))
        return sorted(({"path": i.path[len(folder) + 1:], "size": i.size} for i in infos
                       if i.type == pafs.FileType.File and not i.base_name.startswith(f".{MARKER}") and i.base_name != MARKER),
                      key=lambda f: f["path"])

    def commit(self, stage: str, fingerprint: str, workdir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
        """Upload the driver's files if remote, list everything in the stage folder (tasks on other nodes
        may have written there too), then write the marker last."""
        folder = self.stage_path(stage, fingerprint)
        try:
            if not self.is_local:
                pafs.copy_files(str(workdir), folder, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
            files = self._list_files(folder)
        except OSError as e:
            raise StoreError(f"cannot commit {folder}: {e}") from None
        manifest = {**manifest, "fingerprint": fingerprint, "files": files, "committed_at": time.time()}
        data = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode("utf-8")
        try:
            if self.is_local:
                tmp = workdir / f".{MARKER}.tmp"
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, workdir / MARKER)
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

    # --- the per-experiment pointer used to explain staleness ------------
    def _runs_path(self, experiment: str) -> str:
        return f"{self.base}/_runs/{experiment}.json"

    def last_fingerprints(self, experiment: str) -> dict[str, str]:
        return self.read_json(self._runs_path(experiment)) or {}

    def remember(self, experiment: str, stage: str, fingerprint: str) -> None:
        state = self.last_fingerprints(experiment)
        state[stage] = fingerprint
        path = self._runs_path(experiment)
        data = json.dumps(state, indent=2, sort_keys=True).encode("utf-8")
        if self.is_local:
            tmp = f"{path}.{os.getpid()}.tmp"
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                Path(tmp).write_bytes(data)
                os.replace(tmp, path)
            except OSError as e:  # disk full, read-only: the old pointer stays whole
                Path(tmp).unlink(missing_ok=True)
                raise StoreError(f"cannot write {path}: {e.strerror}") from None
        else:
            with self.fs.open_output_stream(path) as f:
                f.write(data)


@dataclass(frozen=True)
class StageRef:
    """A stage folder as a Ray task on any node reopens it: committed inputs are read through
    `local()` (the shared path itself, or a download into this node's cache), and a task's
    output files go into `output_dir()` and are published to the stage folder by `publish()`."""

    root: str  # ArtifactStore.location
    stage: str
    fingerprint: str

    def store(self) -> ArtifactStore:
        return ArtifactStore(self.root)

    def local(self, files: list[str] | None = None) -> Path:
        return self.store().local_dir(self.stage, self.fingerprint, files)

    def output_dir(self) -> Path:
        store = self.store()
        if store.is_local:
            path = Path(store.stage_path(self.stage, self.fingerprint))
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
