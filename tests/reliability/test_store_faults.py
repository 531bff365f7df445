"""Faults in the artifact store and in training checkpoints, injected into real stage folders: a folder with
files but no `_COMPLETE.json`, a marker whose files are missing or have another size, a half-written marker,
a shard cut in half, a newest checkpoint cut in half, a store root below a regular file, a disk that is full
(`/dev/full`) and a write the kernel refuses (RLIMIT_FSIZE, which binds root too). Each is treated as
incomplete (never read downstream, redone with correct output, or resumed from the previous checkpoint with a
warning), or stops the CLI with one line naming the path and exit code 2, with nothing half-written committed.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import cli
from pipeline.config import load_config
from pipeline.engine.plan import plan
from pipeline.engine.store import MARKER, ArtifactStore
from pipeline.stages import STAGES
from pipeline.stages.train.checkpoints import MARKERS as CKPT_MARKER
from pipeline.stages.train.checkpoints import Checkpoints, verify_checkpoint
from tests.conftest import tiny_raw
from tests.test_checkpoints import _ckpt


def _config(folder: Path, corpus: Path, **sections) -> Path:
    raw = tiny_raw(corpus, folder / "store", **sections)
    raw["tracking"] = {"enabled": False}
    path = folder / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _items(cfg: Path) -> dict:
    c = load_config(cfg)
    return {it.stage.name: it for it in plan(c, ArtifactStore(c.store.root), STAGES)}


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.name != MARKER}


def _cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# --- incomplete stage folders, for real stages -----------------------------------------------------------

@pytest.fixture(scope="module")
def committed(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory, ray_local) -> dict:
    """A store in which real runs committed `tokenizer` and `prepare`: the reference outputs."""
    folder = tmp_path_factory.mktemp("reference")
    cfg = _config(folder, corpus_dir)
    assert cli.main(["run", str(cfg), "--only", "tokenizer"]) == 0
    assert cli.main(["run", str(cfg), "--only", "prepare"]) == 0
    items = _items(cfg)
    store = ArtifactStore(str(folder / "store"))
    return {"root": folder / "store", "fp": {n: items[n].fingerprint for n in items},
            "digest": {n: _digest(store.local_dir(n, items[n].fingerprint)) for n in ("tokenizer", "prepare")}}


def _damage(folder: Path, how: str) -> None:
    if how == "files-but-no-marker":  # killed before the commit
        (folder / MARKER).unlink()
        (folder / "half-written.bin").write_bytes(b"\0" * 100)
    elif how == "listed-file-missing":
        (folder / "tokenizer.json").unlink()
    elif how == "listed-file-has-another-size":
        with open(folder / "tokenizer.json", "ab") as f:
            f.write(b" ")  # still valid JSON: only the size tells
    elif how == "marker-cut-in-half":
        _cut_in_half(folder / MARKER)
    elif how == "shard-cut-in-half":
        _cut_in_half(folder / "train-00000.arrow")


DAMAGES = [("tokenizer", "prepare", d) for d in
           ("files-but-no-marker", "listed-file-missing", "listed-file-has-another-size", "marker-cut-in-half")]
DAMAGES.append(("prepare", "train", "shard-cut-in-half"))


@pytest.mark.slow
@pytest.mark.parametrize("stage,downstream,how", DAMAGES, ids=[f"{s}-{d}" for s, _, d in DAMAGES])
def test_a_damaged_stage_folder_is_incomplete_never_read_and_redone_correctly(committed, corpus_dir, tmp_path, capsys,
                                                                               stage, downstream, how):
    shutil.copytree(committed["root"], tmp_path / "store")
    cfg = _config(tmp_path, corpus_dir)
    fp = committed["fp"][stage]
    folder = Path(ArtifactStore(str(tmp_path / "store")).stage_path(stage, fp))
    _damage(folder, how)

    item = _items(cfg)[stage]
    assert item.fingerprint == fp and item.state == "missing" and item.reasons == ["incomplete folder: will redo"]
    capsys.readouterr()
    assert cli.main(["run", str(cfg), "--only", downstream]) == 2  # never read downstream
    assert capsys.readouterr().err == (f"llmpipe: error: --only {downstream}: upstream stage {stage} is missing; run it "
                                       f"first (e.g. `llmpipe run CONFIG --only {stage}` or without --only)\n")

    assert cli.main(["run", str(cfg), "--only", stage]) == 0
    assert f"[{stage}] running {fp[:16]}" in capsys.readouterr().out
    assert _digest(folder) == committed["digest"][stage]  # redone from scratch: same bytes, no leftovers
    assert _items(cfg)[stage].state == "cached"


# --- a damaged newest training checkpoint ----------------------------------------------------------------

def test_a_newest_checkpoint_cut_in_half_falls_back_to_the_previous_one_with_a_warning(tmp_path, capsys):
    _ckpt(tmp_path, 3)
    newest = _ckpt(tmp_path, 6)
    _cut_in_half(newest / "deepspeed" / "zero_pp_rank_0_optim_states.pt")
    assert Checkpoints(str(tmp_path)).latest() == tmp_path / "step_00000003"
    assert capsys.readouterr().out == (f"WARNING: checkpoint {newest} does not verify against its {CKPT_MARKER} "
                                       f"(incomplete or damaged); resuming from {tmp_path / 'step_00000003'}\n")


TRAIN = r"""
import json, sys
from pipeline.stages.train.worker import train_loop_per_worker
train_loop_per_worker(json.loads(sys.argv[1]))
"""


def _train(config: dict, cwd: Path) -> str:
    """The per-worker training function in a process of its own (DeepSpeed without Ray), its stdout."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = subprocess.run([sys.executable, "-c", TRAIN, json.dumps(config)], capture_output=True, text=True, cwd=cwd,
                         env=env, timeout=500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_training_resumes_past_a_newest_checkpoint_cut_in_half_with_a_warning_and_ends_identical(tmp_path):
    from pipeline.schema import ModelSection, TrainConfig
    from tokenization.shards import write_shard

    rng = np.random.default_rng(0)
    write_shard(tmp_path / "train-00000.arrow", [rng.integers(0, 64, 300) for _ in range(20)], np.dtype(np.uint16))
    ckpts = tmp_path / "ckpts"
    config = {"model": {**ModelSection(n_layer=1, n_head=2, d_model=16, max_seq_len=16).model_config_fields(), "vocab_size": 64},
              "train": TrainConfig(steps=6, global_batch_size=4, micro_batch_size=2, num_workers=1, warmup_steps=1,
                                   checkpoint_every=3, log_every=1, zero_stage=1).model_dump(mode="json"),
              "seq_len": 16, "train_shards": [str(tmp_path / "train-00000.arrow")], "local_checkpoint_dir": str(ckpts)}
    _train(config, tmp_path)
    step3, step6 = ckpts / "step_00000003", ckpts / "step_00000006"
    assert verify_checkpoint(step3) and verify_checkpoint(step6)
    final = hashlib.sha256((step6 / "model.safetensors").read_bytes()).hexdigest()

    biggest = max((p for p in step6.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    _cut_in_half(biggest)  # the newest checkpoint's largest file, half written
    out = _train(config, tmp_path)
    assert (f"WARNING: checkpoint {step6} does not verify against its {CKPT_MARKER} (incomplete or damaged); "
            f"resuming from {step3}") in out
    assert f"[rank 0] resumed from {step3} at step 3" in out
    assert verify_checkpoint(step6)  # rewritten whole
    assert hashlib.sha256((step6 / "model.safetensors").read_bytes()).hexdigest() == final  # an exact resume


# --- the store's disk refuses writes ---------------------------------------------------------------------

def test_a_store_root_below_a_regular_file_is_one_line_naming_the_path_and_commits_nothing(corpus_dir, tmp_path, capsys):
    (tmp_path / "afile").write_text("not a folder")
    raw = tiny_raw(corpus_dir, tmp_path / "afile" / "store")
    raw["tracking"] = {"enabled": False}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert cli.main(["run", str(tmp_path / "c.yaml")]) == 2  # fails at the first write, before Ray starts
    folder = tmp_path / "afile" / "store" / "_locks"
    assert capsys.readouterr().err == f"llmpipe: error: cannot create lock folder {folder}: Not a directory\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "c.yaml"] and (tmp_path / "afile").read_text() == "not a folder"


@pytest.mark.slow
def test_a_full_disk_when_recording_the_run_is_one_line_naming_the_file_and_keeps_the_commit(corpus_dir, tmp_path, capsys,
                                                                                             ray_local):
    cfg = _config(tmp_path, corpus_dir)
    pointer = tmp_path / "store" / "_runs" / "tiny.json"
    pointer.parent.mkdir(parents=True)
    tmp = Path(f"{pointer}.{os.getpid()}.tmp")  # the temporary file `remember` writes, then renames
    tmp.symlink_to("/dev/full")  # every write to it fails with ENOSPC
    assert cli.main(["run", str(cfg), "--only", "tokenizer"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"llmpipe: error: cannot write {pointer}: No space left on device"
    assert not pointer.exists() and not tmp.is_symlink()  # no half-written pointer, the temporary removed
    assert _items(cfg)["tokenizer"].state == "cached"  # the stage itself had committed before
    assert cli.main(["run", str(cfg), "--only", "tokenizer"]) == 0 and json.loads(pointer.read_text()).keys() == {"tokenizer"}


@contextmanager
def _file_size_limit(limit: int) -> Iterator[None]:
    """The kernel refuses (EFBIG) any write past `limit` bytes in this process, root included, like a full quota."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process instead of failing the write
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.slow
def test_a_write_refused_inside_a_stage_is_one_line_naming_the_file_and_nothing_is_committed(committed, corpus_dir,
                                                                                             tmp_path, capsys):
    given = Path(ArtifactStore(str(committed["root"])).stage_path("tokenizer", committed["fp"]["tokenizer"])) / "tokenizer.json"
    assert given.stat().st_size > 4096
    cfg = _config(tmp_path, corpus_dir, tokenizer={"path": str(given)})  # the stage copies it in this process
    fp = _items(cfg)["tokenizer"].fingerprint
    out = Path(ArtifactStore(str(tmp_path / "store")).stage_path("tokenizer", fp)) / "tokenizer.json"
    capsys.readouterr()
    with _file_size_limit(2048):
        code = cli.main(["run", str(cfg), "--only", "tokenizer"])
    assert code == 2
    assert capsys.readouterr().err == f"llmpipe: error: File too large: {out}\n"
    assert out.stat().st_size == 2048 and not (out.parent / MARKER).exists()  # half written, not committed
    assert _items(cfg)["tokenizer"].reasons == ["incomplete folder: will redo"]
    assert cli.main(["run", str(cfg), "--only", "tokenizer"]) == 0
    assert out.read_bytes() == given.read_bytes() and (out.parent / MARKER).exists()
