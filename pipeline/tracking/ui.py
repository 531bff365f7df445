"""`llmpipe ui`: the MLflow UI of the tracking store, on 127.0.0.1, and the address of the newest run.

A local store (SQLite, a folder) is served by an `mlflow server` started here, bound to 127.0.0.1, until Ctrl-C;
a tracking server is its own UI. The addresses printed open the experiment's runs table in MLflow's model
training view (`#/experiments/<id>/runs?workflowType=machine_learning`, the parent runs with their stage runs
folded under them) and the newest parent run's page: MLflow 3.17 opens a bare `#/experiments/<id>` on its GenAI
overview, whatever the experiment's `mlflow.experimentKind` tag says.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from pipeline.errors import TrackingError

RUNS_VIEW = "#/experiments/{experiment}/runs?workflowType=machine_learning"
RUN_VIEW = "#/experiments/{experiment}/runs/{run}?workflowType=machine_learning"


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def latest_parent(uri: str, experiment: str | None = None) -> Any | None:
    """The newest parent run of an `llmpipe run` (in `experiment`, else in any experiment), or None."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise TrackingError(f"ui: no experiment {experiment!r} in {uri}")
        ids = [exp.experiment_id]
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    if not ids:
        return None
    runs = client.search_runs(ids, filter_string="tags.`llmpipe.config` != ''", order_by=["attributes.start_time DESC"],
                              max_results=200)
    return next((r for r in runs if "mlflow.parentRunId" not in r.data.tags), None)


def addresses(base: str, run: Any | None) -> list[str]:
    """Lines naming the runs table of the run's experiment and the run's own page."""
    if run is None:
        return [f"no llmpipe run in this store yet: {base}"]
    exp, rid = run.info.experiment_id, run.info.run_id
    return [f"runs: {base}/{RUNS_VIEW.format(experiment=exp)}",
            f"newest run {run.info.run_name!r}: {base}/{RUN_VIEW.format(experiment=exp, run=rid)}"]


class UiServer:
    """`mlflow server` for a local store on 127.0.0.1:<port>, its output in a log file; stopped by `stop()`."""

    def __init__(self, uri: str, port: int):
        self.uri, self.port = uri, port
        self.base = f"http://127.0.0.1:{port}"
        self.log = Path(tempfile.gettempdir()) / f"llmpipe-ui-{port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0) -> UiServer:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", self.port)) == 0:
                raise TrackingError(f"ui: port {self.port} on 127.0.0.1 is taken; give another with --port")
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.uri, "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]
        # MLflow's job runner (eight more processes, for GenAI judges and the like) serves nothing of a training run
        env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
        with open(self.log, "ab") as log:  # its own session: a Ctrl-C here stops it through stop(), in order
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TrackingError(f"ui: mlflow server exited with code {self.proc.returncode}; its log: {self.log}")
            try:
                with urllib.request.urlopen(f"{self.base}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise TrackingError(f"ui: mlflow server did not answer on {self.base} within {timeout_s:.0f}s; its log: {self.log}")

    def wait(self) -> None:
        """Until the server ends or Ctrl-C (or SIGTERM) stops this process, then stop the server."""
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            self.proc.wait()
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.stop()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its uvicorn worker
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
