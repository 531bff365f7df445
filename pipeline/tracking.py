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
"am I rank 0". Params and tags whose key names a secret (a word token, secret,
password, credential or api_key anywhere in the dotted key, but not a vocabulary
token such as `tokenizer.eos_token`) are logged as `***`, and so is the password
of a URL such as `s3://key:secret@bucket`.

An outage of the tracking server never stops a run. Every call becomes an entry
of an in-memory outbox, sent at once while MLflow answers. When it does not
(connection refused, a timeout, a 5xx or 429) the entry stays queued, in order,
later calls queue behind it, and the outbox is retried on a later call once a
back-off has passed (5 s, doubling to 60 s, so an unreachable host costs training
one timeout per back-off, not one per step) and always at the end: when the
parent run ends (`Tracker`) or training ends (`StepLogger.close`). Whatever is
still unsent then, and whatever MLflow refused (a 4xx: replaying it would fail
again), is reported in one warning line that names each run and what it lacks.
The outbox is bounded (`max_pending_points` metric points, `max_pending_calls`
other calls); past that new entries are dropped and counted in that line. Unless
they are set, MLFLOW_HTTP_REQUEST_MAX_RETRIES=0 and MLFLOW_HTTP_REQUEST_TIMEOUT=10
make a failed call fail fast (it is queued and retried anyway): MLflow's own defaults
retry one call for minutes.

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
The outbox lives in memory: a process that dies (a killed driver, a restarted
rank-0 worker) takes its unsent entries with it.

An unusable tracking URI at start is a `TrackingError` raised by `Tracker(...)`
before any work, naming the URI and the ways out.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_MAX_PARAM_LEN = 6000
_KIND_TAG = "mlflow.experimentKind"
_RUN_KEY_TAG = "llmpipe.run_key"
_PARAMS_PER_CALL, _METRICS_PER_CALL = 100, 1000  # MLflow's log_batch limits
_PENDING = "pending-"
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_BACKOFF_S, _MAX_BACKOFF_S = 5.0, 60.0
REDACTED = "***"


class TrackingError(ValueError):
    """The MLflow tracking URI cannot be used at start (names the URI and what to do)."""


def git_commit(cwd: str | Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# --- secrets -------------------------------------------------------------------

_SECRET_WORDS = {"secret", "secrets", "password", "passwd", "passphrase", "credential", "credentials", "apikey"}
_VOCABULARY_TOKENS = {"eos", "bos", "pad", "unk", "sep", "cls", "mask", "special"}  # `eos_token` is a word, not a key
_URL_PASSWORD = re.compile(r"(://[^/@:\s]*:)[^/@\s]+@")


def is_secret_key(key: str) -> bool:
    """True when a part of the dotted `key` names a secret: the word token (`hf_token`, `authToken`, `token`),
    secret, password, credential or api_key, in any case or separator style; `eos_token` and `max_tokens` do not."""
    for part in key.split("."):
        words = re.findall(r"[a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", part).lower())
        if any(w in _SECRET_WORDS for w in words) or "api_key" in "_".join(words) or "private_key" in "_".join(words):
            return True
        if any(w == "token" and (i == 0 or words[i - 1] not in _VOCABULARY_TOKENS) for i, w in enumerate(words)):
            return True
    return False


