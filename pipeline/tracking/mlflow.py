"""The runs of an invocation in MLflow: a parent run, a child run per stage, step metrics from rank 0.

A pipeline invocation is a parent run; each stage is a child run (tag
`mlflow.parentRunId`) carrying the stage's flattened config as params, its
fingerprint, the git commit and its metrics. A cached stage still gets a child
run, tagged `cache: hit` with the id of the run that produced it, so the
lineage of every invocation is complete in the UI.

Everything goes through `MlflowClient` with explicit run ids (no global "active
run"), so the same ids can be handed to Ray tasks and training workers, which
log step metrics with `StepLogger`. `NullTracker` / `NullStepLogger` have the
same methods and do nothing: callers never branch on "is tracking enabled" or
"am I rank 0". Every call goes through the outbox (`pipeline.tracking.outbox`),
so an outage of the tracking server never stops a run.

A run that cannot be created during an outage is not given up: `start_parent`
and `start_child` return a run *handle*, the MLflow run id when the run exists,
else a placeholder `pending-<key>` whose creation is queued like any other call,
with everything logged to it behind. On replay the run is created (with its
parent's real id) and the handle mapped to it; `mlflow_id(handle)` gives the id
(the stage manifest records it, None for a run that does not exist yet). Each run
carries a `llmpipe.run_key` tag, so a creation whose answer was lost (the server
made the run, then the connection dropped) is found again instead of duplicated.
Ray workers log into a run by id, so only an existing run can be handed to them
(`worker_run_id`); a pending one is reported as missing what its workers log.

An unusable tracking URI at start is a `TrackingError` raised by `Tracker(...)`
before any work, naming the URI and the ways out.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from pipeline.errors import TrackingError
from pipeline.tracking.outbox import PENDING, Call, Outbox, fail_fast_http, short_cause
from pipeline.tracking.redact import redact
from tokenization.masking import MASK

_MAX_PARAM_LEN = 6000
_KIND_TAG = "mlflow.experimentKind"
_RUN_KEY_TAG = "llmpipe.run_key"
_PARAMS_PER_CALL = 100  # MLflow's log_batch limit


def git_commit(cwd: str | Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _param_value(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s if len(s) <= _MAX_PARAM_LEN else s[: _MAX_PARAM_LEN - 3] + "..."


def _source_type(source: str) -> str:
    """MLflow's name for where a dataset lives: `local` for a path, else the URI's scheme (s3, gs, ...)."""
    return source.split("://", 1)[0] if "://" in source else "local"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else MLflow's local default."""
    import mlflow

    return mlflow.get_tracking_uri()


# --- the driver's runs -----------------------------------------------------------

