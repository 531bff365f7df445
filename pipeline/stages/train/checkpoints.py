"""Training checkpoints: what each rank vouches for, when a checkpoint counts, which one to resume.

Every rank writes its own files of a step into a private temporary folder: its
DeepSpeed shards and its RNG states, and on rank 0 the step state
(`train_state.json`) and, at the end, the consolidated model. Last it writes a
marker `_CHECKPOINT.rank<r>.json` listing each of those files with its size and
sha256, and reports the folder with `ray.train.report`, which copies every
rank's folder into `<stage>/ray_train/step_NNNNNNNN/` (without Ray the copy
goes to a local folder). In Ray 2.60's Train v2 the only barrier inside
`report` comes *before* that upload, so no rank can know when another's files
are persisted: each rank vouches for its own files only. A checkpoint counts
when the markers of all `world_size` ranks are there, come from one attempt
(an id rank 0 draws when the worker group starts, so a folder half rewritten
by a later attempt never mixes two), and every file they list has its size and
sha256. On an object store the same holds, read through the store's pyarrow
filesystem: a candidate's markers and sizes are checked in the store, then it
is downloaded and the local copy, the one DeepSpeed will unpickle, is hashed.

Resume takes the newest checkpoint that verifies (warning about newer ones that
do not) and never silently starts over: when checkpoints exist and none
verifies it stops with a TrainingError naming them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow.fs as pafs

from pipeline.errors import ConfigError, TrainingError

STATE = "train_state.json"
MARKERS = "_CHECKPOINT.rank*.json"
_MARKER = re.compile(r"_CHECKPOINT\.rank(\d+)\.json")
_STEP = re.compile(r"step_(\d{8})")


def marker_name(rank: int) -> str:
    return f"_CHECKPOINT.rank{rank}.json"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


# --- one rank's marker ---------------------------------------------------------

def write_rank_marker(folder: Path, *, rank: int, world_size: int, attempt: str) -> None:
    """List every file of this rank's checkpoint folder (size, sha256) in its marker, written last."""
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and not _MARKER.fullmatch(p.name)]
    fs = pafs.LocalFileSystem()
    listing = [{"path": p.relative_to(folder).as_posix(), "size": p.stat().st_size,
                "sha256": _sha256(fs.open_input_stream(str(p)))} for p in files]
    tmp = folder / f".{marker_name(rank)}.tmp"
    tmp.write_text(json.dumps({"rank": rank, "world_size": world_size, "attempt": attempt, "files": listing}, indent=1))
    os.replace(tmp, folder / marker_name(rank))


def _sha256(stream: Any) -> str:
    h = hashlib.sha256()
    with stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- verifying a checkpoint folder, on any pyarrow filesystem ------------------

def _read_json(fs: pafs.FileSystem, path: str) -> Any:
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def _safe(path: Any) -> bool:
    p = PurePosixPath(path) if isinstance(path, str) else None
    return p is not None and not p.is_absolute() and ".." not in p.parts and str(p) not in ("", ".")


