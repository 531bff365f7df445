"""Two invocations racing on one stage folder, for real: separate processes (spawned, or `python -m pipeline
run` against one Ray cluster) reach the same stage while the first is still building it. The second says
whom it waits for, waits, and takes the committed stage as cached; the stage is built and committed once and
its files are intact. A holder that is killed mid-stage releases its lock with its process, and the waiter
builds the stage itself, without the dead run's leftovers (see `pipeline.locks`). A reader of a committed
stage (a process that opened the prepared data as the training workers do) keeps reading the files it opened
while another invocation force-rebuilds that stage and commits it; and concurrent updates of the experiment's
pointer file (`remember`) for different stages all survive."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from pipeline.config import parse_config
from pipeline.engine import run_pointer
from pipeline.engine.execute import execute
from pipeline.engine.plan import plan
from pipeline.engine.stage import Stage, StageContext
from pipeline.engine.store import MARKER, ArtifactStore, StageRef
from pipeline.stages import STAGES
from tests.conftest import tiny_raw
from tokenization.bpe import load_tokenizer

REPO = Path(__file__).parents[2]


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 180.0) -> None:
    """Poll until `condition` holds; a generous deadline only turns a hang into a failure."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# --- two processes running the workflow with a stage that waits for the test -----------------------------

def _slow_stage(ctx: StageContext) -> dict[str, float]:
    """Records that it ran, leaves a partial file, then waits until the test releases it."""
    control = Path(ctx.config.data.inputs[0])
    with open(control / "calls", "a") as f:
        f.write(f"{os.getpid()}\n")
    (ctx.out_dir / "partial.bin").write_bytes(b"\0" * 1000)
    (control / f"started-{os.getpid()}").touch()
    _wait_for(lambda: (control / "release").exists(), "the test to release the stage", timeout=300)
    (ctx.out_dir / "partial.bin").unlink()
    (ctx.out_dir / "out.txt").write_text(f"built by {os.getpid()}")
    return {"value": 1.0}


def _stages() -> list[Stage]:
    return [Stage(name="build", needs=(), section=lambda c: {"x": 1}, version=1, run=_slow_stage, uses_ray=False)]


def _invocation(raw: dict, log: str) -> None:
    """One `run`: plan and execute the workflow, echoing into `log` (a process entry point)."""
    cfg = parse_config(raw)
    stages = _stages()

    def echo(line: str) -> None:
        with open(log, "a") as f:
            f.write(line + "\n")

    execute(cfg, plan(cfg, ArtifactStore(cfg.store.root), stages), stages, echo=echo)


def _start(raw: dict, log: Path) -> multiprocessing.Process:
    proc = multiprocessing.get_context("spawn").Process(target=_invocation, args=(raw, str(log)))
    proc.start()
    return proc


def _raw(tmp_path: Path) -> dict:
    raw = tiny_raw(tmp_path, tmp_path / "store")  # data.inputs[0] is the folder the stage is controlled through
    raw["tracking"] = {"enabled": False}
    return raw


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _one_building_one_waiting(tmp_path: Path):
    """Two runs of one config: the first holds the stage (paused in it), the second waits for it."""
    raw = _raw(tmp_path)
    first = _start(raw, tmp_path / "first.log")
    _wait_for(lambda: (tmp_path / f"started-{first.pid}").exists(), "the first run to start building")
    second = _start(raw, tmp_path / "second.log")
    _wait_for(lambda: "waiting for another run" in _text(tmp_path / "second.log"), "the second run to wait")
    return raw, first, second


def test_a_second_run_waits_for_the_first_then_takes_the_stage_as_cached(tmp_path):
    raw, first, second = _one_building_one_waiting(tmp_path)
    (tmp_path / "release").touch()
    first.join(120)
    second.join(120)

    assert first.exitcode == 0 and second.exitcode == 0
    assert _text(tmp_path / "calls").split() == [str(first.pid)]  # built once
    waited = _text(tmp_path / "second.log")
    assert f"[build] waiting for another run that is building it (pid {first.pid} on {socket.gethostname()}, since " in waited
    assert "[build] committed by another run meanwhile: using it" in waited and "[build] cached" in waited
    assert "[build] committed in" in _text(tmp_path / "first.log") and "committed in" not in waited
    cfg = parse_config(raw)
    fp = plan(cfg, ArtifactStore(cfg.store.root), _stages())[0].fingerprint
    store = ArtifactStore(cfg.store.root)
    assert store.manifest("build", fp)["files"] == [{"path": "out.txt", "size": len(f"built by {first.pid}")}]
    assert (store.local_dir("build", fp) / "out.txt").read_text() == f"built by {first.pid}"