def redact(key: str, value: Any) -> Any:
    """`value` with secrets replaced by `***`: all of it under a secret key, nested secret keys of a dict
    (a raw DeepSpeed JSON), and the password of a URL."""
    if is_secret_key(key):
        return REDACTED
    if isinstance(value, dict):
        return {k: redact(f"{key}.{k}", v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(key, v) for v in value]
    if isinstance(value, str):
        return _URL_PASSWORD.sub(rf"\1{REDACTED}@", value)
    return value


def _param_value(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s if len(s) <= _MAX_PARAM_LEN else s[: _MAX_PARAM_LEN - 3] + "..."


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else MLflow's local default."""
    import mlflow

    return mlflow.get_tracking_uri()


# --- the outbox ------------------------------------------------------------------

def _fail_fast_http() -> None:
    """A failed call is queued and retried later, so one quick attempt is enough (the user's settings win)."""
    for k, v in _HTTP_DEFAULTS.items():
        os.environ.setdefault(k, v)


def _is_outage(e: Exception) -> bool:
    """True when MLflow could not be reached or failed on its side (retry later); False when it answered
    and refused the call, or a local file is missing (a replay would fail the same way)."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(e, MlflowException):
        status = e.get_http_status_code()
        return status >= 500 or status == 429
    return isinstance(e, (requests.RequestException, ConnectionError, TimeoutError))


def _cause(e: BaseException) -> str:
    """A short one-line reason: the OS error inside MLflow's long message when there is one."""
    text = " ".join(str(e).split())
    m = re.search(r"\[Errno -?\d+\] ([^\"')]+)", text)
    return m.group(1).strip() if m else text[:200]


_WHAT = {"run": "the run itself", "params": "param", "metrics": "metric point", "tags": "tag", "artifact": "artifact",
         "model": "the logged model", "workers": "what its Ray workers log", "end": "its end status"}


def _what(kind: str, n: int, steps: set[int] | None) -> str:
    """How the report names `n` lost items of one kind: `12 metric points (steps 1-6)`, `its end status`."""
    word = _WHAT[kind]
    if word.startswith(("the ", "what ", "its ")):
        return word
    span = f" (steps {min(steps)}-{max(steps)})" if kind == "metrics" and steps and max(steps) > 0 else ""
    return f"{n} {word}{'' if n == 1 else 's'}{span}"  # step 0 is a stage's summary metrics, not a curve


@dataclass
class _Call:
    """One queued MLflow call into a run (by handle); `count` items (metric points, params, tags) for the report."""

    run: str
    kind: str  # a key of _WHAT
    count: int = 1
    send: Callable[[str], None] | None = None  # the call, given the run's MLflow id (metrics are sent as data)
    metrics: list[Any] = field(default_factory=list)
    attempts: int = 0


class _Outbox:
    """Sends calls in order while MLflow answers; queues them during an outage; counts what is lost."""

    client: Any

    def __init__(self, uri: str, *, max_pending_points: int, max_pending_calls: int):
        self.uri = uri
        self.report: str | None = None
        self._queue: deque[_Call] = deque()
        self._max_points, self._max_calls = max_pending_points, max_pending_calls
        self._points, self._others = 0, 0  # queued metric points, queued calls of other kinds
        self._failures, self._retry_at, self._last_error = 0, 0.0, ""
        self._ids: dict[str, str] = {}  # pending handle -> MLflow run id, once created
        self._names: dict[str, str] = {}  # handle -> what the run is (a stage, the parent)
        self._lost: dict[str, dict[str, int]] = {}  # handle -> kind -> items not recorded
        self._lost_steps: dict[str, set[int]] = {}

    def _run_id(self, handle: str) -> str | None:
        return self._ids.get(handle) if handle.startswith(_PENDING) else (handle or None)

    def _submit(self, call: _Call) -> None:
        self._pump()  # what is queued goes first, and sending it may make room
        # Run creations and ends are never dropped: they are few, and without them everything else is lost too.
        if call.kind == "metrics" and self._points + call.count > self._max_points:
            return self._lose(call)
        if call.kind not in ("run", "end", "metrics") and self._others >= self._max_calls:
            return self._lose(call)
        self._count(call, +1)
        self._queue.append(call)
        self._pump()

    def _count(self, call: _Call, sign: int) -> None:
        if call.kind == "metrics":
            self._points += sign * call.count
        else:
            self._others += sign

    def _pump(self, *, force: bool = False) -> None:
        from mlflow.exceptions import MlflowException

        if not self._queue or (not force and time.monotonic() < self._retry_at):
            return
        while self._queue:
            batch = self._next_batch()
            run_id = self._run_id(batch[0].run)
            try:
                if run_id is None and batch[0].kind != "run":
                    self._lose_all(batch)  # its creation was refused: nothing can go into it
                else:
                    for c in batch:
                        c.attempts += 1
                    self._send(batch, run_id)
            except (MlflowException, OSError) as e:
                if _is_outage(e):
                    return self._down(e)
                self._last_error = _cause(e)
                log.warning("MLflow at %s refused %s for %s: %s", self.uri, batch[0].kind, self._label(batch[0].run),
                            self._last_error)
                self._lose_all(batch)
            for c in batch:
                self._count(self._queue.popleft(), -1)
        if self._failures:
            log.warning("MLflow at %s answers again: the queued tracking calls were sent", self.uri)
            self._failures, self._retry_at = 0, 0.0

    def _next_batch(self) -> list[_Call]:
        """The head of the queue; consecutive metric calls into the same run go together (one log_batch)."""
        first = self._queue[0]
        if first.kind != "metrics":
            return [first]
        batch, n = [], 0
        for c in self._queue:
            if c.kind != "metrics" or c.run != first.run or (batch and n + c.count > _METRICS_PER_CALL):
                break
            batch.append(c)
            n += c.count
        return batch

    def _send(self, calls: list[_Call], run_id: str | None) -> None:
        if calls[0].kind == "metrics":
            items = [m for c in calls for m in c.metrics]
            for i in range(0, len(items), _METRICS_PER_CALL):
                self.client.log_batch(run_id, metrics=items[i : i + _METRICS_PER_CALL])
        else:
            calls[0].send(run_id)

    def _down(self, e: Exception) -> None:
        self._failures += 1
        self._last_error = _cause(e)
        self._retry_at = time.monotonic() + min(_MAX_BACKOFF_S, _BACKOFF_S * 2 ** (self._failures - 1))
        if self._failures == 1:
            log.warning("MLflow at %s is unreachable (%s): tracking calls are queued in memory and retried; the run goes on",
                        self.uri, self._last_error)

    def _lose(self, call: _Call) -> None:
        kinds = self._lost.setdefault(call.run, {})
        kinds[call.kind] = kinds.get(call.kind, 0) + call.count
        if call.metrics:
            self._lost_steps.setdefault(call.run, set()).update(m.step for m in call.metrics)

    def _lose_all(self, calls: list[_Call]) -> None:
        for c in calls:
            self._lose(c)

    def _label(self, handle: str) -> str:
        run_id = self._run_id(handle)
        name = f"{self._names[handle]} run" if handle in self._names else "run"
        return f"{name} {run_id}" if run_id else f"{name} (never created)"

    def _final_report(self) -> str | None:
        """One line naming every run and what it lacks (queued calls still unsent count as lost)."""
        while self._queue:
            self._lose(self._queue.popleft())
        self._points = self._others = 0
        if not self._lost:
            return None
        parts = []
        for handle, kinds in self._lost.items():
            what = [_what(k, kinds[k], self._lost_steps.get(handle)) for k in _WHAT if k in kinds]
            parts.append(f"{self._label(handle)}: {', '.join(what)}")
        self._lost.clear()
        self._lost_steps.clear()
        why = f" (last error: {self._last_error})" if self._last_error else ""
        return f"MLflow at {self.uri} did not record: {'; '.join(parts)}{why}"

    def close(self) -> str | None:
        """Send what is queued (ignoring the back-off), then warn in one line about anything not recorded."""
        self._pump(force=True)
        self.report = self._final_report()
        if self.report:
            log.warning("%s", self.report)
        return self.report


# --- the driver's runs -----------------------------------------------------------

class Tracker(_Outbox):
    """Parent and child runs of one invocation, through an explicit MlflowClient; outage-proof (see the module)."""

    def __init__(self, experiment: str, tracking_uri: str | None = None, *, max_pending_points: int = 100_000,
                 max_pending_calls: int = 10_000):
        import mlflow
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        _fail_fast_http()
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
                f"MLflow tracking URI {uri} cannot be used ({_cause(e)}): start the tracking server, set "
                "MLFLOW_TRACKING_URI to one that runs, or set tracking.enabled: false in the config") from None

    def start_parent(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        self.parent_id = self._start_run("parent", run_name, params, tags, parent=None)
        return self.parent_id

    def start_child(self, stage: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        return self._start_run(stage, stage, params, {**tags, "stage": stage}, parent=self.parent_id)

    def _start_run(self, what: str, run_name: str, params: dict[str, Any], tags: dict[str, Any],
                   parent: str | None) -> str:
        key = uuid.uuid4().hex
        handle = _PENDING + key
        self._names[handle] = what
        call = _Call(handle, "run")
        call.send = lambda _: self._create(call, key, run_name, tags, parent)
        self._submit(call)
        if handle in self._ids:  # created at once: the handle is the MLflow id, as callers expect
            handle = self._ids[handle]
            self._names[handle] = what
        self.log_params(handle, params)
        return handle

    def _create(self, call: _Call, key: str, run_name: str, tags: dict[str, Any], parent: str | None) -> None:
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
            self._submit(_Call(run_id, "params", len(items), send))

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)  # taken now, so replayed points keep the time they were measured
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if v is not None]
        if items:
            self._submit(_Call(run_id, "metrics", len(items), metrics=items))

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(redact(k, v))) for k, v in tags.items()]

        def send(rid: str) -> None:
            for i in range(0, len(items), _PARAMS_PER_CALL):
                self.client.log_batch(rid, tags=items[i : i + _PARAMS_PER_CALL])

        if items:
            self._submit(_Call(run_id, "tags", len(items), send))

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self._submit(_Call(run_id, "artifact", send=lambda rid: self.client.log_artifact(rid, str(path), artifact_path)))

    def log_table(self, run_id: str, rows: list[dict[str, Any]], artifact_file: str) -> None:
        columns = {k: [r[k] for r in rows] for k in rows[0]} if rows else {}
        self._submit(_Call(run_id, "artifact", send=lambda rid: self.client.log_table(rid, columns, artifact_file)))

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._submit(_Call(run_id, "artifact", send=lambda rid: self.client.log_text(rid, text, artifact_file)))

    def log_model(self, run_id: str, model_dir: str | Path, *, eos_token: str, registered_name: str | None = None) -> None:
        """Log a train folder as a servable pyfunc model (`pipeline.serving`) and tag its URI as `model_uri`."""
        def send(rid: str) -> None:
            from pipeline.serving import log_generation_model

            uri = log_generation_model(self.tracking_uri, rid, Path(model_dir), eos_token=eos_token,
                                       registered_name=registered_name)
            self.client.set_tag(rid, "model_uri", uri)

        self._submit(_Call(run_id, "model", send=send))

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        """End a run; ending the parent run ends the invocation: replay what is queued and report the rest."""
        self._submit(_Call(run_id, "end", send=lambda rid: self.client.set_terminated(rid, status=status)))
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
            self._lose(_Call(run_id, "workers"))
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
    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_table(self, run_id: str, rows: list[dict[str, Any]], artifact_file: str) -> None: ...
    def log_text(self, run_id: str, text: str, artifact_file: str) -> None: ...
    def log_model(self, run_id: str, model_dir: str | Path, *, eos_token: str, registered_name: str | None = None) -> None: ...
    def end(self, run_id: str, status: str = "FINISHED") -> None: ...
    def close(self) -> str | None: ...

    def mlflow_id(self, run_id: str) -> str | None:
        return None

    def worker_run_id(self, run_id: str) -> str | None:
        return None


# --- a training worker's step metrics --------------------------------------------

class StepLogger(_Outbox):
    """Step metrics from a worker (rank 0) into an existing run. Never stops training: during an outage the
    points are queued (bounded) and replayed; `close()` at the end of training sends or reports them."""

    def __init__(self, tracking_uri: str, run_id: str, *, max_pending_points: int = 100_000):
        from mlflow.tracking import MlflowClient

        _fail_fast_http()
        super().__init__(tracking_uri, max_pending_points=max_pending_points, max_pending_calls=0)
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        self._submit(_Call(self.run_id, "metrics", len(items), metrics=items))


class NullStepLogger:
    report = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def close(self) -> str | None: ...


def step_logger(tracking_uri: str | None, run_id: str | None, rank: int) -> StepLogger | NullStepLogger:
    if rank != 0 or not tracking_uri or not run_id:
        return NullStepLogger()
    return StepLogger(tracking_uri, run_id)