def _listing(fs: pafs.FileSystem, folder: str) -> tuple[list[dict[str, Any]], int] | None:
    """(every file the ranks' markers list, the world size), or None unless the markers of ranks 0..world_size-1
    are all present, readable, of one attempt, and rank 0 vouches for the step state."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    except OSError:
        return None
    markers = {int(m.group(1)): i.path for i in infos if (m := _MARKER.fullmatch(i.base_name))}
    docs = {rank: _read_json(fs, path) for rank, path in markers.items()}
    try:
        worlds = {d["world_size"] for d in docs.values()}
        attempts = {d["attempt"] for d in docs.values()}
        files = [{"path": f["path"], "size": int(f["size"]), "sha256": str(f["sha256"])} for d in docs.values() for f in d["files"]]
        if len(worlds) != 1 or len(attempts) != 1 or set(docs) != set(range(next(iter(worlds)))):
            return None
        paths = [f["path"] for f in files]
        if not all(map(_safe, paths)) or len(set(paths)) != len(paths) or STATE not in {f["path"] for f in docs[0]["files"]}:
            return None
    except (KeyError, TypeError, ValueError, StopIteration):  # a marker cut short or not ours
        return None
    return files, len(docs)


def _sizes_ok(fs: pafs.FileSystem, folder: str, files: list[dict[str, Any]]) -> bool:
    infos = fs.get_file_info([f"{folder}/{f['path']}" for f in files])
    return all(i.type == pafs.FileType.File and i.size == f["size"] for i, f in zip(infos, files))


def _hashes_ok(fs: pafs.FileSystem, folder: str, files: list[dict[str, Any]]) -> bool:
    try:
        return all(_sha256(fs.open_input_stream(f"{folder}/{f['path']}")) == f["sha256"] for f in files)
    except OSError:
        return False


def verify_checkpoint(folder: str | Path, fs: pafs.FileSystem | None = None) -> bool:
    """True if every rank's marker is present and every file listed has its size and sha256 (read through `fs`)."""
    fs, folder = fs or pafs.LocalFileSystem(), str(folder)
    listed = _listing(fs, folder)
    return listed is not None and _sizes_ok(fs, folder, listed[0]) and _hashes_ok(fs, folder, listed[0])


def _verified_state(fs: pafs.FileSystem, folder: str) -> dict[str, Any] | None:
    """The step state of a checkpoint whose markers are complete and whose files have their sizes, the state
    itself hashed: enough for the driver to check the layout before launch without reading every shard."""
    listed = _listing(fs, folder)
    if listed is None or not _sizes_ok(fs, folder, listed[0]):
        return None
    (state,) = [f for f in listed[0] if f["path"] == STATE]
    try:
        with fs.open_input_stream(f"{folder}/{STATE}") as f:
            data = f.read()
    except OSError:
        return None
    try:
        return json.loads(data) if hashlib.sha256(data).hexdigest() == state["sha256"] else None
    except ValueError:
        return None


