"""The driver SIGKILLed in the middle of `prepare`, of `train` and of `evaluate`, and Ctrl-C in `train`, then run again.

Each invocation is a real `python -m pipeline run` process that starts its own local Ray; the
kill takes the driver and then every process it started (found by an environment tag they all
inherit), as a lost machine would. After each kill the store must hold no half-written stage that a later run could take
for complete; each rerun must reuse what was committed, training must resume from its last
checkpoint, and the final result must equal an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_raw

pytestmark = pytest.mark.slow

TRAIN = {"steps": 12, "checkpoint_every": 3, "log_every": 3, "log_model": False}


def _config(tmp: Path, corpus: Path, name: str) -> Path:
    raw = tiny_raw(corpus, tmp / f"store-{name}", train=TRAIN, tracking={"enabled": False},  # not about tracking
                   evaluate={"context_multipliers": [1.0]}, decode={"num_samples": 1})
    raw["name"] = name
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _env(tmp: Path, tag: str = "", faults: str = "") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "LLMPIPE_FAULTS")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    env["LLMPIPE_TEST_RUN"] = tag  # inherited by the local Ray it starts: raylet, GCS, every worker
    if faults:
        env.update(LLMPIPE_FAULTS=faults, LLMPIPE_FAULTS_DIR=str(tmp))
    return env


def _processes_of(tag: str) -> list[int]:
    pids = []
    for environ in glob.glob("/proc/[0-9]*/environ"):
        try:
            if f"LLMPIPE_TEST_RUN={tag}".encode() in Path(environ).read_bytes().split(b"\0"):
                pids.append(int(environ.split("/")[2]))
        except OSError:
            pass  # gone, or not ours to read
    return pids


def _kill_run(proc: subprocess.Popen, tag: str) -> None:
    """SIGKILL the driver, then whatever it started that is still alive (Ray's processes live in other
    sessions and would otherwise go on writing checkpoints for a while): the machine is gone."""
    proc.kill()
    proc.wait()
    for _ in range(50):
        pids = _processes_of(tag)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"processes of the killed run survive: {_processes_of(tag)}")


def _run(config: Path, tmp: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "pipeline", "run", str(config)], env=_env(tmp), capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def _run_and_kill(config: Path, tmp: Path, ready, faults: str = "") -> str:
    """Start a run, SIGKILL it and all it started as soon as `ready(output so far)` holds; returns the output."""
    tag = uuid.uuid4().hex
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(config)], env=_env(tmp, tag, faults),
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # a pipe must never fill up
    reader.start()
    deadline = time.time() + 600
    try:
        while time.time() < deadline:
            if ready("".join(lines)):
                _kill_run(proc, tag)
                reader.join(timeout=10)
                return "".join(lines)
            assert proc.poll() is None, "the run ended before the kill point:\n" + "".join(lines)[-3000:]
            time.sleep(0.2)
        raise AssertionError("kill point never reached:\n" + "".join(lines)[-3000:])
    finally:
        if proc.poll() is None:
            _kill_run(proc, tag)


def _run_and_interrupt(config: Path, tmp: Path, ready, faults: str = "") -> str:
    """Start a run and press Ctrl-C (SIGINT to the driver) once `ready(output so far)` holds: the run must stop by
    itself, say it was interrupted and exit 130 (Ray Train's own SIGINT handler exits 0 in the middle of `fit`)."""
    tag = uuid.uuid4().hex
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(config)], env=_env(tmp, tag, faults),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 600
        while not ready("".join(lines)):
            assert proc.poll() is None and time.time() < deadline, "no interrupt point:\n" + "".join(lines)[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, "".join(lines)[-3000:]
        reader.join(timeout=10)
        return "".join(lines)
    finally:
        _kill_run(proc, tag)  # whatever Ray left behind


def _plan(out: str, stage: str) -> str:
    """The plan's line for a stage, e.g. `prepare    missing (incomplete folder: will redo) -> run`."""
    (line,) = [ln.strip() for ln in out.splitlines() if ln.startswith(f"  {stage} ")]
    return line


def _committed(store: Path) -> set[str]:
    return {Path(p).parts[-3] for p in glob.glob(f"{store}/*/*/_COMPLETE.json")}


def _result(store: Path) -> dict:
    (ev,) = glob.glob(f"{store}/evaluate/*/_COMPLETE.json")
    (model,) = glob.glob(f"{store}/train/*/model.safetensors")
    (prep,) = glob.glob(f"{store}/prepare/*/_COMPLETE.json")
    shards = {sh["train"]["file"]: sh["train"]["sha256"] for sh in
              json.loads(Path(prep).with_name("shards.json").read_text())["shards"]}
    return {"metrics": json.loads(Path(ev).read_text())["metrics"], "shards": shards,
            "model": hashlib.sha256(Path(model).read_bytes()).hexdigest()}


def test_a_driver_killed_in_prepare_train_and_evaluate_resumes_to_the_uninterrupted_result(corpus_dir, tmp_path):
    reference = _config(tmp_path, corpus_dir, "reference")
    _run(reference, tmp_path)
    expected = _result(tmp_path / "store-reference")

    config = _config(tmp_path, corpus_dir, "killed")
    store = tmp_path / "store-killed"

    _run_and_kill(config, tmp_path, lambda out: "[prepare] running" in out)
    assert _committed(store) == {"tokenizer"}  # prepare's partial shards are not a commit

    def mid_training(out: str) -> bool:  # training holds after its step-6 checkpoint (a `pause` fault), then dies
        return len(glob.glob(f"{store}/train/*/ray_train/step_00000006/_CHECKPOINT.rank*.json")) == 2  # both ranks

    out = _run_and_kill(config, tmp_path, mid_training, faults="train.step:6:pause")
    assert not glob.glob(f"{store}/train/*/_COMPLETE.json")
    assert _plan(out, "tokenizer").startswith("tokenizer  cached")
    assert "incomplete folder: will redo" in _plan(out, "prepare")
    assert _committed(store) == {"tokenizer", "prepare"}

    def resumed_and_paused(out: str) -> bool:  # resumed from step 6, then holding after its step-9 checkpoint
        return "resumed from" in out and len(glob.glob(f"{store}/train/*/ray_train/step_00000009/_CHECKPOINT.rank*.json")) == 2

    out = _run_and_interrupt(config, tmp_path, resumed_and_paused, faults="train.step:9:pause")
    assert "[train] interrupted after" in out and out.rstrip().endswith("llmpipe: interrupted"), out[-3000:]
    assert not glob.glob(f"{store}/train/*/_COMPLETE.json")
    checkpoints = {int(Path(p).parent.name.removeprefix("step_"))
                   for p in glob.glob(f"{store}/train/*/ray_train/step_*/_CHECKPOINT.rank1.json")}
    assert 9 in checkpoints

    out = _run_and_kill(config, tmp_path, lambda out: "[evaluate] running" in out)
    assert "incomplete folder: will resume" in _plan(out, "train")
    resumed = re.search(r"resumed from \S+ at step (\d+)", out)
    assert resumed and int(resumed.group(1)) in checkpoints, out[-3000:]  # not from step 0
    assert _committed(store) == {"tokenizer", "prepare", "train"}

    out = _run(config, tmp_path)
    assert _plan(out, "train").startswith("train      cached")
    assert "incomplete folder: will redo" in _plan(out, "evaluate")
    assert _committed(store) == {"tokenizer", "prepare", "train", "evaluate", "decode"}
    assert _result(store) == expected  # same shards, same weights, same metrics as never having been killed
