"""Library output of one invocation into log files: `run.log` outside any stage, `<stage>.log` during each stage.

While capturing, file descriptors 1 and 2 of this process point at the current log file and `sys.stdout` /
`sys.stderr` write to those descriptors, so whatever a library prints lands there however it prints it: the
worker lines Ray forwards to the driver, Ray's and gRPC's C++ log lines, DeepSpeed's and MLflow's loggers, Python
warnings, tqdm bars, and the processes the driver starts meanwhile (the local Ray instance writes to `run.log`).
The terminal is kept as a duplicate of the original stdout, which the display (`pipeline.terminal`) draws on;
`stop()` puts every descriptor and stream back. The folder is one per invocation: `<store>/_logs/<time>-<pid>/`
for a local store, the same under the temp folder for a remote one (or when the store's cannot be created). It
is created when capturing begins, which the engine asks for at its first write into the store.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

LOGS = "_logs"


def _parents(store_root: str, *, is_local: bool) -> list[Path]:
    fallback = Path(tempfile.gettempdir()) / "llmpipe-logs" / hashlib.sha256(store_root.encode()).hexdigest()[:16]
    return ([Path(store_root) / LOGS] if is_local else []) + [fallback]


def log_folders(store_root: str, *, is_local: bool) -> list[Path]:
    """Where this invocation's logs may go, in order: in the store (a local one), else under the temp folder."""
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    return [parent / name for parent in _parents(store_root, is_local=is_local)]


def latest_log_folder(store_root: str, *, is_local: bool) -> Path | None:
    """The newest invocation's log folder, if any."""
    found = [p for parent in _parents(store_root, is_local=is_local) if parent.is_dir() for p in parent.iterdir()
             if p.is_dir()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


class _FdWriter(io.TextIOBase):
    """`sys.stdout` / `sys.stderr` while capturing: text straight to descriptor 1 or 2, wherever it points now
    (so a stream a library kept a reference to follows the switch to the next stage's log)."""

    encoding, errors = "utf-8", "replace"

    def __init__(self, fd: int):
        self._fd = fd

    def write(self, s: str) -> int:
        data = s.encode(self.encoding, self.errors)
        while data:
            data = data[os.write(self._fd, data):]
        return len(s)

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        return False


def _fd_of(stream: TextIO) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return None


class LogCapture:
    """Descriptors 1 and 2 and `sys.stdout` / `sys.stderr` into `<folder>/<name>.log` from `begin()` to `stop()`.

    `keep_terminal()` first keeps the stream that reaches the terminal. The folder is created by `begin()`, the
    first of `candidates` that can be (a store that refuses is reported by the store itself, as one line), so
    a run refused before its first write into the store (an unreachable tracking server) leaves nothing there."""

    def __init__(self, candidates: list[Path]):
        self.candidates = [Path(c) for c in candidates]
        self.folder: Path | None = None
        self.current: Path | None = None
        self._fds: tuple[int, int] | None = None
        self._streams: tuple[TextIO, TextIO] | None = None
        self._terminal: TextIO | None = None
        self._stage_logs = False  # whether any stage started (then the folder is the run's record, kept)

    def keep_terminal(self, terminal: TextIO | None = None) -> TextIO:
        """The stream that reaches the terminal whatever `begin()` redirects: `terminal`, else stdout's own."""
        if terminal is None and _fd_of(sys.stdout) == 1:  # the real stdout: keep a copy of it before it moves
            _flush(sys.stdout)
            terminal = self._terminal = os.fdopen(os.dup(1), "w", buffering=1, encoding=sys.stdout.encoding or "utf-8",
                                                  errors="replace")
        return terminal or sys.stdout  # e.g. a test's captured stdout, which is no descriptor

    def begin(self) -> Path:
        """Create the folder and capture into its `run.log`; returns the folder."""
        if self.folder is not None:
            return self.folder
        for i, folder in enumerate(self.candidates):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                break
            except OSError:
                if i == len(self.candidates) - 1:
                    raise
        _flush(sys.stdout, sys.stderr)
        self.folder = folder
        self._fds = (os.dup(1), os.dup(2))
        self._streams = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = _FdWriter(1), _FdWriter(2)
        self.switch("run")
        return folder

    def switch(self, name: str) -> Path:
        """From now on library output goes to `<name>.log` (appended)."""
        path = self.begin() / f"{name}.log"
        self._stage_logs = self._stage_logs or name != "run"
        _flush(sys.stdout, sys.stderr)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.dup2(fd, 1)
            os.dup2(fd, 2)
        finally:
            os.close(fd)
        self.current = path
        return path

    def stop(self) -> None:
        if self._fds is not None:
            _flush(sys.stdout, sys.stderr)
            for saved, fd in zip(self._fds, (1, 2)):
                os.dup2(saved, fd)
                os.close(saved)
            sys.stdout, sys.stderr = self._streams
            self._fds = self._streams = None
        if self._terminal is not None:
            self._terminal.close()
            self._terminal = None
        self._drop_if_empty()

    def _drop_if_empty(self) -> None:
        """A run refused before any stage started, with nothing logged, leaves no log folder in the store."""
        run_log = self.folder / "run.log" if self.folder is not None else None
        if self._stage_logs or run_log is None or not run_log.is_file() or run_log.stat().st_size:
            return
        run_log.unlink()
        for folder in (self.folder, self.folder.parent):
            try:
                folder.rmdir()  # only when empty: a folder other runs also use stays
            except OSError:
                break
        self.folder = None


def _flush(*streams: TextIO) -> None:
    for s in streams:
        try:
            s.flush()
        except (OSError, ValueError):
            pass
