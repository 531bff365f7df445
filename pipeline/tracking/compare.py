"""`llmpipe compare`: the evaluation metrics of several runs side by side, as one text table.

Each given run is an evaluate child run or a parent run (one `llmpipe run`
invocation) whose evaluate child is found by its `mlflow.parentRunId` tag; with
`--experiment` every distinct evaluation of an experiment (the newest run of each
evaluate fingerprint) is compared. The header rows are the config keys whose
values differ between the runs' parent runs (e.g. `model.pos_encoding` in the
positional-encoding ablation), so the columns say what was changed. Metric rows
come in a fixed order, the headline metrics first, then each length sweep by
context; a metric a run does not have (a length a learned table refuses) is `-`.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

from pipeline.errors import TargetError
from pipeline.tracking.lookup import client, get_run, stage_run

HEADLINE = ["val_loss", "val_ppl", "val_bpb", "val_token_accuracy", "unigram_loss", "unigram_ppl", "val_tokens"]
_SWEEP = re.compile(r"(ppl|loss|bpb)_ctx_(\d+)(?:_(\w+))?")
_KINDS = {"ppl": 0, "loss": 1, "bpb": 2}
_SCALINGS = {None: 0, "linear": 1, "ntk": 2, "yarn": 3}
HIDDEN = ("duration_s", "pos_loss_ctx_*")  # per-stage timing; step series (their last point only)


def _order(name: str) -> tuple:
    if name in HEADLINE:
        return (0, HEADLINE.index(name))
    if m := _SWEEP.fullmatch(name):
        return (1, _KINDS[m[1]], _SCALINGS.get(m[3], 9), m[3] or "", int(m[2]))
    return (2, name)


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
    names = sorted({k for r in runs for k in r.data.metrics
                    if not any(fnmatch.fnmatch(k, h) for h in HIDDEN)
                    and (not metrics or any(fnmatch.fnmatch(k, m) for m in metrics))}, key=_order)
    rows = [["run", *(r.info.run_id[:8] for r in runs)]]
    rows += [[k, *vals] for k, vals in _differing_params(runs, tracking_uri=tracking_uri).items()]
    rows += [[k, *(_fmt(r.data.metrics.get(k)) for r in runs)] for k in names]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    return "\n".join(lines)
