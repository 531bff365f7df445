"""`llmpipe compare`: the evaluation metrics of several runs side by side, as one text table.

Each given run is an evaluate child run or a parent run (one `llmpipe run`
invocation) whose evaluate child is found by its `mlflow.parentRunId` tag; with
`--experiment` every distinct evaluation of an experiment (the newest run of each
evaluate fingerprint) is compared. The header rows are the config keys whose
values differ between the runs' parent runs (e.g. `model.pos_encoding` in the
positional-encoding ablation), so the columns say what was changed. Metric rows
come in a fixed order, the headline metrics first, then each length sweep by
context; a metric a run does not have (a length a learned table refuses) is `-`.
When the invocation also ran the `tasks` stage, its task accuracies
(`tasks/<name>/acc`, `acc_norm`, `chance`, ...; found as the evaluate run's
sibling under the same parent run) follow the headline metrics.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

from pipeline.errors import TargetError
from pipeline.tracking.lookup import child_runs, client, get_run, stage_run

HEADLINE = ["val_loss", "val_ppl", "val_bpb", "val_token_accuracy", "unigram_loss", "unigram_ppl", "val_tokens"]
_SWEEP = re.compile(r"(ppl|loss|bpb)_ctx_(\d+)(?:_(\w+))?")
_KINDS = {"ppl": 0, "loss": 1, "bpb": 2}
_SCALINGS = {None: 0, "linear": 1, "ntk": 2, "yarn": 3}
HIDDEN = ("duration_s", "pos_loss_ctx_*")  # per-stage timing; step series (their last point only)


_TASK = re.compile(r"tasks/(.+)/(\w+)")
_TASK_METRICS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "chance", "ppl", "n")


def _order(name: str) -> tuple:
    if name in HEADLINE:
        return (0, HEADLINE.index(name))
    if m := _TASK.fullmatch(name):
        return (1, m[1], _TASK_METRICS.index(m[2]) if m[2] in _TASK_METRICS else 9, m[2])
    if m := _SWEEP.fullmatch(name):
        return (2, _KINDS[m[1]], _SCALINGS.get(m[3], 9), m[3] or "", int(m[2]))
    return (3, name)


def task_metrics(run: Any, *, tracking_uri: str | None = None) -> dict[str, float]:
    """The metrics of the `tasks` run beside an evaluate run (same parent run), or {} when there is none."""
    parent = run.data.tags.get("mlflow.parentRunId")
    if not parent:
        return {}
    children = child_runs(get_run(parent, tracking_uri=tracking_uri), stage="tasks", tracking_uri=tracking_uri)
    return {k: v for k, v in children[0].data.metrics.items() if k.startswith("tasks/")} if children else {}


def evaluate_runs(run_ids: list[str], *, tracking_uri: str | None = None) -> list[Any]:
    return [stage_run(r, "evaluate", tracking_uri=tracking_uri) for r in run_ids]


def experiment_evaluate_runs(experiment: str, *, tracking_uri: str | None = None) -> list[Any]:
    """The newest finished evaluate run of each distinct evaluate fingerprint in an experiment, oldest first."""
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise TargetError(f"no MLflow experiment named {experiment!r} in {c.tracking_uri}")
    runs = c.search_runs([exp.experiment_id], filter_string="tags.stage = 'evaluate' and attributes.status = 'FINISHED'",
                         order_by=["attributes.start_time DESC"])
    newest: dict[str, Any] = {}
    for r in runs:
        newest.setdefault(r.data.tags.get("fingerprint", r.info.run_id), r)
    if not newest:
        raise TargetError(f"experiment {experiment!r} has no finished evaluate run")
    return sorted(newest.values(), key=lambda r: r.info.start_time)


def _differing_params(runs: list[Any], *, tracking_uri: str | None) -> dict[str, list[str]]:
    """Config keys whose values differ between the runs' parents (the full config is logged on the parent)."""
    params = []
    for r in runs:
        parent = r.data.tags.get("mlflow.parentRunId")
        params.append(get_run(parent, tracking_uri=tracking_uri).data.params if parent else r.data.params)
    keys = sorted({k for p in params for k in p})
    short = [{k: v if len(v) <= 40 else v[:37] + "..." for k, v in p.items()} for p in params]
    return {k: [p.get(k, "-") for p in short] for k in keys if len({p.get(k, "-") for p in short}) > 1}


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def comparison_table(runs: list[Any], *, metrics: list[str] | None = None, tracking_uri: str | None = None) -> str:
    """Rows: differing config keys, then metrics; one column per run (headed by the run id's first 8 digits)."""
    values = [{**r.data.metrics, **task_metrics(r, tracking_uri=tracking_uri)} for r in runs]
    names = sorted({k for v in values for k in v
                    if not any(fnmatch.fnmatch(k, h) for h in HIDDEN)
                    and (not metrics or any(fnmatch.fnmatch(k, m) for m in metrics))}, key=_order)
    rows = [["run", *(r.info.run_id[:8] for r in runs)]]
    rows += [[k, *vals] for k, vals in _differing_params(runs, tracking_uri=tracking_uri).items()]
    rows += [[k, *(_fmt(v.get(k)) for v in values)] for k in names]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    return "\n".join(lines)
