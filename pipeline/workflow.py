"""The workflow engine: stages declared as data, addressed by fingerprint, run in order.

A `Stage` is a name, the stages it needs, a function selecting the part of the
config that changes its output, a `version` (bump it when the output format or
meaning changes) and `run(ctx) -> metrics`. Its fingerprint is the sha256 of the
canonical JSON of `{stage, version, section, upstream fingerprints}`, so a
change anywhere upstream changes every fingerprint downstream of it.

`plan` labels each stage `cached` (a complete folder exists), `stale` (this
experiment committed the stage before, under another fingerprint: the reason
lists the config keys that changed) or `missing`, then selects what runs:
everything not cached by default; `--only S` runs S alone against cached
upstreams; `--from S` forces S and everything downstream; `--force S` forces S.
`execute` runs the selection, starting Ray only if some selected stage needs it,
and commits each stage before the next starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import faults
from pipeline.config import Config, flatten
from pipeline.locks import StageLocks
from pipeline.store import ArtifactStore, StageRef
from pipeline.tracking import NullTracker, Tracker, git_commit, tracking_uri

log = logging.getLogger(__name__)


class WorkflowError(RuntimeError):
    """A request the workflow cannot satisfy (e.g. --only with a missing upstream)."""


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
    out_uri: str  # the stage folder in the store (a URI for remote stores)
    inputs: dict[str, Upstream]
    tracker: Any
    run_id: str
    output: StageRef  # this stage's folder, for Ray tasks that write into it from any node


@dataclass(frozen=True)
class Stage:
    name: str
    needs: tuple[str, ...]
    section: Callable[[Config], dict[str, Any]]
    version: int
    run: Callable[[StageContext], dict[str, float]]
    resumable: bool = False  # keep a partial folder (training resumes from its checkpoints)
    uses_ray: bool = True
    params: Callable[[Config], dict[str, Any]] | None = None  # logged to MLflow (default: section)


def fingerprint(stage: Stage, section: dict[str, Any], upstream: dict[str, str]) -> str:
    payload = {"stage": stage.name, "version": stage.version, "config": section, "upstream": upstream}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass
class PlanItem:
    stage: Stage
    fingerprint: str
    section: dict[str, Any]
    upstream: dict[str, str]
    state: str  # cached | stale | missing
    reasons: list[str] = field(default_factory=list)
    run: bool = False
    forced: bool = False

    def describe(self) -> str:
        why = f" ({'; '.join(self.reasons)})" if self.reasons else ""
        action = "run" if self.run else "skip"
        return f"{self.stage.name:<10} {self.state}{why} -> {action}{' (forced)' if self.forced else ''}"


def _diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = flatten(old), flatten(new)
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k, "<unset>") != b.get(k, "<unset>"):
            out.append(f"{k}: {_short(a.get(k, '<unset>'))} -> {_short(b.get(k, '<unset>'))}")
    return out


def _short(v: Any, n: int = 60) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, str) else v
    return s if len(s) <= n else s[: n - 3] + "..."


def _downstream(stages: list[Stage], root: str) -> set[str]:
    out = {root}
    for s in stages:  # stages are in topological order
        if any(n in out for n in s.needs):
            out.add(s.name)
    return out


def plan(
    cfg: Config,
    store: ArtifactStore,
    stages: list[Stage],
    *,
    only: str | None = None,
    from_stage: str | None = None,
    force: Iterable[str] = (),
) -> list[PlanItem]:
    names = [s.name for s in stages]
    force = set(force)
    for flag, value in (("--only", only), ("--from", from_stage), *(("--force", f) for f in force)):
        if value is not None and value not in names:
            raise WorkflowError(f"{flag} {value}: unknown stage (stages: {', '.join(names)})")
    last = store.last_fingerprints(cfg.experiment_name)
    items: dict[str, PlanItem] = {}
    for s in stages:
        section = s.section(cfg)
        upstream = {n: items[n].fingerprint for n in s.needs}
        fp = fingerprint(s, section, upstream)
        item = PlanItem(s, fp, section, upstream, state="missing")
        if store.manifest(s.name, fp) is not None:
            item.state = "cached"
        elif (prev_fp := last.get(s.name)) and prev_fp != fp and (prev := store.manifest(s.name, prev_fp)):
            item.state = "stale"
            if prev.get("version") != s.version:
                item.reasons.append(f"version {prev.get('version')} -> {s.version}")
            item.reasons += _diff(prev.get("config", {}), section)
            item.reasons += [f"upstream {n} changed" for n in s.needs if prev.get("upstream", {}).get(n) != upstream[n]]
        elif store.exists(s.name, fp):
            item.reasons.append("incomplete folder: " + ("will resume" if s.resumable else "will redo"))
        items[s.name] = item

    if only:
        for n in items[only].stage.needs:
            if items[n].state != "cached":
                raise WorkflowError(f"--only {only}: upstream stage {n} is {items[n].state}; run it first (e.g. `llmpipe run CONFIG --only {n}` or without --only)")
        items[only].run = items[only].forced = True
        return [items[only]]
    forced = set(force) | (_downstream(stages, from_stage) if from_stage else set())
    for it in items.values():
        it.forced = it.stage.name in forced
        it.run = it.forced or it.state != "cached"
    return list(items.values())


class _Ray:
    """Start (or connect to) Ray lazily: a fully cached run starts no Ray work."""

    def __init__(self) -> None:
        self.started_here = False

    def ensure(self) -> None:
        import ray

        if ray.is_initialized():
            return
        address = os.environ.get("RAY_ADDRESS")
        from pipeline.cluster import keep_ray_token_auth

        keep_ray_token_auth(connecting=bool(address))
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:  # a new local instance, even if a `ray start` cluster runs on this machine (RAY_ADDRESS picks that);
            # its dashboard (which Ray Train's state queries need) binds to loopback only
            ray.init(address="local", dashboard_host="127.0.0.1", logging_level=logging.WARNING)
        self.started_here = True

    def shutdown(self) -> None:
        if self.started_here:
            import ray

            ray.shutdown()


def _tracker(cfg: Config) -> Tracker | NullTracker:
    return Tracker(cfg.experiment_name) if cfg.tracking.enabled else NullTracker()


def execute(cfg: Config, items: list[PlanItem], stages: list[Stage], *, echo: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Run the selected items in order; returns {stage: manifest} for every item."""
    from pipeline.cluster import is_local_tracking_uri, preflight, submission_id

    store = ArtifactStore(cfg.store.root)
    uri = tracking_uri() if cfg.tracking.enabled else None
    # An unreachable tracking server fails here, before anything is written or Ray starts; a local store (SQLite,
    # files) is opened only after the cluster check, which refuses it on a multi-node cluster before it is created.
    tracker = None if uri and is_local_tracking_uri(uri) else _tracker(cfg)
    locks = StageLocks(store, echo)  # one builder per stage folder across invocations (see pipeline.locks)
    ray_ = _Ray()
    if any(it.run and it.stage.uses_ray for it in items):  # before any work: can every node share store and tracking?
        ray_.ensure()
        try:
            preflight(cfg, store, uri)
        except BaseException:
            ray_.shutdown()
            raise
    tracker = tracker or _tracker(cfg)
    commit = git_commit()
    job = submission_id()
    base_tags = {"llmpipe.config": cfg.name, **({"mlflow.source.git.commit": commit} if commit else {}),
                 **({"ray.job_submission_id": job} if job else {})}
    ran = [it.stage.name for it in items if it.run]
    run_name = f"{cfg.name}: {', '.join(ran) if ran else 'all cached'}"  # tells invocations apart in the runs list
    parent = tracker.start_parent(run_name, flatten(cfg.model_dump(mode="json")), base_tags)
    if parent:
        echo(f"MLflow: experiment {cfg.experiment_name!r}, parent run {parent} ({tracker.tracking_uri})")
    manifests: dict[str, dict[str, Any]] = {}
    child = ""
    try:
        for it in items:
            s = it.stage
            tags = {**base_tags, "fingerprint": it.fingerprint, "artifact_uri": store.stage_uri(s.name, it.fingerprint)}
            params = flatten((s.params or s.section)(cfg))
            run = it.run and not locks.claim(s.name, it.fingerprint, forced=it.forced)  # held until committed
            if not run:
                m = store.manifest(s.name, it.fingerprint)
                assert m is not None, f"{s.name} planned as cached but has no manifest"
                child = tracker.start_child(s.name, params, {**tags, "cache": "hit", "source_run_id": m.get("mlflow_run_id") or ""})
                tracker.log_metrics(child, m.get("metrics", {}))
                tracker.end(child)
                manifests[s.name] = m
                echo(f"[{s.name}] cached {it.fingerprint[:16]}")
                continue
            if s.uses_ray:
                ray_.ensure()
            child = tracker.start_child(s.name, params, {**tags, "cache": "miss"})
            inputs = {}
            for n, up in it.upstream.items():
                m = manifests.get(n) or store.manifest(n, up)
                if m is None:
                    raise WorkflowError(f"{s.name}: upstream {n} ({up[:16]}) is not committed")
                inputs[n] = Upstream(n, up, store.ref(n, up), m)
            workdir = store.working_dir(s.name, it.fingerprint, keep_partial=s.resumable and not it.forced)
            ctx = StageContext(cfg, s.name, it.fingerprint, it.section, workdir, store.stage_uri(s.name, it.fingerprint),
                               inputs, tracker, child, store.ref(s.name, it.fingerprint))
            echo(f"[{s.name}] running {it.fingerprint[:16]} -> {store.stage_uri(s.name, it.fingerprint)}")
            t0 = time.time()
            faults.maybe_fail("stage", s.name)  # drills and tests: LLMPIPE_FAULTS=stage:<name>:pause|exit|raise
            metrics = s.run(ctx) or {}
            dt = time.time() - t0
            manifest = store.commit(s.name, it.fingerprint, workdir, {
                "stage": s.name, "version": s.version, "config": it.section, "upstream": it.upstream,
                "metrics": metrics, "started_at": t0, "duration_s": dt, "mlflow_run_id": tracker.mlflow_id(child),
                "git_commit": commit,
            })
            store.remember(cfg.experiment_name, s.name, it.fingerprint)
            locks.release()
            manifests[s.name] = manifest
            tracker.log_metrics(child, {**metrics, "duration_s": dt})
            tracker.end(child)
            child = ""
            echo(f"[{s.name}] committed in {dt:.1f}s " + " ".join(f"{k}={_fmt(v)}" for k, v in list(metrics.items())[:8]))
        tracker.end(parent)
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        if child:
            tracker.end(child, status)
        tracker.end(parent, status)
        raise
    finally:
        locks.release()
        ray_.shutdown()
    return manifests


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