def test_a_holder_killed_mid_stage_releases_the_lock_and_the_waiter_builds_the_stage_cleanly(tmp_path):
    raw, first, second = _one_building_one_waiting(tmp_path)
    os.kill(first.pid, signal.SIGKILL)  # the holder dies with its partial folder; the kernel drops its flock
    first.join(60)
    _wait_for(lambda: (tmp_path / f"started-{second.pid}").exists(), "the second run to take over")
    (tmp_path / "release").touch()
    second.join(120)

    assert first.exitcode == -signal.SIGKILL and second.exitcode == 0
    assert _text(tmp_path / "calls").split() == [str(first.pid), str(second.pid)]
    cfg = parse_config(raw)
    store = ArtifactStore(cfg.store.root)
    fp = plan(cfg, store, _stages())[0].fingerprint
    folder = store.local_dir("build", fp)
    assert sorted(p.name for p in folder.iterdir()) == [MARKER, "out.txt"]  # the dead run's partial file is gone
    assert (folder / "out.txt").read_text() == f"built by {second.pid}"


# --- two real `llmpipe run` processes on one Ray cluster -------------------------------------------------

@pytest.mark.slow
def test_two_cli_runs_of_one_config_build_the_tokenizer_once(ray_local, corpus_dir, tmp_path):
    raw = tiny_raw(corpus_dir, tmp_path / "store")
    raw["tracking"] = {"enabled": False}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,  # both join the test's cluster
           "LLMPIPE_FAULTS": "stage:tokenizer:pause", "LLMPIPE_FAULTS_DIR": str(tmp_path)}  # the first holds the stage

    def start(name: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(cfg), "--only", "tokenizer"], cwd=REPO, env=env,
                                stdout=open(tmp_path / f"{name}.out", "w"), stderr=subprocess.STDOUT)

    first = start("first")
    _wait_for(lambda: (tmp_path / "llmpipe-fault-stage-tokenizer").exists(), "the first run to hold the stage")
    second = start("second")
    _wait_for(lambda: "waiting for another run" in _text(tmp_path / "second.out"), "the second run to wait")
    (tmp_path / "llmpipe-release-stage-tokenizer").touch()
    assert first.wait(300) == 0 and second.wait(300) == 0

    one, two = _text(tmp_path / "first.out"), _text(tmp_path / "second.out")
    assert "[tokenizer] running" in one and "[tokenizer] committed in" in one
    assert f"(pid {first.pid} on {socket.gethostname()}, since " in two
    assert "[tokenizer] committed by another run meanwhile: using it" in two and "[tokenizer] running" not in two
    c = parse_config(raw)
    store = ArtifactStore(c.store.root)
    (item,) = [it for it in plan(c, store, STAGES) if it.stage.name == "tokenizer"]
    assert item.state == "cached"
    manifest = store.manifest("tokenizer", item.fingerprint)
    folder = store.local_dir("tokenizer", item.fingerprint)
    assert [f["path"] for f in manifest["files"]] == ["tokenizer.json"]
    assert sorted(p.name for p in folder.iterdir()) == [MARKER, "tokenizer.json"]  # intact, nothing else
    assert load_tokenizer(folder).get_vocab_size() == manifest["metrics"]["vocab_size"]


# --- a reader of a committed stage and a forced rebuild of it -------------------------------------------

def _reader(ref: dict, control: str) -> None:
    """Open the prepared data as a training worker does (`StageRef.local()`), then, each time the test asks
    (`read-N`), read every file the committed manifest lists and record their digests (or the error)."""
    control_dir = Path(control)
    folder = StageRef(**ref).local()
    listed = [f["path"] for f in json.loads((folder / MARKER).read_text())["files"]]
    n = 0
    while not (control_dir / "stop").exists():
        if (control_dir / f"read-{n}").exists():
            try:
                result = {"folder": str(folder), "digest": {p: hashlib.sha256((folder / p).read_bytes()).hexdigest()
                                                            for p in listed}}
            except OSError as e:
                result = {"folder": str(folder), "error": f"{type(e).__name__}: {e}"}
            (control_dir / f"result-{n}.json").write_text(json.dumps(result))
            n += 1
        time.sleep(0.02)