def _step_folders(fs: pafs.FileSystem, root: str) -> list[str]:
    """The `step_NNNNNNNN` folder names under root, newest first."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError:
        return []
    return sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory and _STEP.fullmatch(i.base_name)),
                  reverse=True)


# --- where checkpoints go and which one to resume -------------------------------

class Checkpoints:
    """The checkpoints of one training run: the `step_*` folders under `root` on `fs` (Ray Train's storage, or a
    local folder without Ray). `latest()` and `at()` hand back a local folder that verified (the folder itself on
    a local filesystem, a verified download from an object store); `report()` writes this rank's marker last and
    persists its folder."""

    def __init__(self, root: str | Path | None, fs: pafs.FileSystem | None = None, *, rank: int = 0,
                 under_ray: bool = False):
        self.root, self.fs, self.rank, self.under_ray = str(root) if root else None, fs or pafs.LocalFileSystem(), rank, under_ray
        self.is_local = self.fs.type_name == "local"
        self._downloads: list[Path] = []

    @classmethod
    def for_worker(cls, under_ray: bool, local_dir: str | None, rank: int) -> Checkpoints:
        if not under_ray:
            return cls(local_dir, rank=rank)
        import ray.train

        storage = ray.train.get_context().get_storage()  # where report() persists: the run's storage path
        return cls(storage.experiment_fs_path, storage.storage_filesystem, rank=rank, under_ray=True)

    def where(self, name: str) -> str:
        return f"{self.root}/{name}"

    def latest(self) -> Path | None:
        if not self.root:
            return None
        damaged = []
        for name in _step_folders(self.fs, self.root):
            local = self._verified(name)
            if local is not None:
                # Newer folders that do not verify were cut short or changed since they were written; their files are
                # never handed to DeepSpeed, which unpickles its states (torch.load with weights_only=False).
                if damaged:  # a silent step back would hide data loss
                    print(f"WARNING: checkpoint {', '.join(damaged)} does not verify against its {MARKERS} "
                          f"(incomplete or damaged); resuming from {self.where(name)}", flush=True)
                return local
            damaged.append(self.where(name))
        if damaged:
            raise TrainingError(f"train: no checkpoint under {self.root} verifies ({', '.join(damaged)}: a rank's "
                                f"{MARKERS} is missing, or a file it lists is missing or changed); refusing to restart "
                                "from scratch (use --force train to start over)")
        return None

    def at(self, step: int) -> Path:
        """The checkpoint of `step` (the one rank 0 chose), verified here too."""
        local = self._verified(step_name(step)) if self.root else None
        if local is None:
            raise TrainingError(f"train: checkpoint {self.where(step_name(step))} does not verify on rank {self.rank}; "
                                "refusing to resume from it")
        return local

    def _verified(self, name: str) -> Path | None:
        folder = self.where(name)
        listed = _listing(self.fs, folder)
        if listed is None or not _sizes_ok(self.fs, folder, listed[0]):
            return None
        files, world = listed
        if self.is_local:
            return Path(folder) if _hashes_ok(self.fs, folder, files) else None
        local = Path(tempfile.mkdtemp(prefix=f"llmpipe-resume-r{self.rank}-")) / name
        self._downloads.append(local.parent)
        try:  # the listed files and the markers: the local copy verifies on its own
            for path in [f["path"] for f in files] + [marker_name(r) for r in range(world)]:
                (local / path).parent.mkdir(parents=True, exist_ok=True)
                with self.fs.open_input_stream(f"{folder}/{path}") as src, open(local / path, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
        except OSError:
            return None
        return local if _hashes_ok(pafs.LocalFileSystem(), str(local), files) else None

    def close(self) -> None:
        """Drop what was downloaded to resume (DeepSpeed has read it)."""
        for d in self._downloads:
            shutil.rmtree(d, ignore_errors=True)
        self._downloads = []

    def report(self, metrics: dict[str, float], folder: Path, name: str, *, world_size: int, attempt: str) -> None:
        write_rank_marker(folder, rank=self.rank, world_size=world_size, attempt=attempt)
        if self.under_ray:
            import ray.train

            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)), checkpoint_dir_name=name)
        elif self.root:
            pafs.copy_files(str(folder), self.where(name), source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)


# --- refusals before launch ------------------------------------------------------

def check_resume_layout(root: str | Path, num_workers: int, *, fs: pafs.FileSystem | None = None,
                        precision: str | None = None, device: str | None = None) -> None:
    """Before launch: a stage folder whose newest complete checkpoint was written by another number of workers,
    in another precision or on another device kind cannot resume, so say what differs."""
    fs = fs or pafs.LocalFileSystem()
    for name in _step_folders(fs, str(root)):
        state = _verified_state(fs, f"{root}/{name}")
        if state is not None:
            where = f"{root}/{name}"
            check_same_layout(state, num_workers, where)
            if precision is not None and device is not None:
                check_same_hardware(state, precision, device, where)
            return


def check_same_layout(state: dict, num_workers: int, where: Path | str) -> None:
    """ZeRO shards are per worker: a checkpoint resumes only with the worker count that wrote it."""
    written_by = state.get("world_size", num_workers)
    if written_by != num_workers:
        raise ConfigError(f"train: {where} was written by {written_by} workers and this run asks for {num_workers}; "
                         f"resume with train.num_workers={written_by} (ZeRO shards are per worker), "
                         f"or use --force train to start over")


def check_same_hardware(state: dict, precision: str, device: str, where: Path | str) -> None:
    """Optimizer states and the model's numerics belong to one precision and device kind: no resume across them."""
    was = (state.get("precision", precision), state.get("device", device))
    if was != (precision, device):
        raise ConfigError(f"train: {where} was written in {was[0]} on {was[1]} and this run resolves {precision} on "
                          f"{device}; a checkpoint resumes only in the precision and on the device kind that wrote it "
                          "(set train.precision / resources.train.num_gpus to match, or use --force train to start over)")
