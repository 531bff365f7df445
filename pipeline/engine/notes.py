"""What MLflow shows about a stage besides params and metrics: its inputs as datasets, and a short description.

Each child run lists the upstream stages it read as MLflow dataset inputs (the UI's *Datasets* column): the
upstream's name, its fingerprint (the folder name) as digest, its folder as source and its committed metrics
(documents, tokens, shards, ...) as profile, with the reading stage's `input_context` ("training",
"evaluation", ...); its `main_input` (the upstream it reads as data) first, which the runs table shows. Its description (`mlflow.note.content`, the run page's *Description*) says in markdown
what ran, its key numbers and where its folder and log are; the parent run's lists every stage of the
invocation. Plain functions of what the engine already knows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

NOTE_TAG = "mlflow.note.content"
KEY_METRICS = 8  # as many as the `[stage] committed` line shows


Upstreams = dict[str, tuple[str, dict[str, Any]]]  # an upstream stage -> (its fingerprint, its manifest)


def datasets(upstreams: Upstreams, context: str, stage_uri: Any, *, first: str | None = None) -> list[dict[str, Any]]:
    """One dataset input per upstream stage (`stage_uri(name, fingerprint)` gives its folder), `first` first: the
    runs table shows the first one and counts the others."""
    ordered = sorted(upstreams.items(), key=lambda item: item[0] != first)
    return [{"name": name, "digest": fp[:16], "source": stage_uri(name, fp), "profile": _numbers(m.get("metrics", {})),
             "context": context} for name, (fp, m) in ordered]


def _numbers(metrics: dict[str, Any]) -> dict[str, int | float]:
    return {k: int(v) if float(v).is_integer() else v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _numbers_line(metrics: dict[str, Any]) -> str:
    shown = list(_numbers(metrics).items())[:KEY_METRICS]
    return ", ".join(f"{k} {_fmt(v)}" for k, v in shown) if shown else "no metrics"


def _inputs_line(upstreams: Upstreams) -> str:
    return ", ".join(f"{name} `{fp[:16]}`" for name, (fp, _) in upstreams.items()) or "none (the raw inputs)"


def stage_note(stage: str, *, fingerprint: str, uri: str, metrics: dict[str, Any], upstreams: Upstreams,
               duration_s: float | None = None, log: Path | None = None, source_run: str | None = None) -> str:
    """A ran stage (`duration_s`) or a cached one (`source_run`: the run that built it)."""
    head = (f"**{stage}** ran in {duration_s:.1f} s" if duration_s is not None
            else f"**{stage}** was cached: reused, not rerun" + (f" (built by run `{source_run}`)" if source_run else ""))
    lines = [f"{head}: {_numbers_line(metrics)}.", "", f"- folder: `{uri}` (fingerprint `{fingerprint[:16]}`)",
             f"- inputs: {_inputs_line(upstreams)}"]
    if log:
        lines.append(f"- log: `{log}`")
    return "\n".join(lines)


def parent_note(config: str, *, store: str, stages: list[str], log_dir: Path | None = None,
                commit: str | None = None) -> str:
    """The invocation: one line per stage (as `stage_line` made them), the store, the logs, the code."""
    lines = [f"`llmpipe run` of **{config}**", "", *(f"- {s}" for s in stages), "", f"store: `{store}`"]
    if log_dir:
        lines.append(f"logs: `{log_dir}`")
    if commit:
        lines.append(f"git commit: `{commit}`")
    return "\n".join(lines)


def stage_line(stage: str, metrics: dict[str, Any], *, duration_s: float | None) -> str:
    how = f"ran in {duration_s:.1f} s" if duration_s is not None else "cached"
    return f"**{stage}** {how}: {_numbers_line(metrics)}"
