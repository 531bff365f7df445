"""The per-experiment pointer that explains staleness: `<root>/_runs/<experiment>.json`.

It remembers the fingerprint each stage had the last time this experiment
committed it, so `plan` can say *why* a stage is stale (which config keys
changed), not only that it is. Two runs committing at once must both keep their
entry: on a local or shared-filesystem store the update is a read-modify-write
under an `flock`; an object store has no locks, so the update is written,
re-read after a short random pause and written again when another run's write
replaced it (best effort: a lost entry only makes a `stale` reason less precise).
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import time
from pathlib import Path

from pipeline.engine.store import ArtifactStore, open_lock_file
from pipeline.errors import StoreError


def _path(store: ArtifactStore, experiment: str) -> str:
    return f"{store.base}/_runs/{experiment}.json"


def last_fingerprints(store: ArtifactStore, experiment: str) -> dict[str, str]:
    return store.read_json(_path(store, experiment)) or {}


def remember(store: ArtifactStore, experiment: str, stage: str, fingerprint: str) -> None:
    """Record `stage`'s fingerprint, keeping every other stage's entry even when runs update it at once."""
    if not store.is_local:
        return _remember_remote(store, experiment, stage, fingerprint)
    path = _path(store, experiment)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = open_lock_file(Path(store.base) / "_locks" / "runs" / f"{experiment}.lock")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # read-modify-write: two runs committing at once both keep their entry
        state = {**last_fingerprints(store, experiment), stage: fingerprint}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(tmp).write_bytes(json.dumps(state, indent=2, sort_keys=True).encode("utf-8"))
        os.replace(tmp, path)
    except OSError as e:  # disk full, read-only: the old pointer stays whole
        Path(tmp).unlink(missing_ok=True)
        raise StoreError(f"cannot write {path}: {e.strerror}") from None
    finally:
        os.close(fd)


def _remember_remote(store: ArtifactStore, experiment: str, stage: str, fingerprint: str) -> None:
    path = _path(store, experiment)
    for _ in range(5):
        state = {**last_fingerprints(store, experiment), stage: fingerprint}
        store.write_bytes(path, json.dumps(state, indent=2, sort_keys=True).encode("utf-8"))
        time.sleep(random.uniform(0.05, 0.25))
        if last_fingerprints(store, experiment).get(stage) == fingerprint:
            return
