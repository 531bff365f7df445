"""MLflow as its users look at it: `llmpipe ui` (a UI on 127.0.0.1 and the address of the newest run's runs view)
and the system metrics of the train run (no Ray: a temp SQLite store)."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.tracking.mlflow import Tracker
from tests.servers import free_port


def _lines_until(proc: subprocess.Popen, needle: str, timeout_s: float) -> list[str]:
    """The process's output lines up to the one holding `needle` (bounded: fails after `timeout_s`)."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            seen.append(lines.get(timeout=1).rstrip("\n"))
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        if needle in seen[-1]:
            return seen
    raise AssertionError(f"no {needle!r} within {timeout_s}s; output so far:\n" + "\n".join(seen))


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_ui_serves_the_store_on_loopback_and_prints_the_runs_view_of_the_newest_run(tmp_path):
    import psutil

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker("tiny", uri)
    for name in ("tiny: tokenizer, prepare", "tiny: train"):  # the second is the newest
        parent = tracker.start_parent(name, {}, {"llmpipe.config": "tiny"})
        tracker.start_child("train", {}, {"llmpipe.config": "tiny"})
        tracker.end(parent)
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "ui", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        out = "\n".join(_lines_until(proc, "newest run", timeout_s=240))
        base = f"http://127.0.0.1:{port}"
        assert f"runs: {base}/#/experiments/{tracker.experiment_id}/runs?workflowType=machine_learning" in out
        assert (f"newest run 'tiny: train': {base}/#/experiments/{tracker.experiment_id}/runs/{parent}"
                "?workflowType=machine_learning") in out
        with urllib.request.urlopen(f"{base}/", timeout=30) as r:
            assert r.status == 200 and b"<html" in r.read(2000).lower()
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/runs/get?run_id={parent}", timeout=30) as r:
            assert b"tiny: train" in r.read()
        listening = [c.laddr.ip for c in psutil.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        assert listening and set(listening) == {"127.0.0.1"}
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C stops the server with the command
        proc.wait(timeout=60)
    assert not _listening(port)


def test_system_metrics_are_sampled_into_the_run_until_closed(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.system import SystemMetrics

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker("tiny", uri)
    run = tracker.start_parent("tiny: train", {}, {})
    system = SystemMetrics(uri, run, interval_s=0.5)
    time.sleep(2)
    assert system.close() is None  # nothing lost
    history = MlflowClient(uri).get_metric_history(run, "system/cpu_utilization_percentage")
    assert len(history) >= 2 and [m.step for m in history] == sorted(m.step for m in history)
    assert MlflowClient(uri).get_run(run).data.metrics["system/system_memory_usage_megabytes"] > 0
