"""One builder per stage folder: two invocations never build the same stage at once.

Before `execute` clears and builds a stage folder it claims it: an exclusive
`fcntl.flock` on `<root>/_locks/<stage>.<fingerprint16>.lock`, beside the stage
folders rather than inside one (a folder being redone is cleared). A second
`llmpipe run` that reaches a stage another run is building prints who holds it
(pid, host, since when) and waits. When it gets the lock it looks again: if
the holder committed the stage meanwhile, the waiter takes it as cached (also
under `--only`/`--force`: it was built after the waiter started); if the
holder died, the kernel dropped its lock and the waiter builds the stage (or
resumes it, for training). A stage that is already complete when the lock is
free is taken as cached unless forced. Lock files are never deleted: removing
one while a process waits on it would let a third process lock a new file.

Scope: a local root, or a shared filesystem whose `flock` works across
machines (NFSv4, Lustre, CephFS); where the filesystem has no locks at all
the stage runs unlocked after a warning. Object stores have no lock
primitive: for a remote root the lock file is in this user's private folder
on this machine (`<node cache>/locks/<store hash>/`, see
`pipeline.engine.nodecache`: 0700, not a shared /tmp path another user could
plant files in), which serialises this user's runs on one machine only. Runs
on several machines against one bucket may build a stage twice; each uploads
complete files and writes its marker last, so a deterministic stage
(tokenizer, prepare) ends complete and correct, but the files of two training
runs could mix: run one invocation per experiment at a time there.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.engine.leases import NO_LOCKS
from pipeline.engine.nodecache import private_dir, store_key
from pipeline.engine.store import SHORT, ArtifactStore, open_lock_file
from pipeline.errors import StoreError


class StageLocks:
    """The stage lock an invocation holds (one at a time, released after the commit)."""

    def __init__(self, store: ArtifactStore, echo: Callable[[str], None] = print):
        self.store, self.echo = store, echo
        self._fd: int | None = None
        if store.is_local:
            self.folder = Path(store.base) / "_locks"
        else:
            self.folder = private_dir() / "locks" / store_key(store.uri)
        try:  # the first write into the store: an unwritable root is reported here, before Ray or MLflow start
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create lock folder {self.folder}: {e.strerror}") from None

    def path(self, stage: str, fingerprint: str) -> Path:
        return self.folder / f"{stage}.{fingerprint[:SHORT]}.lock"

    def claim(self, stage: str, fingerprint: str, *, forced: bool) -> bool:
        """Take the stage's lock, waiting while another run holds it. True when the stage turned out
        committed by another run (the lock is then given back): the caller takes it as cached."""
        path = self.path(stage, fingerprint)
        fd = open_lock_file(path)
        try:
            waited = self._lock(fd, path, stage)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode(), 0)
        except OSError as e:
            os.close(fd)
            raise StoreError(f"cannot lock or write lock file {path}: {e.strerror}") from None
        except BaseException:  # e.g. Ctrl-C while waiting
            os.close(fd)
            raise
        self._fd = fd
        if (waited or not forced) and self.store.manifest(stage, fingerprint) is not None:
            self.release()
            self.echo(f"[{stage}] committed by another run meanwhile: using it")
            return True
        return False

    def _lock(self, fd: int, path: Path, stage: str) -> bool:
        """Lock `fd`; True if another holder made us wait."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            pass
        except OSError as e:
            if e.errno not in NO_LOCKS:
                raise
            self.echo(f"[{stage}] WARNING: {path}: the filesystem has no locks ({e.strerror}); building without one")
            return False
        self.echo(f"[{stage}] waiting for another run that is building it ({holder(path)}; lock {path})")
        fcntl.flock(fd, fcntl.LOCK_EX)
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def holder(path: Path) -> str:
    """Who holds (or last held) a lock, as written into it by `claim`."""
    try:
        info = json.loads(path.read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} on {info['host']}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):  # being written right now, or empty
        return "holder not yet recorded"