def _read(control: Path, n: int) -> dict:
    (control / f"read-{n}").touch()
    _wait_for(lambda: (control / f"result-{n}.json").exists(), f"the reader's read {n}")
    return json.loads((control / f"result-{n}.json").read_text())


@pytest.mark.slow
def test_a_reader_of_a_committed_stage_keeps_its_files_while_a_forced_rebuild_commits_it(prepared_store, ray_local,
                                                                                        corpus_dir, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(prepared_store, root, symlinks=True)
    raw = tiny_raw(corpus_dir, root)
    raw["tracking"] = {"enabled": False}
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    cfg = parse_config(raw)
    store = ArtifactStore(cfg.store.root)
    (item,) = [it for it in plan(cfg, store, STAGES) if it.stage.name == "prepare"]
    assert item.state == "cached"
    old = store.manifest("prepare", item.fingerprint)

    control = tmp_path / "control"
    control.mkdir()
    reader = multiprocessing.get_context("spawn").Process(
        target=_reader, args=({"root": store.location, "stage": "prepare", "fingerprint": item.fingerprint}, str(control)))
    reader.start()
    rebuild: subprocess.Popen | None = None
    try:
        before = _read(control, 0)
        assert "error" not in before and before["digest"]
        env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
               "LLMPIPE_FAULTS": "stage:prepare:pause", "LLMPIPE_FAULTS_DIR": str(tmp_path)}
        with open(tmp_path / "rebuild.out", "w") as out:  # the child keeps its own copy of the descriptor
            rebuild = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(cfg_path), "--only", "prepare"],
                                       cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        _wait_for(lambda: (tmp_path / "llmpipe-fault-stage-prepare").exists(), "the rebuild to start building prepare")
        assert _read(control, 1) == before  # mid-rebuild: every file the reader opened is still there, unchanged
        (tmp_path / "llmpipe-release-stage-prepare").touch()
        assert rebuild.wait(300) == 0, _text(tmp_path / "rebuild.out")
        assert "[prepare] committed in" in _text(tmp_path / "rebuild.out")
        new = store.manifest("prepare", item.fingerprint)
        assert new["committed_at"] > old["committed_at"]  # the rebuild committed
        assert _read(control, 2) == before  # after the commit the reader still reads what it opened
        assert store.collect("prepare", item.fingerprint) == []  # held by the reader: never removed
    finally:
        (control / "stop").touch()
        (tmp_path / "llmpipe-release-stage-prepare").touch()
        reader.join(60)
        if rebuild is not None and rebuild.poll() is None:  # a failed assertion: never leave the rebuild behind
            rebuild.kill()
            rebuild.wait(60)
    assert reader.exitcode == 0
    assert store.collect("prepare", item.fingerprint) == [before["folder"]]  # its last reader gone: removed
    assert not Path(before["folder"]).exists() and store.manifest("prepare", item.fingerprint) == new


# --- the experiment's pointer file, updated by concurrent runs ------------------------------------------

def _remember_many(root: str, prefix: str, n: int, control: str) -> None:
    store = ArtifactStore(root)
    (Path(control) / f"ready-{prefix}").touch()
    _wait_for(lambda: (Path(control) / "go").exists(), "the start signal")
    for i in range(n):
        run_pointer.remember(store, "exp", f"{prefix}{i}", f"{i:064x}")


def test_concurrent_updates_of_the_run_pointer_for_different_stages_all_survive(tmp_path):
    root, n = str(tmp_path / "store"), 300
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_remember_many, args=(root, prefix, n, str(tmp_path))) for prefix in ("a", "b")]
    for p in procs:
        p.start()
    _wait_for(lambda: (tmp_path / "ready-a").exists() and (tmp_path / "ready-b").exists(), "both writers to be ready")
    (tmp_path / "go").touch()  # both start at once
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert run_pointer.last_fingerprints(ArtifactStore(root), "exp") == {f"{prefix}{i}": f"{i:064x}" for prefix in "ab" for i in range(n)}
