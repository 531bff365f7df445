"""Running a plan: services opened once, each selected stage built and committed before the next.

`execute` opens what an invocation needs (the MLflow tracker, the stage locks,
Ray only if a selected stage uses it, the cluster pre-flight) and closes it all
at the end whatever happens; a cached stage is replayed as an MLflow child run
tagged `cache: hit`; a stage that runs gets its upstreams, a working folder and a
child run, and is committed (`_COMPLETE.json` last) before the next one starts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pipeline import faults
from pipeline.cluster.preflight import is_local_tracking_uri, preflight
from pipeline.cluster.runtime import RayRuntime, submission_id
from pipeline.engine.locks import StageLocks
from pipeline.engine.plan import PlanItem
from pipeline.engine.stage import Stage, StageContext, Upstream
from pipeline.engine.store import ArtifactStore
from pipeline.errors import WorkflowError
from pipeline.schema import Config, flatten
from pipeline.tracking.mlflow import NullTracker, Tracker, git_commit, tracking_uri

log = logging.getLogger(__name__)
Echo = Callable[[str], None]


@dataclass
class Services:
    """What one invocation opens once and every stage shares."""

    store: ArtifactStore
    tracker: Tracker | NullTracker
    locks: StageLocks
    ray: RayRuntime
    commit: str | None  # the git commit of the code that runs
    tags: dict[str, str]  # tags of every run of this invocation
    echo: Echo


def _tracker(cfg: Config) -> Tracker | NullTracker:
    return Tracker(cfg.experiment_name) if cfg.tracking.enabled else NullTracker()


@contextmanager
def services(cfg: Config, items: list[PlanItem], echo: Echo) -> Iterator[Services]:
    """Open the store, MLflow, the stage locks and (when a selected stage needs it) Ray with the cluster
    pre-flight, in the order that makes a refusal cheap; close them all whatever happens."""
    store = ArtifactStore(cfg.store.root)
    uri = tracking_uri() if cfg.tracking.enabled else None
    # An unreachable tracking server fails here, before anything is written or Ray starts; a local store (SQLite,
    # files) is opened only after the cluster check, which refuses it on a multi-node cluster before it is created.
    tracker = None if uri and is_local_tracking_uri(uri) else _tracker(cfg)
    locks = StageLocks(store, echo)  # one builder per stage folder across invocations (see pipeline.engine.locks)
    ray = RayRuntime()
    try:
        if any(it.run and it.stage.uses_ray for it in items):  # before any work: can every node share store and tracking?
            ray.ensure()
            preflight(cfg, store, uri, inputs=any(it.run and it.stage.reads_inputs for it in items))
        commit, job = git_commit(), submission_id()
        tags = {"llmpipe.config": cfg.name, **({"mlflow.source.git.commit": commit} if commit else {}),
                **({"ray.job_submission_id": job} if job else {})}
        yield Services(store, tracker or _tracker(cfg), locks, ray, commit, tags, echo)
    finally:
        locks.release()
        ray.shutdown()


def execute(cfg: Config, items: list[PlanItem], stages: list[Stage], *, echo: Echo = print) -> dict[str, dict[str, Any]]:
    """Run the selected items in order; returns {stage: manifest} for every item."""
    with services(cfg, items, echo) as sv:
        ran = [it.stage.name for it in items if it.run]
        run_name = f"{cfg.name}: {', '.join(ran) if ran else 'all cached'}"  # tells invocations apart in the runs list
        parent = sv.tracker.start_parent(run_name, flatten(cfg.model_dump(mode="json")), sv.tags)
        if parent:
            echo(f"MLflow: experiment {cfg.experiment_name!r}, parent run {parent} ({sv.tracker.tracking_uri})")
        manifests: dict[str, dict[str, Any]] = {}
        child = ""
        try:
            for it in items:
                # the lock is held until the stage is committed; claim() says when another run committed it meanwhile
                if not it.run or sv.locks.claim(it.stage.name, it.fingerprint, forced=it.forced):
                    manifests[it.stage.name] = _replay_cached(cfg, it, sv)
                    continue
                child = sv.tracker.start_child(it.stage.name, _params(cfg, it), {**_tags(it, sv), "cache": "miss"})
                manifests[it.stage.name] = _run_stage(cfg, it, child, sv)
                child = ""
            sv.tracker.end(parent)
        except BaseException as e:
            status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
            if child:
                sv.tracker.end(child, status)
            sv.tracker.end(parent, status)
            raise
    return manifests


def _params(cfg: Config, it: PlanItem) -> dict[str, Any]:
    return flatten((it.stage.params or it.stage.section)(cfg))


def _tags(it: PlanItem, sv: Services) -> dict[str, str]:
    return {**sv.tags, "fingerprint": it.fingerprint, "artifact_uri": sv.store.stage_uri(it.stage.name, it.fingerprint)}


def _replay_cached(cfg: Config, it: PlanItem, sv: Services) -> dict[str, Any]:
    """A cached stage still gets a child run: tagged `cache: hit`, with the metrics and the id of the run that built it."""
    name = it.stage.name
    m = sv.store.manifest(name, it.fingerprint)
    assert m is not None, f"{name} planned as cached but has no manifest"
    child = sv.tracker.start_child(name, _params(cfg, it), {**_tags(it, sv), "cache": "hit",
                                                            "source_run_id": m.get("mlflow_run_id") or ""})
    sv.tracker.log_metrics(child, m.get("metrics", {}))
    sv.tracker.end(child)
    sv.echo(f"[{name}] cached {it.fingerprint[:16]}")
    return m


def _upstreams(it: PlanItem, store: ArtifactStore) -> dict[str, Upstream]:
    """The committed upstreams, each pinned to the commit read here (leased locally, for this driver's life): every
    task of the stage reads those files even if another invocation rebuilds an upstream meanwhile."""
    inputs = {}
    for n, up in it.upstream.items():
        commit = store.open(n, up)
        if commit is None:
            raise WorkflowError(f"{it.stage.name}: upstream {n} ({up[:16]}) is not committed")
        inputs[n] = Upstream(n, up, store.ref(n, up, commit), commit.manifest)
    return inputs


def _run_stage(cfg: Config, it: PlanItem, child: str, sv: Services) -> dict[str, Any]:
    """Build one stage in its working folder and commit it (`_COMPLETE.json` last); returns its manifest."""
    s, store = it.stage, sv.store
    if s.uses_ray:
        sv.ray.ensure()
    inputs = _upstreams(it, store)
    # a forced rebuild of a committed folder writes a new generation beside it (see pipeline.engine.generations)
    workdir = store.working_dir(s.name, it.fingerprint, keep_partial=s.resumable and not it.forced)
    uri = store.stage_uri(s.name, it.fingerprint)
    ctx = StageContext(cfg, s.name, it.fingerprint, it.section, workdir, store.output_uri(s.name, it.fingerprint, workdir),
                       inputs, sv.tracker, child, store.output_ref(s.name, it.fingerprint, workdir))
    sv.echo(f"[{s.name}] running {it.fingerprint[:16]} -> {uri}")
    t0 = time.time()
    faults.maybe_fail("stage", s.name)  # drills and tests: LLMPIPE_FAULTS=stage:<name>:pause|exit|raise
    metrics = s.run(ctx) or {}
    dt = time.time() - t0
    manifest = store.commit(s.name, it.fingerprint, workdir, {
        "stage": s.name, "version": s.version, "config": it.section, "upstream": it.upstream,
        "metrics": metrics, "started_at": t0, "duration_s": dt, "mlflow_run_id": sv.tracker.mlflow_id(child),
        "git_commit": sv.commit,
    })
    store.remember(cfg.experiment_name, s.name, it.fingerprint)
    sv.locks.release()
    sv.tracker.log_metrics(child, {**metrics, "duration_s": dt})
    sv.tracker.end(child)
    sv.echo(f"[{s.name}] committed in {dt:.1f}s " + " ".join(f"{k}={_fmt(v)}" for k, v in list(metrics.items())[:8]))
    return manifest


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
