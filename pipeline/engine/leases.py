"""Leases: a reader's shared `flock` on a folder it reads, so the folder is removed only once nobody reads it.

A reader takes a shared lock on the folder's lease file and keeps it for the
life of its process (a training worker reads its shards for hours through
paths it resolved once; a Ray worker's leases go with it). Whoever wants the
folder gone (a new generation of a stage folder replacing it, the node cache
over its cap) takes an exclusive lock without waiting: if any reader holds the
lease the folder stays, else it is removed and the lease file unlinked while
still locked. A reader that opened the lease file just before it was unlinked
sees, once it holds its lock, that the file it locked is no longer the one at
that path, and looks again; a reader that created a fresh lease file for a
folder removed meanwhile finds the folder gone (`hold` is always followed by
a check that the folder still exists). Folder names are never reused, so an
unlinked lease file is never needed again.

Where the filesystem has no locks (`ENOLCK`...), a lease cannot be known to
be free: nothing is ever removed there.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable
from pathlib import Path

NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # a filesystem without flock

_held: dict[str, int] = {}  # lease file -> descriptor holding the shared lock, for the life of the process


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino)


def hold(path: Path) -> bool:
    """Hold a shared lease on `path` (kept until the process exits). False when the lease file was removed while
    we waited for it: the folder it guarded is gone, and the caller looks again."""
    key = str(path)
    if key in _held:
        return True
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError as e:
        if e.errno not in NO_LOCKS:
            os.close(fd)
            raise
    if not _same_file(fd, path):
        os.close(fd)
        return False
    _held[key] = fd
    return True


def held(path: Path) -> bool:
    return str(path) in _held


def release(path: Path) -> None:
    fd = _held.pop(str(path), None)
    if fd is not None:
        os.close(fd)


def remove_unless_held(path: Path, remove: Callable[[], bool]) -> bool:
    """If no process holds the lease `path` (this one included), run `remove`, which deletes what the lease guards
    or declines (False: it looked again under the lock and the folder is needed), and unlink the lease file.
    True when removed."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:  # its folder went meanwhile
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if isinstance(e, BlockingIOError) or e.errno in NO_LOCKS:
            return False
        raise
    try:
        if not _same_file(fd, path) or not remove():  # another remover was faster, or it is needed after all
            return False
        path.unlink(missing_ok=True)  # still locked: a reader waiting on this file will see it is gone
        return True
    finally:
        os.close(fd)
