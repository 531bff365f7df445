"""What the user sees while `llmpipe run` works: the pipeline's own lines and one live progress per stage.

One process draws: the driver. On a terminal the current stage is a live line drawn with `rich` (spinner, bar,
the stage's status: shards and MB/s, step, loss, tokens/s and ETA, ...) under the pipeline's permanent lines;
elsewhere (CI, `ray job` logs, a pipe) the status is a plain `[stage] ...` line at most every `progress_every_s`.
Library output (Ray, DeepSpeed, MLflow) goes to one log file per stage (`pipeline.runlogs`) unless `log_dir` is
None (`-v`), in which case it stays where the libraries write it, interleaved with ours. The pipeline's own
warnings (`pipeline.*` loggers) stay on the terminal either way. A failing stage's line names its log.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from pipeline.runlogs import LogCapture


class Progress:
    """A stage's progress as the stage reports it. This one shows nothing (a stage run without a display)."""

    def update(self, *, done: float | None = None, total: float | None = None, status: str | None = None) -> None:
        """`done` of `total` (None: unknown, a spinner) and a short status text after the bar."""

    def note(self, text: str) -> None:
        """A permanent `[stage] text` line (something the user should not miss, e.g. a resume)."""

    def close(self) -> None: ...


class Output:
    """The terminal of one invocation: `line()` for the pipeline's lines, `stage()` around each stage.

    With `log_dir` (a folder, or candidates in order), library output is captured into it from `capture_logs()`
    (which the engine calls at its first write into the store, and `stage()` in any case) until the end."""

    def __init__(self, terminal: TextIO | None = None, *, log_dir: Path | list[Path] | None = None,
                 live: bool | None = None, progress_every_s: float = 30.0, echo: Callable[[str], None] | None = None):
        self.failed_log: Path | None = None
        self._terminal, self._live, self._every, self._echo = terminal, live, progress_every_s, echo
        candidates = [log_dir] if isinstance(log_dir, (str, Path)) else log_dir
        self._capture = LogCapture(candidates) if candidates else None
        self._display: _Plain | _Live | None = None
        self._warnings: logging.Handler | None = None

    @property
    def log_dir(self) -> Path | None:
        """The folder the library output goes to, once capturing began."""
        return self._capture.folder if self._capture else None

    def __enter__(self) -> Output:  # noqa: PYI034 - never subclassed, and typing.Self needs Python 3.11
        stream = self._capture.keep_terminal(self._terminal) if self._capture else (self._terminal or sys.stdout)
        # A live display only where nothing else writes to the terminal: with -v, library lines would tear it.
        live = self._live if self._live is not None else bool(self._capture) and _isatty(stream)
        try:
            self._display = _Live(stream) if live and self._echo is None else _Plain(stream, self._every, self._echo)
        except BaseException:
            if self._capture:
                self._capture.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._warnings:
            logging.getLogger("pipeline").removeHandler(self._warnings)
        if self._display:
            self._display.close()
        if self._capture:
            self._capture.stop()  # never leave the process writing into a log file

    def capture_logs(self) -> None:
        """Start capturing library output (once; nothing without `log_dir`), and say where it goes."""
        if self._capture is None or self._capture.folder is not None:
            return
        folder = self._capture.begin()
        self._warnings = _ToDisplay(self._display)  # the pipeline's warnings (an MLflow outage report) stay here
        logging.getLogger("pipeline").addHandler(self._warnings)
        self.line(f"logs: {folder} (Ray, DeepSpeed and MLflow output, a file per stage; -v shows it here)")

    def line(self, text: str) -> None:
        assert self._display is not None, "Output is used as a context manager"
        self._display.line(text)

    @contextmanager
    def stage(self, name: str) -> Iterator[Progress]:
        """Library output into `<name>.log` and a live progress while the stage runs; if it fails, a line
        `[name] failed after 12.3s (log: <its log>)`, which comes before the error itself (the CLI's last line)."""
        assert self._display is not None, "Output is used as a context manager"
        self.capture_logs()
        log = self._capture.switch(name) if self._capture else None
        progress, t0 = self._display.progress(name), time.time()
        try:
            yield progress
        except BaseException as e:
            self.failed_log = log
            progress.close()
            how = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            self.line(f"[{name}] {how} after {time.time() - t0:.1f}s" + (f" (log: {log})" if log else ""))
            raise
        finally:
            progress.close()
            if self._capture:
                self._capture.switch("run")


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _ToDisplay(logging.Handler):
    def __init__(self, display: _Plain | _Live):
        super().__init__(logging.WARNING)
        self.display = display

    def emit(self, record: logging.LogRecord) -> None:
        self.display.line(f"llmpipe: {record.levelname.lower()}: {record.getMessage()}")


# --- plain lines -----------------------------------------------------------------

class _Plain:
    def __init__(self, stream: TextIO, every_s: float, echo: Callable[[str], None] | None):
        self.stream, self.every_s, self.echo = stream, every_s, echo
        self.lock = threading.Lock()

    def line(self, text: str) -> None:
        with self.lock:
            if self.echo:
                self.echo(text)
            else:
                self.stream.write(text + "\n")
                self.stream.flush()

    def progress(self, name: str) -> Progress:
        return _PlainProgress(self, name)

    def close(self) -> None: ...


class _PlainProgress(Progress):
    """The status as a `[stage] status` line: the first at once, then at most one every `every_s`."""

    def __init__(self, display: _Plain, name: str):
        self.display, self.name = display, name
        self.shown_at: float | None = None

    def update(self, *, done: float | None = None, total: float | None = None, status: str | None = None) -> None:
        now = time.monotonic()
        if status and (self.shown_at is None or now - self.shown_at >= self.display.every_s):
            self.shown_at = now
            self.display.line(f"[{self.name}] {status}")

    def note(self, text: str) -> None:
        self.display.line(f"[{self.name}] {text}")


# --- a live display on a terminal ----------------------------------------------------

class _Live:
    def __init__(self, stream: TextIO):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )
        from rich.progress import Progress as Bars
        from rich.table import Column

        self.console = Console(file=stream, highlight=False)
        # the stage's name and the elapsed time always show; a long status is cut short on a narrow terminal
        self.bars = Bars(SpinnerColumn(), TextColumn("{task.description}", style="bold", table_column=Column(min_width=9)),
                         BarColumn(bar_width=24), TimeElapsedColumn(),
                         TextColumn("{task.fields[status]}", markup=False, table_column=Column(no_wrap=True, ratio=1)),
                         console=self.console, transient=True, redirect_stdout=False, redirect_stderr=False,
                         refresh_per_second=4, expand=True)
        self.bars.start()

    def line(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def progress(self, name: str) -> Progress:
        return _LiveProgress(self, name)

    def close(self) -> None:
        self.bars.stop()


class _LiveProgress(Progress):
    def __init__(self, display: _Live, name: str):
        self.display, self.name = display, name
        self.task: Any = display.bars.add_task(name, total=None, status="")

    def update(self, *, done: float | None = None, total: float | None = None, status: str | None = None) -> None:
        if self.task is None:
            return
        fields = {"total": total, "completed": done, "status": status}
        self.display.bars.update(self.task, **{k: v for k, v in fields.items() if v is not None})

    def note(self, text: str) -> None:
        self.display.line(f"[{self.name}] {text}")

    def close(self) -> None:
        if self.task is not None:
            self.display.bars.remove_task(self.task)
            self.display.bars.refresh()  # else its last frame is drawn again under the next line
            self.task = None