class Tracker(Outbox):
    """Parent and child runs of one invocation, through an explicit MlflowClient; outage-proof (see the module)."""

    def __init__(self, experiment: str, tracking_uri: str | None = None, *, max_pending_points: int = 100_000,
                 max_pending_calls: int = 10_000):
        import mlflow
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        fail_fast_http()
        uri = tracking_uri or mlflow.get_tracking_uri()
        super().__init__(uri, max_pending_points=max_pending_points, max_pending_calls=max_pending_calls)
        self.tracking_uri = uri
        self.client = MlflowClient(uri)
        self.parent_id: str | None = None
        try:
            exp = self.client.get_experiment_by_name(experiment)
            self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
            if exp is None or _KIND_TAG not in exp.tags:
                # MLflow 3's UI opens untagged experiments in its GenAI view; this is model training.
                self.client.set_experiment_tag(self.experiment_id, _KIND_TAG, "custom_model_development")
        except (MlflowException, OSError) as e:
            raise TrackingError(
                f"MLflow tracking URI {uri} cannot be used ({short_cause(e)}): start the tracking server, set "
                "MLFLOW_TRACKING_URI to one that runs, or set tracking.enabled: false in the config") from None

    def start_parent(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        self.parent_id = self._start_run("parent", run_name, params, tags, parent=None)
        return self.parent_id

    def start_child(self, stage: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        return self._start_run(stage, stage, params, {**tags, "stage": stage}, parent=self.parent_id)

    def _start_run(self, what: str, run_name: str, params: dict[str, Any], tags: dict[str, Any],
                   parent: str | None) -> str:
        key = uuid.uuid4().hex
        handle = PENDING + key
        self._names[handle] = what
        call = Call(handle, "run")
        call.send = lambda _: self._create(call, key, run_name, tags, parent)
        self._submit(call)
        if handle in self._ids:  # created at once: the handle is the MLflow id, as callers expect
            handle = self._ids[handle]
            self._names[handle] = what
        self.log_params(handle, params)
        return handle

    def _create(self, call: Call, key: str, run_name: str, tags: dict[str, Any], parent: str | None) -> None:
        if call.attempts > 1:  # an earlier attempt may have reached the server: find that run, do not make another
            found = self.client.search_runs([self.experiment_id], filter_string=f"tags.{_RUN_KEY_TAG} = '{key}'",
                                            max_results=1)
            if found:
                self._ids[call.run] = found[0].info.run_id
                return
        tags = {k: str(redact(k, v)) for k, v in tags.items()} | {_RUN_KEY_TAG: key}
        parent_id = self._run_id(parent) if parent else None
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        self._ids[call.run] = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(redact(k, v))) for k, v in sorted(params.items())]

        def send(rid: str) -> None:
            for i in range(0, len(items), _PARAMS_PER_CALL):
                self.client.log_batch(rid, params=items[i : i + _PARAMS_PER_CALL])

        if items:
            self._submit(Call(run_id, "params", len(items), send))

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)  # taken now, so replayed points keep the time they were measured
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if v is not None]
        if items:
            self._submit(Call(run_id, "metrics", len(items), metrics=items))

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(redact(k, v))) for k, v in tags.items()]

        def send(rid: str) -> None:
            for i in range(0, len(items), _PARAMS_PER_CALL):
                self.client.log_batch(rid, tags=items[i : i + _PARAMS_PER_CALL])

        if items:
            self._submit(Call(run_id, "tags", len(items), send))

    def log_inputs(self, run_id: str, datasets: list[dict[str, Any]]) -> None:
        """Dataset inputs of a run, shown in the UI's Datasets column: each a dict of name, digest, source (a folder
        or URI), profile (numbers) and context ("training", "evaluation", ...)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        items = [DatasetInput(Dataset(d["name"], d["digest"], _source_type(d["source"]),
                                      json.dumps({"uri": redact("source", d["source"])}), profile=json.dumps(d["profile"])),
                              tags=[InputTag("mlflow.data.context", d["context"])]) for d in datasets]
        if items:
            self._submit(Call(run_id, "inputs", len(items), send=lambda rid: self.client.log_inputs(rid, datasets=items)))

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self._submit(Call(run_id, "artifact", send=lambda rid: self.client.log_artifact(rid, str(path), artifact_path)))

    def log_table(self, run_id: str, rows: list[dict[str, Any]], artifact_file: str) -> None:
        columns = {k: [r[k] for r in rows] for k in rows[0]} if rows else {}
        self._submit(Call(run_id, "artifact", send=lambda rid: self.client.log_table(rid, columns, artifact_file)))

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._submit(Call(run_id, "artifact", send=lambda rid: self.client.log_text(rid, text, artifact_file)))

    def log_model(self, run_id: str, model_dir: str | Path, *, eos_token: str, registered_name: str | None = None,
                  index_dir: str | Path | None = None, retrieve: int | None = None, mask_token: str = MASK) -> None:
        """Log a train folder as a servable pyfunc model (`pipeline.tracking.models`), with an index folder one that
        retrieves, and tag its URI as `model_uri`. An encoder's model fills `mask_token`s."""
        def send(rid: str) -> None:
            from pipeline.tracking.models import log_generation_model

            uri = log_generation_model(self.tracking_uri, rid, Path(model_dir), eos_token=eos_token,
                                       registered_name=registered_name, retrieve=retrieve, mask_token=mask_token,
                                       index_dir=Path(index_dir) if index_dir is not None else None)
            self.client.set_tag(rid, "model_uri", uri)

        self._submit(Call(run_id, "model", send=send))

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        """End a run; ending the parent run ends the invocation: replay what is queued and report the rest."""
        self._submit(Call(run_id, "end", send=lambda rid: self.client.set_terminated(rid, status=status)))
        if run_id and run_id == self.parent_id:
            self.close()

    def mlflow_id(self, run_id: str) -> str | None:
        """The MLflow run id behind a handle; None while its creation is still queued."""
        self._pump()
        return self._run_id(run_id)

    def worker_run_id(self, run_id: str) -> str | None:
        """The id Ray workers may log into directly; for a run that does not exist yet, None (they log nothing
        into it, and the final report says so)."""
        rid = self.mlflow_id(run_id)
        if rid is None and run_id:
            self._lose(Call(run_id, "workers"))
        return rid


class NullTracker:
    """Tracking disabled: the same methods, doing nothing."""

    tracking_uri = None
    parent_id = None
    report = None

    def start_parent(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        return ""

    def start_child(self, stage: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        return ""

    def log_params(self, run_id: str, params: dict[str, Any]) -> None: ...
    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None: ...
    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None: ...
    def log_inputs(self, run_id: str, datasets: list[dict[str, Any]]) -> None: ...
    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_table(self, run_id: str, rows: list[dict[str, Any]], artifact_file: str) -> None: ...
    def log_text(self, run_id: str, text: str, artifact_file: str) -> None: ...
    def log_model(self, run_id: str, model_dir: str | Path, *, eos_token: str, registered_name: str | None = None,
                  index_dir: str | Path | None = None, retrieve: int | None = None, mask_token: str = MASK) -> None: ...
    def end(self, run_id: str, status: str = "FINISHED") -> None: ...
    def close(self) -> str | None: ...

    def mlflow_id(self, run_id: str) -> str | None:
        return None

    def worker_run_id(self, run_id: str) -> str | None:
        return None


# --- a training worker's step metrics --------------------------------------------

class StepLogger(Outbox):
    """Step metrics from a worker (rank 0) into an existing run. Never stops training: during an outage the
    points are queued (bounded) and replayed; `close()` at the end of training sends or reports them. With
    `system_metrics`, the node's CPU, memory and GPU use go into the same run (`pipeline.tracking.system`)."""

    def __init__(self, tracking_uri: str, run_id: str, *, max_pending_points: int = 100_000,
                 system_metrics: bool = False):
        from mlflow.tracking import MlflowClient

        fail_fast_http()
        super().__init__(tracking_uri, max_pending_points=max_pending_points, max_pending_calls=0)
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self._system = None
        if system_metrics:
            from pipeline.tracking.system import SystemMetrics

            self._system = SystemMetrics(tracking_uri, run_id)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        self._submit(Call(self.run_id, "metrics", len(items), metrics=items))

    def close(self) -> str | None:
        if self._system is not None:  # its own report line, if it lost anything
            self._system.close()
            self._system = None
        return super().close()


class NullStepLogger:
    report = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def close(self) -> str | None: ...


def step_logger(tracking_uri: str | None, run_id: str | None, rank: int) -> StepLogger | NullStepLogger:
    if rank != 0 or not tracking_uri or not run_id:
        return NullStepLogger()
    return StepLogger(tracking_uri, run_id, system_metrics=True)  # rank 0's node: where training runs
