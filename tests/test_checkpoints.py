"""Training checkpoints: each rank's marker vouches for its own files; a checkpoint counts only when every rank's
marker is present and every file it lists verifies, on a local store and on an S3 server alike; resume falls back
past what does not verify and never restarts silently; a checkpoint of another layout, precision or device kind
is refused before launch; each rank's RNG states round-trip through JSON."""

import json
import random
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from pipeline.errors import ConfigError, TrainingError
from pipeline.stages.train.checkpoints import (
    MARKERS,
    STATE,
    Checkpoints,
    check_resume_layout,
    marker_name,
    verify_checkpoint,
)
from pipeline.stages.train.rng import load_rng, restore_rng, save_rng, seed_rank


def _save(root: str, step: int, *, fs=None, world: int = 1, attempt: str = "a1", payload: bytes = b"weights",
          state: dict | None = None) -> str:
    """What `world` ranks do at a checkpoint: each writes its own files into a private folder, then its marker,
    and uploads the folder into `<root>/step_NNNNNNNN` (here without Ray: a copy through the store's filesystem)."""
    name = f"step_{step:08d}"
    for rank in range(world):
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            (d / "deepspeed").mkdir()
            (d / "deepspeed" / f"zero_pp_rank_{rank}_optim_states.pt").write_bytes(payload * 100)
            if rank == 0:
                (d / STATE).write_text(json.dumps(state or {"step": step, "world_size": world}))
            Checkpoints(root, fs, rank=rank).report({}, d, name, world_size=world, attempt=attempt)
    return f"{root}/{name}"


def _ckpt(root, step: int, payload: bytes = b"weights") -> Path:
    """A one-rank checkpoint in a local folder."""
    return Path(_save(str(root), step, payload=payload))


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from tests.servers import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.stop()


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """(filesystem, root) of a checkpoint folder: a local path, or a prefix on the S3 server."""
    if request.param == "local":
        return pafs.LocalFileSystem(), str(tmp_path / "ray_train")
    s3 = request.getfixturevalue("s3")
    return s3.filesystem(), f"{s3.bucket}/{tmp_path.name}/ray_train"


