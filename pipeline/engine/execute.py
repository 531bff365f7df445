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
from collections.abc import Callable
from typing import Any

from pipeline import faults
from pipeline.cluster.runtime import RayRuntime
from pipeline.config import Config, flatten
from pipeline.engine.locks import StageLocks
from pipeline.engine.plan import PlanItem
from pipeline.engine.stage import Stage, StageContext, Upstream
from pipeline.engine.store import ArtifactStore
from pipeline.errors import WorkflowError
from pipeline.tracking.mlflow import NullTracker, Tracker, git_commit, tracking_uri

log = logging.getLogger(__name__)


def _tracker(cfg: Config) -> Tracker | NullTracker:
    return Tracker(cfg.experiment_name) if cfg.tracking.enabled else NullTracker()


def execute(cfg: Config, items: list[PlanItem], stages: list[Stage], *, echo: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Run the selected items in order; returns {stage: manifest} for every item."""
    from pipeline.cluster.preflight import is_local_tracking_uri, preflight
    from pipeline.cluster.runtime import submission_id

    store = ArtifactStore(cfg.store.root)
    uri = tracking_uri() if cfg.tracking.enabled else None
    # An unreachable tracking server fails here, before anything is written or Ray starts; a local store (SQLite,
    # files) is opened only after the cluster check, which refuses it on a multi-node cluster before it is created.
    tracker = None if uri and is_local_tracking_uri(uri) else _tracker(cfg)
    locks = StageLocks(store, echo)  # one builder per stage folder across invocations (see pipeline.locks)
    ray_ = RayRuntime()
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
