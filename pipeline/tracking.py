"""The one module that talks to MLflow.

A pipeline invocation is a parent run; each stage is a child run (tag
`mlflow.parentRunId`) carrying the stage's flattened config as params, its
fingerprint, the git commit and its metrics. A cached stage still gets a child
run, tagged `cache: hit` with the id of the run that produced it, so the
lineage of every invocation is complete in the UI.

Everything goes through `MlflowClient` with explicit run ids (no global "active
run"), so the same ids can be handed to Ray tasks and training workers, which
log step metrics with `StepLogger`. `NullTracker` / `NullStepLogger` have the
same methods and do nothing: callers never branch on "is tracking enabled" or
"am I rank 0".
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_MAX_PARAM_LEN = 6000
_KIND_TAG = "mlflow.experimentKind"
_BATCH = 100


def git_commit(cwd: str | Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _param_value(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s if len(s) <= _MAX_PARAM_LEN else s[: _MAX_PARAM_LEN - 3] + "..."


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else MLflow's local default."""
    import mlflow

    return mlflow.get_tracking_uri()


class Tracker:
    """Parent and child runs of one invocation, through an explicit MlflowClient."""

    def __init__(self, experiment: str, tracking_uri: str | None = None):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri or mlflow.get_tracking_uri()
        self.client = MlflowClient(self.tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        if exp is None or _KIND_TAG not in exp.tags:
            # MLflow 3's UI opens untagged experiments in its GenAI view; this is model training.
            self.client.set_experiment_tag(self.experiment_id, _KIND_TAG, "custom_model_development")
        self.parent_id: str | None = None

    def start_parent(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.parent_id = run.info.run_id
        self.log_params(self.parent_id, params)
        return self.parent_id

    def start_child(self, stage: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        tags = {**tags, "stage": stage}
        if self.parent_id:
            tags["mlflow.parentRunId"] = self.parent_id
        run = self.client.create_run(self.experiment_id, run_name=stage, tags=tags)
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in sorted(params.items())]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(run_id, params=items[i : i + _BATCH])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(run_id, metrics=items[i : i + _BATCH])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, str(v))

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_table(self, run_id: str, rows: list[dict[str, Any]], artifact_file: str) -> None:
        import mlflow

        columns = {k: [r[k] for r in rows] for k in rows[0]} if rows else {}
        mlflow.log_table(data=columns, artifact_file=artifact_file, run_id=run_id)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)



class NullTracker:
    """Tracking disabled: the same methods, doing nothing."""

    tracking_uri = None
    parent_id = None

    def start_parent(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        return ""

    def start_child(self, stage: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        return ""

    def log_params(self, run_id: str, params: dict[str, Any]) -> None: ...
    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None: ...
    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None: ...
    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_table(self, run_id: str, rows: list[dict[str, Any]], artifact_file: str) -> None: ...
    def log_text(self, run_id: str, text: str, artifact_file: str) -> None: ...
    def end(self, run_id: str, status: str = "FINISHED") -> None: ...


class StepLogger:
    """Step metrics from a worker (rank 0) into an existing run. Never kills training:
    a tracking outage is logged as a warning and the step is dropped."""

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        try:
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])
        except Exception as e:  # noqa: BLE001 - any tracking failure must not stop training
            log.warning("MLflow logging failed at step %d: %s", step, e)


class NullStepLogger:
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


def step_logger(tracking_uri: str | None, run_id: str | None, rank: int) -> StepLogger | NullStepLogger:
    if rank != 0 or not tracking_uri or not run_id:
        return NullStepLogger()
    return StepLogger(tracking_uri, run_id)