def _cut(fs, path: str) -> None:
    with fs.open_input_stream(path) as f:
        data = f.read()
    with fs.open_output_stream(path) as f:
        f.write(data[: len(data) // 2])


def test_a_checkpoint_counts_only_when_its_marker_verifies(tmp_path):
    d = _ckpt(tmp_path, 3)
    assert verify_checkpoint(d)
    listed = json.loads((d / marker_name(0)).read_text())["files"]
    assert {f["path"] for f in listed} == {"deepspeed/zero_pp_rank_0_optim_states.pt", STATE} and all(len(f["sha256"]) == 64 for f in listed)
    shard = d / "deepspeed" / "zero_pp_rank_0_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # cut in half
    assert not verify_checkpoint(d)
    shard.write_bytes(b"X" * 700)  # same size, other bytes
    assert not verify_checkpoint(d)


def test_resume_falls_back_past_a_damaged_newest_checkpoint_and_never_restarts_silently(tmp_path, capsys):
    _ckpt(tmp_path, 3)
    newest = _ckpt(tmp_path, 6)
    store = Checkpoints(str(tmp_path))
    assert store.latest().name == "step_00000006"
    (newest / marker_name(0)).unlink()  # killed before the marker was written
    assert store.latest().name == "step_00000003"
    (tmp_path / "step_00000003" / STATE).write_text("{}")
    with pytest.raises(TrainingError, match="refusing to restart from scratch"):
        store.latest()
    assert Checkpoints(str(tmp_path / "none")).latest() is None


def test_a_checkpoint_counts_only_when_every_ranks_marker_is_present_and_every_file_verifies(store, capsys):
    fs, root = store
    _save(root, 3, fs=fs, world=2)
    newest = _save(root, 6, fs=fs, world=2)
    assert verify_checkpoint(newest, fs) and Checkpoints(root, fs).latest().name == "step_00000006"
    capsys.readouterr()

    fs.move(f"{newest}/{marker_name(1)}", f"{root}/kept")  # rank 1's upload not finished: its marker is missing
    assert not verify_checkpoint(newest, fs)
    chosen = Checkpoints(root, fs).latest()
    assert chosen.name == "step_00000003" and verify_checkpoint(chosen)  # the previous one, verified where it is loaded
    assert capsys.readouterr().out == (f"WARNING: checkpoint {newest} does not verify against its {MARKERS} "
                                       f"(incomplete or damaged); resuming from {root}/step_00000003\n")

    fs.move(f"{root}/kept", f"{newest}/{marker_name(1)}")
    assert Checkpoints(root, fs).latest().name == "step_00000006"
    _cut(fs, f"{newest}/deepspeed/zero_pp_rank_1_optim_states.pt")  # rank 1's shard half written
    assert not verify_checkpoint(newest, fs) and Checkpoints(root, fs).latest().name == "step_00000003"


def test_a_checkpoint_half_rewritten_by_a_later_attempt_does_not_count(store):
    fs, root = store
    _save(root, 3, fs=fs, world=2)
    newest = _save(root, 6, fs=fs, world=2, attempt="first")
    with tempfile.TemporaryDirectory() as tmp:  # a restarted worker group rewrites step 6: rank 0 is done, rank 1 not yet
        d = Path(tmp)
        (d / "deepspeed").mkdir()
        (d / "deepspeed" / "zero_pp_rank_0_optim_states.pt").write_bytes(b"weights" * 100)
        (d / STATE).write_text(json.dumps({"step": 6, "world_size": 2}))
        Checkpoints(root, fs, rank=0).report({}, d, "step_00000006", world_size=2, attempt="second")
    assert not verify_checkpoint(newest, fs)
    assert Checkpoints(root, fs).latest().name == "step_00000003"


def test_a_checkpoint_without_its_step_state_is_never_resumed_and_resume_never_restarts_silently(store):
    fs, root = store
    _save(root, 3, fs=fs, world=2)
    newest = _save(root, 6, fs=fs, world=2)
    fs.delete_file(f"{newest}/{STATE}")  # e.g. Ray registered a checkpoint whose rank-0 files never arrived
    assert Checkpoints(root, fs).latest().name == "step_00000003"
    fs.delete_dir(f"{root}/step_00000003")
    with pytest.raises(TrainingError, match=rf"no checkpoint under {root} verifies \({newest}\b.*refusing to restart "
                                            "from scratch"):
        Checkpoints(root, fs).latest()


def test_resuming_with_another_worker_count_is_refused_before_launch_saying_which_count(tmp_path):
    _save(str(tmp_path), 3, state={"step": 3, "world_size": 2})
    check_resume_layout(tmp_path, 2)  # same layout: fine
    check_resume_layout(tmp_path / "fresh", 3)  # nothing to resume: fine
    with pytest.raises(ValueError, match=r"written by 2 workers and this run asks for 3; resume with train.num_workers=2"):
        check_resume_layout(tmp_path, 3)


def test_resuming_a_checkpoint_of_another_precision_or_device_is_refused_before_launch_naming_both(store):
    fs, root = store
    _save(root, 3, fs=fs, state={"step": 3, "world_size": 1, "precision": "fp32", "device": "cpu"})
    check_resume_layout(root, 1, fs=fs, precision="fp32", device="cpu")  # the same: fine
    with pytest.raises(ConfigError) as e:
        check_resume_layout(root, 1, fs=fs, precision="bf16", device="cuda")
    msg = str(e.value)
    assert "\n" not in msg and f"{root}/step_00000003" in msg
    assert "written in fp32 on cpu and this run resolves bf16 on cuda" in msg and "--force train" in msg


def test_rng_states_round_trip_through_json_and_ranks_draw_apart(tmp_path):
    def draws():
        return torch.rand(4).tolist(), np.random.rand(2).tolist(), [random.random(), random.gauss(0, 1)]

    seed_rank(7, 0)
    draws()
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state: it must come back too
    save_rng(tmp_path, rank=0, device=torch.device("cpu"))
    expected = draws()
    seed_rank(7, 0)  # anything else in between
    draws()
    restore_rng(load_rng(tmp_path, rank=0), torch.device("cpu"))
    assert draws() == expected
    text = (tmp_path / "rng.rank0.json").read_text()
    assert set(json.loads(text)) == {"torch", "numpy", "python"}  # plain JSON: nothing to unpickle
    seed_rank(7, 1)
    other = draws()
    seed_rank(7, 0)
    assert draws()[0] != other[0]  # ranks draw different dropout masks
