"""Training progress from rank 0 to the driver's display, without Ray printing any worker output.

The driver creates a small Ray actor and hands it to the workers in their config; rank 0 gives it each progress
line (`metrics.progress_line`: step, loss, tokens/s, ETA) as it logs the step, and a thread of the driver takes
the newest one twice a second into the stage's live progress (`ctx.progress`). The warnings rank 0 logs (an
MLflow outage report of its step metrics) travel the same way, so they reach the terminal instead of only the
train log, and so does a resume. Without Ray (benchmarks call the worker directly) the line is printed, as before.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pipeline.stages.train.checkpoints import step_name
from pipeline.stages.train.metrics import progress_line
from pipeline.terminal import Progress

POLL_S = 0.5


class ProgressSink:
    """The Ray actor between rank 0 and the driver: the newest progress event, and the notes not yet shown."""

    def __init__(self) -> None:
        self.latest: dict[str, Any] | None = None
        self.notes: list[str] = []

    def put(self, event: dict[str, Any]) -> None:
        self.latest = event

    def note(self, text: str) -> None:
        self.notes.append(text)

    def take(self) -> tuple[dict[str, Any] | None, list[str]]:
        notes, self.notes = self.notes, []
        return self.latest, notes


def report_progress(sink: Any, rank: int, step: int, total: int, metrics: dict[str, float], elapsed_s: float,
                    done_before: int) -> None:
    """The worker's call at each logged step: rank 0 hands the progress line to the driver (or prints it)."""
    if rank != 0:
        return
    line = progress_line(step, total, metrics, elapsed_s, done_before)
    if sink is None:
        print(line, flush=True)
        return
    _forward_warnings(sink)
    sink.put.remote({"step": step, "total": total, "line": line, "resumed_at": done_before})


class _ToSink(logging.Handler):
    """The pipeline's warnings on rank 0, to the driver. Sent synchronously: the last one (the step logger's
    report at the end of training) must arrive before the worker process ends."""

    def __init__(self, sink: Any):
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        import ray

        try:
            ray.get(self.sink.note.remote(f"warning: {record.getMessage()}"), timeout=10)
        except Exception as e:  # noqa: BLE001 - the line is in the worker's log anyway; training must not stop for it
            print(f"llmpipe: could not show this warning on the driver's terminal: {e}", flush=True)


def _forward_warnings(sink: Any) -> None:
    logger = logging.getLogger("pipeline")
    if not any(isinstance(h, _ToSink) for h in logger.handlers):
        logger.addHandler(_ToSink(sink))


@contextmanager
def forward_progress(progress: Progress) -> Iterator[Any]:
    """A sink for the workers' config; while the block runs, what rank 0 reports updates `progress`."""
    import ray

    sink = ray.remote(num_cpus=0)(ProgressSink).remote()
    stop = threading.Event()

    def poll() -> None:
        resumed = False
        while True:
            last = stop.is_set()  # one more round after the stop, for what arrived just before it
            try:
                event, notes = ray.get(sink.take.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - a slow or lost poll costs one refresh of the display, nothing else
                event, notes = None, []
            for text in notes:
                progress.note(text)
            if event and event["resumed_at"] and not resumed:
                resumed = True
                progress.note(f"resumed from {step_name(event['resumed_at'])} at step {event['resumed_at']}")  # its checkpoint
            if event:
                progress.update(done=event["step"], total=event["total"], status=event["line"])
            if last:
                return
            stop.wait(POLL_S)

    thread = threading.Thread(target=poll, name="llmpipe-train-progress", daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        stop.set()
        thread.join(timeout=15)
        ray.kill(sink)
