"""Running a plan: services opened once, each selected stage built and committed before the next.

`execute` opens what an invocation needs (the MLflow tracker, the stage locks,
Ray only if a selected stage uses it, the cluster pre-flight) and closes it all
at the end whatever happens; a cached stage is replayed as an MLflow child run
tagged `cache: hit`; a stage that runs gets its upstreams, a working folder and a
child run, and is committed (`_COMPLETE.json` last) before the next one starts.

What the user sees goes through an `Output` (`pipeline.terminal`): a line per
stage, the running stage's live progress (`ctx.progress`) and, for `llmpipe
run`, what the libraries print in the stage's log file. Every child run, ran or
cached, also gets its upstream stages as MLflow dataset inputs and a
description, the parent run a summary (`pipeline.engine.notes`).
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
from pipeline.engine import notes, run_pointer
from pipeline.engine.locks import StageLocks
from pipeline.engine.plan import PlanItem
from pipeline.engine.stage import Stage, StageContext, Upstream
from pipeline.engine.store import ArtifactStore
from pipeline.errors import WorkflowError
from pipeline.fingerprints import flatten
from pipeline.schema import Config
from pipeline.terminal import Output
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
    out: Output  # the terminal: lines, a progress and a log file per stage

    def echo(self, text: str) -> None:
        self.out.line(text)


def _tracker(cfg: Config) -> Tracker | NullTracker:
    return Tracker(cfg.experiment_name) if cfg.tracking.enabled else NullTracker()


@contextmanager
def services(cfg: Config, items: list[PlanItem], out: Output) -> Iterator[Services]:
    """Open the store, MLflow, the stage locks and (when a selected stage needs it) Ray with the cluster
    pre-flight, in the order that makes a refusal cheap; close them all whatever happens."""
    store = ArtifactStore(cfg.store.root)
    uri = tracking_uri() if cfg.tracking.enabled else None
    # An unreachable tracking server fails here, before anything is written or Ray starts; a local store (SQLite,
    # files) is opened only after the cluster check, which refuses it on a multi-node cluster before it is created.
    tracker = None if uri and is_local_tracking_uri(uri) else _tracker(cfg)
    out.capture_logs()  # library output into the run's log folder from here on: the first write into the store
    locks = StageLocks(store, out.line)  # one builder per stage folder across invocations (see pipeline.engine.locks)
    ray = RayRuntime()
    try:
        if any(it.run and it.stage.uses_ray for it in items):  # before any work: can every node share store and tracking?
            ray.ensure()
            preflight(cfg, store, uri, inputs=any(it.run and it.stage.reads_inputs for it in items))
        commit, job = git_commit(), submission_id()
        tags = {"llmpipe.config": cfg.name, **({"mlflow.source.git.commit": commit} if commit else {}),
                **({"ray.job_submission_id": job} if job else {})}
        yield Services(store, tracker or _tracker(cfg), locks, ray, commit, tags, out)
    finally:
        locks.release()
        ray.shutdown()


def execute(cfg: Config, items: list[PlanItem], stages: list[Stage], *, echo: Echo = print,
            output: Output | None = None) -> dict[str, dict[str, Any]]:
    """Run the selected items in order; returns {stage: manifest} for every item. `output` is the terminal
    (`llmpipe run`'s, with a live progress and log files); without one, lines go to `echo` and library output
    stays where it is."""
    if output is None:
        with Output(echo=echo) as out:
            return execute(cfg, items, stages, output=out)
    with services(cfg, items, output) as sv:
        ran = [it.stage.name for it in items if it.run]
        run_name = f"{cfg.name}: {', '.join(ran) if ran else 'all cached'}"  # tells invocations apart in the runs list
        parent = sv.tracker.start_parent(run_name, flatten(cfg.model_dump(mode="json")), sv.tags)
        if parent:
            sv.echo(f"MLflow: experiment {cfg.experiment_name!r}, parent run {parent} ({sv.tracker.tracking_uri})")
        manifests: dict[str, dict[str, Any]] = {}
        summary: list[str] = []  # the parent run's description, a line per stage
        child = ""
        try:
            for it in items:
                # the lock is held until the stage is committed; claim() says when another run committed it meanwhile
                if not it.run or sv.locks.claim(it.stage.name, it.fingerprint, forced=it.forced):
                    m = manifests[it.stage.name] = _replay_cached(cfg, it, sv)
                    summary.append(notes.stage_line(it.stage.name, m.get("metrics", {}), duration_s=None))
                    continue
                child = sv.tracker.start_child(it.stage.name, _params(cfg, it), {**_tags(it, sv), "cache": "miss"})
                m = manifests[it.stage.name] = _run_stage(cfg, it, child, sv)
                summary.append(notes.stage_line(it.stage.name, m.get("metrics", {}), duration_s=m.get("duration_s")))
                child = ""
            sv.tracker.set_tags(parent, {notes.NOTE_TAG: notes.parent_note(
                cfg.name, store=sv.store.uri, stages=summary, log_dir=sv.out.log_dir, commit=sv.commit)})
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
    """A cached stage still gets a child run: tagged `cache: hit`, with the metrics, the inputs and the id of the run
    that built it."""
    name = it.stage.name
    m = sv.store.manifest(name, it.fingerprint)
    assert m is not None, f"{name} planned as cached but has no manifest"
    source = m.get("mlflow_run_id") or ""
    child = sv.tracker.start_child(name, _params(cfg, it), {**_tags(it, sv), "cache": "hit", "source_run_id": source})
    sv.tracker.log_metrics(child, m.get("metrics", {}))
    upstreams = {n: (up, um) for n, up in it.upstream.items() if (um := sv.store.manifest(n, up)) is not None}
    _describe(child, it, upstreams, m.get("metrics", {}), sv, source_run=source)
    sv.tracker.end(child)
    sv.echo(f"[{name}] cached {it.fingerprint[:16]}")
    return m


def _describe(child: str, it: PlanItem, upstreams: dict[str, tuple[str, dict[str, Any]]], metrics: dict[str, Any],
              sv: Services, *, duration_s: float | None = None, source_run: str | None = None) -> None:
    """The child run's dataset inputs (its upstream stages: {name: (fingerprint, manifest)}) and its description."""
    s, uri = it.stage, sv.store.stage_uri(it.stage.name, it.fingerprint)
    sv.tracker.log_inputs(child, notes.datasets(upstreams, s.input_context, sv.store.stage_uri, first=s.main_input))
    log = sv.out.log_dir / f"{s.name}.log" if sv.out.log_dir and duration_s is not None else None
    sv.tracker.set_tags(child, {notes.NOTE_TAG: notes.stage_note(
        s.name, fingerprint=it.fingerprint, uri=uri, metrics=metrics, upstreams=upstreams, duration_s=duration_s,
        log=log, source_run=source_run)})


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
    uri = store.stage_uri(s.name, it.fingerprint)
    sv.echo(f"[{s.name}] running {it.fingerprint[:16]} -> {uri}")
    with sv.out.stage(s.name) as progress:  # library output into the stage's log, a live progress on the terminal
        if s.uses_ray:
            sv.ray.ensure()
        inputs = _upstreams(it, store)
        # a forced rebuild of a committed folder writes a new generation beside it (see pipeline.engine.generations)
        workdir = store.working_dir(s.name, it.fingerprint, keep_partial=s.resumable and not it.forced)
        ctx = StageContext(cfg, s.name, it.fingerprint, it.section, workdir, store.output_uri(s.name, it.fingerprint, workdir),
                           inputs, sv.tracker, child, store.output_ref(s.name, it.fingerprint, workdir), progress)
        t0 = time.time()
        faults.maybe_fail("stage", s.name)  # drills and tests: LLMPIPE_FAULTS=stage:<name>:pause|exit|raise
        metrics = s.run(ctx) or {}
        dt = time.time() - t0
        manifest = store.commit(s.name, it.fingerprint, workdir, {
            "stage": s.name, "version": s.version, "config": it.section, "upstream": it.upstream,
            "metrics": metrics, "started_at": t0, "duration_s": dt, "mlflow_run_id": sv.tracker.mlflow_id(child),
            "git_commit": sv.commit,
        })
        run_pointer.remember(store, cfg.experiment_name, s.name, it.fingerprint)
        sv.locks.release()
        sv.tracker.log_metrics(child, {**metrics, "duration_s": dt})
        _describe(child, it, {n: (u.fingerprint, u.manifest) for n, u in inputs.items()}, metrics, sv, duration_s=dt)
        sv.tracker.end(child)
    sv.echo(f"[{s.name}] committed in {dt:.1f}s " + " ".join(f"{k}={_fmt(v)}" for k, v in list(metrics.items())[:8]))
    return manifest


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
