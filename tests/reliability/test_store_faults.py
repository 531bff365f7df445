"""Faults in the artifact store and in training checkpoints, injected into real stage folders: a folder with
files but no `_COMPLETE.json`, a marker whose files are missing or have another size, a half-written marker,
a shard cut in half, a newest checkpoint cut in half, a store root below a regular file, a disk that is full
(`/dev/full`) and a write the kernel refuses (RLIMIT_FSIZE, which binds root too). Each is treated as
incomplete (never read downstream, redone with correct output, or resumed from the previous checkpoint with a
warning), or stops the CLI with one line naming the path and exit code 2, with nothing half-written committed.
A read error on a marker (EIO from the filesystem) is not an absent marker: a brief one is retried and the
stage stays cached, a lasting one is one line naming the marker, and nothing is deleted either way. A local
commit makes every data file and folder durable (fsync) before the marker is renamed into place.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.fs as pafs
import pytest
import yaml

from pipeline import cli
from pipeline.config import load_config
from pipeline.engine.execute import execute
from pipeline.engine.plan import plan
from pipeline.engine.stage import Stage
from pipeline.engine.store import MARKER, ArtifactStore
from pipeline.errors import StoreError
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
                         env=env, timeout=500, check=False)
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


# --- a read error on the marker is not an absent marker ---------------------------------------------------

class _FailingOpen(pafs.FSSpecHandler):
    """The local filesystem, except that opening a `_COMPLETE.json` fails with EIO `times` times (None: always)."""

    def __init__(self, times: int | None):
        super().__init__(fsspec.filesystem("file"))
        self.left, self.failed = times, 0

    def open_input_stream(self, path: str):
        if Path(path).name == MARKER and (self.left is None or self.left > 0):
            self.failed += 1
            if self.left is not None:
                self.left -= 1
            raise OSError(errno.EIO, "Input/output error", path)
        return super().open_input_stream(path)


def _build_stage(calls: list[str]) -> list[Stage]:
    def run(ctx):
        calls.append(ctx.stage)
        (ctx.out_dir / "out.txt").write_text("built")
        return {}
    return [Stage(name="build", needs=(), section=lambda c: {"x": 1}, version=1, run=run, uses_ray=False)]


def test_a_brief_error_reading_the_marker_is_retried_and_the_stage_stays_cached_not_rebuilt(tiny_config):
    calls: list[str] = []
    stages, cfg = _build_stage(calls), tiny_config(tracking={"enabled": False})
    execute(cfg, plan(cfg, ArtifactStore(cfg.store.root), stages), stages, echo=lambda line: None)
    store = ArtifactStore(cfg.store.root)
    (item,) = plan(cfg, store, stages)
    folder = Path(store.stage_path("build", item.fingerprint))
    marker = (folder / MARKER).read_bytes()

    handler = _FailingOpen(times=1)
    store.fs = pafs.PyFileSystem(handler)  # the filesystem of the store `plan` reads through
    (item,) = plan(cfg, store, stages)
    assert handler.failed == 1  # the fault fired
    assert item.state == "cached" and not item.run and item.reasons == []
    execute(cfg, [item], stages, echo=lambda line: None)
    assert calls == ["build"]  # built once, never again
    assert (folder / MARKER).read_bytes() == marker and (folder / "out.txt").read_text() == "built"


def test_a_lasting_error_reading_the_marker_is_one_line_naming_it_and_deletes_nothing(corpus_dir, tmp_path, capsys,
                                                                                      monkeypatch):
    cfg = _config(tmp_path, corpus_dir)
    fp = _items(cfg)["tokenizer"].fingerprint
    store = ArtifactStore(str(tmp_path / "store"))
    work = store.working_dir("tokenizer", fp, keep_partial=False)
    (work / "tokenizer.json").write_text("{}")
    store.commit("tokenizer", fp, work, {"stage": "tokenizer"})
    folder = Path(store.stage_path("tokenizer", fp))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    marker = os.path.realpath(folder / MARKER)

    init = ArtifactStore.__init__

    def failing(self: ArtifactStore, root: str) -> None:  # every store the CLI opens reads through a failing disk
        init(self, root)
        self.fs = pafs.PyFileSystem(_FailingOpen(times=None))

    monkeypatch.setattr(ArtifactStore, "__init__", failing)
    capsys.readouterr()
    for argv in (["status", str(cfg)], ["run", str(cfg)]):
        assert cli.main(argv) == 2
        out = capsys.readouterr()
        assert re.fullmatch(rf"llmpipe: error: cannot read {re.escape(marker)}: .*Input/output error.*\n", out.err), out.err
        assert "running" not in out.out
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing cleared
    with pytest.raises(StoreError, match=f"^cannot read {re.escape(marker)}: "):
        ArtifactStore(str(tmp_path / "store")).manifest("tokenizer", fp)
    monkeypatch.setattr(ArtifactStore, "__init__", init)
    assert _items(cfg)["tokenizer"].state == "cached"


def test_a_local_commit_syncs_every_data_file_and_folder_before_the_marker_is_renamed_into_place(tmp_path, monkeypatch):
    store = ArtifactStore(str(tmp_path / "root"))
    work = store.working_dir("s", "ab" * 32, keep_partial=False)
    (work / "sub").mkdir()
    (work / "sub" / "a.bin").write_bytes(b"1234")
    (work / "b.bin").write_bytes(b"5")
    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def spy_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def spy_replace(src, dst) -> None:
        events.append(("replace", os.path.realpath(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    store.commit("s", "ab" * 32, work, {"stage": "s"})
    real = Path(os.path.realpath(work))
    committed = events.index(("replace", str(real / MARKER)))
    synced = {path for kind, path in events[:committed] if kind == "fsync"}
    assert {str(real / "sub" / "a.bin"), str(real / "b.bin"), str(real / "sub"), str(real)} <= synced
