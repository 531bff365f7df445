"""From what a user has at hand (a stage folder, an MLflow run id) to a trained model or an evaluation run.

The write side of MLflow is `pipeline.tracking.mlflow`; this is the read side, used by
`llmpipe generate`, `export-hf` and `compare`. A run id resolves through the tags
every stage child run carries (`stage`, `fingerprint`, `artifact_uri`): a train
run is its own folder; an evaluate or decode run names its train upstream in its
folder's `_COMPLETE.json`; a parent run (one `llmpipe run` invocation) leads to
its children through the `mlflow.parentRunId` tag. A folder resolves the same
way without MLflow. Anything that leads nowhere is a `TargetError` naming what
was tried, which the CLI prints as one line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pipeline.artifacts import model_dir_from_folder
from pipeline.errors import TargetError

_RUN_ID = re.compile(r"[0-9a-f]{32}")



def client(tracking_uri: str | None = None) -> Any:
    import mlflow
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri or mlflow.get_tracking_uri())


def get_run(run_id: str, *, tracking_uri: str | None = None) -> Any:
    from mlflow.exceptions import MlflowException

    if not _RUN_ID.fullmatch(run_id):
        raise TargetError(f"{run_id}: not an existing folder nor an MLflow run id (32 hex digits)")
    c = client(tracking_uri)
    try:
        return c.get_run(run_id)
    except MlflowException:
        raise TargetError(f"MLflow run {run_id} not found in {c.tracking_uri}") from None


def child_runs(parent: Any, *, stage: str | None = None, tracking_uri: str | None = None) -> list[Any]:
    """The child runs of a parent run (newest first), optionally only those of one stage."""
    filters = [f"tags.mlflow.parentRunId = '{parent.info.run_id}'"] + ([f"tags.stage = '{stage}'"] if stage else [])
    return list(client(tracking_uri).search_runs([parent.info.experiment_id], filter_string=" and ".join(filters),
                                                 order_by=["attributes.start_time DESC"]))


def stage_run(run_id: str, stage: str, *, tracking_uri: str | None = None) -> Any:
    """The run itself if it is a `stage` child run, else the `stage` child of a parent run."""
    run = get_run(run_id, tracking_uri=tracking_uri)
    have = run.data.tags.get("stage")
    if have == stage:
        return run
    if have is not None:
        raise TargetError(f"MLflow run {run_id} is a {have} stage run, not {stage}; give the {stage} run or its parent run")
    children = child_runs(run, stage=stage, tracking_uri=tracking_uri)
    if not children:
        raise TargetError(f"MLflow run {run_id} has no {stage} child run (was {stage} part of that invocation?)")
    return children[0]




def _model_dir_from_run(run: Any) -> Path:
    from pipeline.engine.store import ArtifactStore

    tags = run.data.tags
    uri, stage, fp = tags.get("artifact_uri"), tags.get("stage"), tags.get("fingerprint")
    if not (uri and stage and fp):
        raise TargetError(f"MLflow run {run.info.run_id} has no artifact_uri/stage/fingerprint tags "
                          "(not an llmpipe stage run)")
    store = ArtifactStore(uri.rsplit("/", 2)[0])  # artifact_uri = <store root>/<stage>/<fingerprint[:16]>
    if stage != "train":
        manifest = store.manifest(stage, fp)
        fp = (manifest or {}).get("upstream", {}).get("train")
        if not fp:
            raise TargetError(f"MLflow run {run.info.run_id} ({stage}): {uri} is not committed or has no train upstream")
    if store.manifest("train", fp) is None:
        raise TargetError(f"MLflow run {run.info.run_id}: the train stage folder {store.stage_uri('train', fp)} "
                          "is missing or incomplete")
    return store.local_dir("train", fp)


def resolve_model_dir(target: str, *, tracking_uri: str | None = None) -> Path:
    """The local train folder (model.safetensors, model.json, tokenizer.json) that `target` leads to:
    a stage folder, or the id of a train/evaluate/decode child run or of a parent run."""
    path = Path(target).expanduser()
    if path.is_dir():
        return model_dir_from_folder(path)
    if path.exists():
        raise TargetError(f"{target}: is a file; give a stage folder or an MLflow run id")
    run = get_run(target, tracking_uri=tracking_uri)
    if "stage" not in run.data.tags:  # a parent run: its train child
        run = stage_run(target, "train", tracking_uri=tracking_uri)
    return _model_dir_from_run(run)
