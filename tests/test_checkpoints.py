import json

import pytest

from pipeline.errors import ConfigError
from pipeline.stages.train.checkpoints import (
    MARKER,
    STATE,
    Checkpoints,
    verify_checkpoint,
    write_checkpoint_marker,
)


def _ckpt(root, step: int, payload: bytes = b"weights"):
    d = root / f"step_{step:08d}"
    (d / "deepspeed").mkdir(parents=True)
    (d / "deepspeed" / "zero_pp_rank_0_optim_states.pt").write_bytes(payload * 100)
    (d / STATE).write_text(json.dumps({"step": step}))
    write_checkpoint_marker(d)
    return d


def test_a_checkpoint_counts_only_when_its_marker_verifies(tmp_path):
    d = _ckpt(tmp_path, 3)
    assert verify_checkpoint(d)
    listed = json.loads((d / MARKER).read_text())["files"]
    assert {f["path"] for f in listed} == {"deepspeed/zero_pp_rank_0_optim_states.pt", STATE} and all(len(f["sha256"]) == 64 for f in listed)
    shard = d / "deepspeed" / "zero_pp_rank_0_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # cut in half
    assert not verify_checkpoint(d)
    shard.write_bytes(b"X" * 700)  # same size, other bytes
    assert not verify_checkpoint(d)


def test_resume_falls_back_past_a_damaged_newest_checkpoint_and_never_restarts_silently(tmp_path, capsys):
    _ckpt(tmp_path, 3)
    newest = _ckpt(tmp_path, 6)
    store = Checkpoints(under_ray=False, local_dir=str(tmp_path))
    assert store.latest().name == "step_00000006"
    (newest / MARKER).unlink()  # killed before the marker was written
    assert store.latest().name == "step_00000003"
    (tmp_path / "step_00000003" / STATE).write_text("{}")
    with pytest.raises(RuntimeError, match="refusing to restart from scratch"):
        store.latest()
    assert Checkpoints(under_ray=False, local_dir=str(tmp_path / "none")).latest() is None


def test_resuming_with_another_worker_count_is_refused_before_launch_saying_which_count(tmp_path):
    from pipeline.stages.train.checkpoints import check_resume_layout

    d = _ckpt(tmp_path, 3)
    (d / STATE).write_text(json.dumps({"step": 3, "world_size": 2}))
    write_checkpoint_marker(d)
    check_resume_layout(tmp_path, 2)  # same layout: fine
    check_resume_layout(tmp_path / "fresh", 3)  # nothing to resume: fine
    with pytest.raises(ValueError, match=r"written by 2 workers and this run asks for 3; resume with train.num_workers=2"):
        check_resume_layout(tmp_path, 3)


def test_resuming_a_checkpoint_of_another_precision_or_device_is_refused_before_launch_naming_both(tmp_path):
    from pipeline.stages.train.checkpoints import check_resume_layout

    d = _ckpt(tmp_path, 3)
    (d / STATE).write_text(json.dumps({"step": 3, "world_size": 1, "precision": "fp32", "device": "cpu"}))
    write_checkpoint_marker(d)
    check_resume_layout(tmp_path, 1, precision="fp32", device="cpu")  # the same: fine
    with pytest.raises(ConfigError) as e:
        check_resume_layout(tmp_path, 1, precision="bf16", device="cuda")
    msg = str(e.value)
    assert "\n" not in msg and str(d) in msg
    assert "written in fp32 on cpu and this run resolves bf16 on cuda" in msg and "--force train" in msg
