"""Which stages run: each is `cached`, `stale` (with the config keys that changed) or `missing`.

`plan` labels each stage `cached` (a complete folder exists), `stale` (this
experiment committed the stage before, under another fingerprint: the reason
lists the config keys that changed) or `missing`, then selects what runs:
everything not cached by default; `--only S` runs S alone against cached
upstreams; `--from S` forces S and everything downstream; `--force S` forces S;
`--to S` leaves out every stage S does not need (e.g. train without evaluating).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pipeline.engine import run_pointer
from pipeline.engine.stage import Stage, fingerprint
from pipeline.engine.store import ArtifactStore
from pipeline.errors import WorkflowError
from pipeline.fingerprints import flatten
from pipeline.schema import Config


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


def _downstream(stages: list[Stage], cfg: Config, root: str) -> set[str]:
    out = {root}
    for s in stages:  # stages are in topological order
        if any(n in out for n in s.needs_for(cfg)):
            out.add(s.name)
    return out


def _upstream_of(stages: list[Stage], cfg: Config, target: str) -> set[str]:
    out = {target}
    for s in reversed(stages):  # stages are in topological order
        if s.name in out:
            out.update(s.needs_for(cfg))
    return out


def graph(cfg: Config, stages: list[Stage]) -> list[Stage]:
    """The stages this config runs (optional ones only when configured), each upstream checked to be one of them."""
    active = [s for s in stages if s.is_enabled(cfg)]
    names = {s.name for s in active}
    for s in active:
        for n in s.needs_for(cfg):
            if n not in names:
                raise WorkflowError(f"{s.name} needs stage {n}, which this config does not configure (add a `{n}:` section)")
    return active


def plan(
    cfg: Config,
    store: ArtifactStore,
    stages: list[Stage],
    *,
    only: str | None = None,
    from_stage: str | None = None,
    force: Iterable[str] = (),
    to: str | None = None,
) -> list[PlanItem]:
    active = graph(cfg, stages)
    names, active_names = [s.name for s in stages], [s.name for s in active]
    force = set(force)
    for flag, value in (("--only", only), ("--from", from_stage), ("--to", to), *(("--force", f) for f in force)):
        if value is not None and value not in names:
            raise WorkflowError(f"{flag} {value}: unknown stage (stages: {', '.join(names)})")
        if value is not None and value not in active_names:
            raise WorkflowError(f"{flag} {value}: this config does not configure that stage (add a `{value}:` section)")
    if to is not None:
        if only is not None:
            raise WorkflowError("--to and --only: give one of them")
        wanted = _upstream_of(active, cfg, to)
        for flag, value in (("--from", from_stage), *(("--force", f) for f in force)):
            if value is not None and value not in wanted:
                raise WorkflowError(f"{flag} {value}: not run with --to {to}, which needs only {', '.join(n for n in active_names if n in wanted)}")
        active = [s for s in active if s.name in wanted]
    stages = active
    last = run_pointer.last_fingerprints(store, cfg.experiment_name)
    items: dict[str, PlanItem] = {}
    for s in stages:
        section = s.section(cfg)
        upstream = {n: items[n].fingerprint for n in s.needs_for(cfg)}
        fp = fingerprint(s, section, upstream)
        item = PlanItem(s, fp, section, upstream, state="missing")
        if store.manifest(s.name, fp) is not None:
            item.state = "cached"
        elif (prev_fp := last.get(s.name)) and prev_fp != fp and (prev := store.manifest(s.name, prev_fp)):
            item.state = "stale"
            if prev.get("version") != s.version:
                item.reasons.append(f"version {prev.get('version')} -> {s.version}")
            item.reasons += _diff(prev.get("config", {}), section)
            item.reasons += [f"upstream {n} changed" for n in upstream if prev.get("upstream", {}).get(n) != upstream[n]]
        elif store.exists(s.name, fp):
            item.reasons.append("incomplete folder: " + ("will resume" if s.resumable else "will redo"))
        items[s.name] = item

    if only:
        for n in items[only].upstream:
            if items[n].state != "cached":
                raise WorkflowError(f"--only {only}: upstream stage {n} is {items[n].state}; run it first (e.g. `llmpipe run CONFIG --only {n}` or without --only)")
        items[only].run = items[only].forced = True
        return [items[only]]
    forced = set(force) | (_downstream(stages, cfg, from_stage) if from_stage else set())
    for it in items.values():
        it.forced = it.stage.name in forced
        it.run = it.forced or it.state != "cached"
    return list(items.values())
