"""Fault injection for tests and drills: make a chosen task die once, for real.

`LLMPIPE_FAULTS="prepare.shard:1:exit"` makes the worker process running
`maybe_fail("prepare.shard", 1)` exit abruptly the first time (a marker in
`LLMPIPE_FAULTS_DIR` remembers it), so Ray's retry path is exercised with a
real dead process, not a mock. Unset (the default), `maybe_fail` does nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

VARS = ("LLMPIPE_FAULTS", "LLMPIPE_FAULTS_DIR")


def env() -> dict[str, str]:
    """The fault variables to hand to Ray tasks (empty when none are set)."""
    return {k: os.environ[k] for k in VARS if k in os.environ}


def maybe_fail(point: str, key: object) -> None:
    spec = os.environ.get("LLMPIPE_FAULTS")
    if not spec:
        return
    for item in spec.split(","):
        p, k, action = item.strip().split(":")
        if p != point or k != str(key):
            continue
        marker = Path(os.environ.get("LLMPIPE_FAULTS_DIR", "/tmp")) / f"llmpipe-fault-{p}-{k}"
        if marker.exists():
            return
        marker.touch()
        if action == "exit":
            os._exit(1)
        raise RuntimeError(f"injected fault at {point}:{key}")
