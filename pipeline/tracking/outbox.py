"""MLflow calls that survive an outage: queued in order, replayed, and what was lost reported in one line.

Every call becomes an entry of an in-memory outbox, sent at once while MLflow
answers. When it does not (connection refused, a timeout, a 5xx or 429) the
entry stays queued, in order, later calls queue behind it, and the outbox is
retried on a later call once a back-off has passed (5 s, doubling to 60 s, so an
unreachable host costs training one timeout per back-off, not one per step) and
always at the end (`close`). Whatever is still unsent then, and whatever MLflow
refused (a 4xx: replaying it would fail again), is reported in one warning line
that names each run and what it lacks. The outbox is bounded
(`max_pending_points` metric points, `max_pending_calls` other calls); past that
new entries are dropped and counted in that line. Unless they are set,
MLFLOW_HTTP_REQUEST_MAX_RETRIES=0 and MLFLOW_HTTP_REQUEST_TIMEOUT=10 make a
failed call fail fast (it is queued and retried anyway): MLflow's own defaults
retry one call for minutes. The outbox lives in memory: a process that dies (a
killed driver, a restarted rank-0 worker) takes its unsent entries with it.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("pipeline.tracking")  # one logger for all of tracking (its warnings are what users read)
METRICS_PER_CALL = 1000  # MLflow's log_batch limit
PENDING = "pending-"
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_BACKOFF_S, _MAX_BACKOFF_S = 5.0, 60.0


# --- the outbox ------------------------------------------------------------------

def fail_fast_http() -> None:
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


def short_cause(e: BaseException) -> str:
    """A short one-line reason: the OS error inside MLflow's long message when there is one."""
    text = " ".join(str(e).split())
    m = re.search(r"\[Errno -?\d+\] ([^\"')]+)", text)
    return m.group(1).strip() if m else text[:200]


_WHAT = {"run": "the run itself", "params": "param", "metrics": "metric point", "tags": "tag", "inputs": "dataset input",
         "artifact": "artifact", "model": "the logged model", "workers": "what its Ray workers log", "end": "its end status"}


def _what(kind: str, n: int, steps: set[int] | None) -> str:
    """How the report names `n` lost items of one kind: `12 metric points (steps 1-6)`, `its end status`."""
    word = _WHAT[kind]
    if word.startswith(("the ", "what ", "its ")):
        return word
    span = f" (steps {min(steps)}-{max(steps)})" if kind == "metrics" and steps and max(steps) > 0 else ""
    return f"{n} {word}{'' if n == 1 else 's'}{span}"  # step 0 is a stage's summary metrics, not a curve


@dataclass
class Call:
    """One queued MLflow call into a run (by handle); `count` items (metric points, params, tags) for the report."""

    run: str
    kind: str  # a key of _WHAT
    count: int = 1
    send: Callable[[str], None] | None = None  # the call, given the run's MLflow id (metrics are sent as data)
    metrics: list[Any] = field(default_factory=list)
    attempts: int = 0


class Outbox:
    """Sends calls in order while MLflow answers; queues them during an outage; counts what is lost."""

    client: Any

    def __init__(self, uri: str, *, max_pending_points: int, max_pending_calls: int):
        self.uri = uri
        self.report: str | None = None
        self._queue: deque[Call] = deque()
        self._max_points, self._max_calls = max_pending_points, max_pending_calls
        self._points, self._others = 0, 0  # queued metric points, queued calls of other kinds
        self._failures, self._retry_at, self._last_error = 0, 0.0, ""
        self._ids: dict[str, str] = {}  # pending handle -> MLflow run id, once created
        self._names: dict[str, str] = {}  # handle -> what the run is (a stage, the parent)
        self._lost: dict[str, dict[str, int]] = {}  # handle -> kind -> items not recorded
        self._lost_steps: dict[str, set[int]] = {}

    def _run_id(self, handle: str) -> str | None:
        return self._ids.get(handle) if handle.startswith(PENDING) else (handle or None)

    def _submit(self, call: Call) -> None:
        self._pump()  # what is queued goes first, and sending it may make room
        # Run creations and ends are never dropped: they are few, and without them everything else is lost too.
        if call.kind == "metrics" and self._points + call.count > self._max_points:
            return self._lose(call)
        if call.kind not in ("run", "end", "metrics") and self._others >= self._max_calls:
            return self._lose(call)
        self._count(call, +1)
        self._queue.append(call)
        self._pump()

    def _count(self, call: Call, sign: int) -> None:
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
                self._last_error = short_cause(e)
                log.warning("MLflow at %s refused %s for %s: %s", self.uri, batch[0].kind, self._label(batch[0].run),
                            self._last_error)
                self._lose_all(batch)
            for c in batch:
                self._count(self._queue.popleft(), -1)
        if self._failures:
            log.warning("MLflow at %s answers again: the queued tracking calls were sent", self.uri)
            self._failures, self._retry_at = 0, 0.0

    def _next_batch(self) -> list[Call]:
        """The head of the queue; consecutive metric calls into the same run go together (one log_batch)."""
        first = self._queue[0]
        if first.kind != "metrics":
            return [first]
        batch, n = [], 0
        for c in self._queue:
            if c.kind != "metrics" or c.run != first.run or (batch and n + c.count > METRICS_PER_CALL):
                break
            batch.append(c)
            n += c.count
        return batch

    def _send(self, calls: list[Call], run_id: str | None) -> None:
        if calls[0].kind == "metrics":
            items = [m for c in calls for m in c.metrics]
            for i in range(0, len(items), METRICS_PER_CALL):
                self.client.log_batch(run_id, metrics=items[i : i + METRICS_PER_CALL])
        else:
            calls[0].send(run_id)

    def _down(self, e: Exception) -> None:
        self._failures += 1
        self._last_error = short_cause(e)
        self._retry_at = time.monotonic() + min(_MAX_BACKOFF_S, _BACKOFF_S * 2 ** (self._failures - 1))
        if self._failures == 1:
            log.warning("MLflow at %s is unreachable (%s): tracking calls are queued in memory and retried; the run goes on",
                        self.uri, self._last_error)

    def _lose(self, call: Call) -> None:
        kinds = self._lost.setdefault(call.run, {})
        kinds[call.kind] = kinds.get(call.kind, 0) + call.count
        if call.metrics:
            self._lost_steps.setdefault(call.run, set()).update(m.step for m in call.metrics)

    def _lose_all(self, calls: list[Call]) -> None:
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
