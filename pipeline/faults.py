"""Fault injection for tests and drills: make a chosen point fail once, for real.

`LLMPIPE_FAULTS="prepare.shard:1:exit,train.nan:3:flag"` lists `point:key:action`
entries. The first time code reaches a listed point with that key, the fault
fires and a marker in `LLMPIPE_FAULTS_DIR` remembers it, so a retried task or a
restarted worker runs clean: `exit` kills the process abruptly (Ray's retry and
Ray Train's restore see a really dead worker, not a mock), `raise` raises,
`flag` makes `triggered()` return True (e.g. to poison a loss with NaN), and
`pause` stalls there until a file `llmpipe-release-<point>-<key>` appears in the
same folder (a slow step, e.g. to hold training while a drill restarts a
service). Unset (the default), nothing here does anything.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

VARS = ("LLMPIPE_FAULTS", "LLMPIPE_FAULTS_DIR")


def env() -> dict[str, str]:
    """The fault variables to hand to Ray tasks and workers (empty when none are set)."""
    return {k: os.environ[k] for k in VARS if k in os.environ}


def _fire(point: str, key: object) -> str | None:
    """The action of a configured fault the first time it is reached, else None."""
    spec = os.environ.get("LLMPIPE_FAULTS")
    if not spec:
        return None
    for item in spec.split(","):
        p, k, action = item.strip().split(":")
        if p == point and k == str(key):
            marker = Path(os.environ.get("LLMPIPE_FAULTS_DIR", "/tmp")) / f"llmpipe-fault-{p}-{k}"
            if marker.exists():
                return None
            marker.touch()
            return action
    return None


def triggered(point: str, key: object) -> bool:
    return _fire(point, key) is not None


def maybe_fail(point: str, key: object) -> None:
    action = _fire(point, key)
    if action == "exit":
        os._exit(1)
    if action == "pause":
        release = Path(os.environ.get("LLMPIPE_FAULTS_DIR", "/tmp")) / f"llmpipe-release-{point}-{key}"
        while not release.exists():
            time.sleep(0.1)
        return
    if action is not None:
        raise RuntimeError(f"injected fault at {point}:{key}")
