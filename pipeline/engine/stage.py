"""A stage declared as data, what it is handed when it runs, and its fingerprint.

A `Stage` is a name, the stages it needs, a function selecting the part of the
config that changes its output, a `version` (bump it when the output format or
meaning changes) and `run(ctx) -> metrics`. Its fingerprint is the sha256 of the
canonical JSON of `{stage, version, section, upstream fingerprints}`, so a
change anywhere upstream changes every fingerprint downstream of it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.engine.store import StageRef
from pipeline.schema import Config
from pipeline.terminal import Progress


@dataclass(frozen=True)
class Upstream:
    name: str
    fingerprint: str
    ref: StageRef  # hand this to Ray tasks: they open it on their own node
    manifest: dict[str, Any]

    def file(self, name: str) -> Path:
        """One committed file, readable by the driver (downloaded alone from a remote store)."""
        return self.ref.local([name]) / name


@dataclass
class StageContext:
    config: Config
    stage: str
    fingerprint: str
    section: dict[str, Any]
    out_dir: Path  # where the stage writes (local)
    out_uri: str  # where its files go in the store: its new generation (local stores) or the stage folder's URI
    inputs: dict[str, Upstream]
    tracker: Any
    run_id: str
    output: StageRef  # this stage's folder, for Ray tasks that write into it from any node
    progress: Progress = field(default_factory=Progress)  # the live display: done/total and a status text


@dataclass(frozen=True)
class Stage:
    name: str
    needs: tuple[str, ...]
    section: Callable[[Config], dict[str, Any]]
    version: int
    run: Callable[[StageContext], dict[str, float]]
    resumable: bool = False  # keep a partial folder (training resumes from its checkpoints)
    uses_ray: bool = True
    reads_inputs: bool = False  # reads data.inputs on Ray nodes: the cluster pre-flight checks every node sees them
    params: Callable[[Config], dict[str, Any]] | None = None  # logged to MLflow (default: section)
    input_context: str = "input"  # what its upstreams are to it, in MLflow's dataset inputs ("training", ...)
    main_input: str | None = None  # the upstream it reads as data: listed first, so MLflow's Datasets column shows it
    # Optional parts of the graph: `enabled(cfg)` False leaves the stage out (its section is not configured), and
    # `extra_needs(cfg)` names upstreams only some configs use (evaluate reads `index` when retrieval is on).
    enabled: Callable[[Config], bool] | None = None
    extra_needs: Callable[[Config], tuple[str, ...]] | None = None

    def is_enabled(self, cfg: Config) -> bool:
        return self.enabled is None or self.enabled(cfg)

    def needs_for(self, cfg: Config) -> tuple[str, ...]:
        """The upstreams this config makes it read: `needs`, then `extra_needs(cfg)`."""
        return self.needs + (self.extra_needs(cfg) if self.extra_needs else ())


def fingerprint(stage: Stage, section: dict[str, Any], upstream: dict[str, str]) -> str:
    payload = {"stage": stage.name, "version": stage.version, "config": section, "upstream": upstream}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
