"""The sha256 of input files, remembered so that an unchanged file is read once.

An input is identified by its bytes, not by where it lies or when it was
touched (see `tokenization.inputs.input_identity`). Reading a whole corpus at
every `status` would be slow, so each digest is remembered in a small per-user
file, `$LLMPIPE_CACHE_DIR/input-sha256.json` (default
`$XDG_CACHE_HOME/llmpipe`, else `~/.cache/llmpipe`; the folder is the user's
own and mode 0700, since whoever can write it decides what a file "contains"),
under the file's (uri, size, mtime_ns, ctime_ns, inode). A rewrite that puts
back size and mtime still moves ctime (which no user can set), and a copy or a
reinstalled venv has new inodes, so each of those is read again. A file
changed less than `RACY_NS` before it is hashed is not remembered: within one
tick of the filesystem's clock a second write may leave every timestamp as it
was (git's "racy clean" rule). Remote objects have no ctime or inode; their
mtime stands in. Where the memo cannot be used (an unwritable home, a folder
owned by someone else) every file is simply hashed each time.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RACY_NS = 2_000_000_000
MAX_ENTRIES = 100_000  # the oldest entries go first beyond this: forgetting one only costs a re-read
CHUNK = 1 << 20


def cache_dir() -> Path:
    if os.environ.get("LLMPIPE_CACHE_DIR"):
        return Path(os.environ["LLMPIPE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmpipe"


def _private(folder: Path) -> bool:
    """Whether `folder` exists (created if need be), is ours and is 0700 (made so if it is ours)."""
    try:
        folder.mkdir(parents=True, mode=0o700, exist_ok=True)
        st = folder.stat()
        if st.st_uid != os.getuid():
            return False
        if st.st_mode & 0o077:
            os.chmod(folder, 0o700)
        return True
    except OSError:
        return False


class ContentHashes:
    """sha256 of files by content, memoized; `hashed` / `reused` count the files of the last call."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else cache_dir() / "input-sha256.json"
        self.hashed = 0
        self.hashed_bytes = 0
        self.reused = 0

    def sha256(self, files: list[Any], opener: Callable[[str], Any]) -> dict[str, str]:
        """uri -> hex digest for each file (an `InputFile`: uri, size, mtime_ns, ctime_ns, inode)."""
        memo = self._load()
        now, changed, out = time.time_ns(), False, {}
        self.hashed = self.hashed_bytes = self.reused = 0
        for f in files:
            key = f"{f.uri}\0{f.size}\0{f.mtime_ns}\0{f.ctime_ns}\0{f.inode}"
            digest = memo.get(key) if memo is not None else None
            if digest is not None:
                self.reused += 1
            else:
                try:
                    digest, n = _digest(f.uri, opener)
                except OSError as e:  # the reader will name it (or skip it under on_error: skip); here it is a state
                    digest, n = f"unreadable ({type(e).__name__})", -1
                self.hashed += 1
                self.hashed_bytes += n
                if memo is not None and n == f.size and now - max(f.ctime_ns, f.mtime_ns) > RACY_NS:
                    memo[key] = digest
                    changed = True
            out[f.uri] = digest
        if changed:
            self._save(memo)
        return out

    def _load(self) -> dict[str, str] | None:
        if not _private(self.path.parent):
            return None
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return dict(data["sha256"]) if data.get("version") == 1 else {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}  # missing or damaged: start over

    def _save(self, memo: dict[str, str]) -> None:
        entries = list(memo.items())[-MAX_ENTRIES:]
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"version": 1, "sha256": dict(entries)}, f)
            os.replace(tmp, self.path)  # concurrent writers: the last one wins, the other's entries are re-read later
        except OSError:
            tmp.unlink(missing_ok=True)


def _digest(uri: str, opener: Callable[[str], Any]) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with opener(uri) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n
