"""Training checkpoints: where they live, when one counts as complete, which one to resume.

Every rank writes its DeepSpeed files into a temporary folder and reports it with
`ray.train.report`, which merges all ranks' files into `<stage>/ray_train/step_NNNNNNNN/`
(or, without Ray, they are copied to a local folder). Because the report is a barrier,
rank 0 then knows every file is persisted and writes `_CHECKPOINT.json` last.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pipeline.errors import ConfigError
from tokenization.shards import sha256_file

STATE = "train_state.json"
MARKER = "_CHECKPOINT.json"


class Checkpoints:
    """Where checkpoints go: Ray Train's storage (merged across ranks) or a local folder.

    After a checkpoint is persisted, rank 0 writes `_CHECKPOINT.json` into it last, listing every
    file with its size and sha256; a checkpoint counts only if that marker verifies. Resume takes
    the newest verified one (falling back past a damaged newest one, with a warning) and never
    silently starts over when checkpoints exist."""

    def __init__(self, under_ray: bool, local_dir: str | None):
        self.under_ray, self.local_dir = under_ray, local_dir

    def latest(self) -> Path | None:
        registered = self._registered()
        folders = sorted(Path(self.local_dir).glob("step_*"), reverse=True) if self.local_dir and Path(self.local_dir).is_dir() else []
        if registered is not None and registered not in folders:
            return registered if (registered / STATE).is_file() else None  # remote storage: Ray's registration is what we have
        damaged = []
        for folder in folders:
            if verify_checkpoint(folder):
                # Newer folders that do not verify were cut short or changed since they were written; their files are
                # never handed to DeepSpeed, which unpickles its states (torch.load with weights_only=False).
                if damaged:  # say so whether or not Ray registered the damaged one: a silent step back hides data loss
                    print(f"WARNING: checkpoint {', '.join(map(str, damaged))} does not verify against its {MARKER} "
                          f"(incomplete or damaged); resuming from {folder}", flush=True)
                return folder
            damaged.append(folder)
        if folders:
            raise RuntimeError(f"no checkpoint under {self.local_dir} verifies against its _CHECKPOINT.json; refusing to "
                               "restart from scratch (delete the stage folder to start over)")
        return None

    def _registered(self) -> Path | None:
        if not self.under_ray:
            return None
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        return Path(ckpt.path) if ckpt.filesystem.type_name == "local" else Path(ckpt.to_directory())

    def report(self, metrics: dict[str, float], folder: Path, name: str, rank: int) -> None:
        if self.under_ray:
            import ray.train

            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)), checkpoint_dir_name=name)
        elif self.local_dir:
            shutil.copytree(folder, Path(self.local_dir) / name, dirs_exist_ok=True)
        if rank == 0 and self.local_dir and (Path(self.local_dir) / name).is_dir():
            write_checkpoint_marker(Path(self.local_dir) / name)  # all ranks' files are persisted: report is a barrier


def write_checkpoint_marker(folder: Path) -> None:
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER]
    listing = [{"path": p.relative_to(folder).as_posix(), "size": p.stat().st_size, "sha256": sha256_file(p)} for p in files]
    tmp = folder / f".{MARKER}.tmp"
    tmp.write_text(json.dumps({"files": listing}, indent=1))
    os.replace(tmp, folder / MARKER)


def verify_checkpoint(folder: Path) -> bool:
    """True if `_CHECKPOINT.json` exists and every file it lists has its size and sha256."""
    try:
        listing = json.loads((folder / MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    for f in listing:
        p = folder / f["path"]
        if not p.is_file() or p.stat().st_size != f["size"] or sha256_file(p) != f["sha256"]:
            return False
    return any(f["path"] == STATE for f in listing)


def check_resume_layout(local_dir: str | Path, num_workers: int, *, precision: str | None = None,
                        device: str | None = None) -> None:
    """Before launch: a stage folder whose newest verified checkpoint was written by another number of workers,
    in another precision or on another device kind cannot resume, so say what differs."""
    folders = sorted(Path(local_dir).glob("step_*"), reverse=True) if Path(local_dir).is_dir() else []
    for folder in folders:
        if verify_checkpoint(folder):
            state = json.loads((folder / STATE).read_text())
            check_same_layout(state, num_workers, folder)
            if precision is not None and device is not None:
                check_same_hardware(state, precision, device, folder)
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
