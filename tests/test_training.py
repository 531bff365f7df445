"""Training at scale on real Ray Train + DeepSpeed (2 CPU workers): exact resume after a killed
worker (with and without dropout), a resume from the final checkpoint keeping the final metrics, non-finite loss,
fine-tuning from earlier weights, periodic validation."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline import cli
from tests.conftest import tiny_raw

pytestmark = pytest.mark.slow

TRAIN = {"steps": 6, "checkpoint_every": 3, "log_every": 1, "max_failures": 0, "eval_every": 3, "eval_tokens": 512}


def _config(tmp_path: Path, corpus: Path, name: str, model: dict | None = None, **train) -> str:
    raw = tiny_raw(corpus, tmp_path / f"store-{name}", train={**TRAIN, **train}, model=model or {})
    raw["name"] = name  # one MLflow experiment per run, so histories do not mix
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return str(p)


def _train_dir(cfg: str) -> Path:
    root = Path(yaml.safe_load(open(cfg))["store"]["root"]) / "train"
    (d,) = [p for p in root.iterdir() if (p / "_COMPLETE.json").exists()]
    return d


def _history(tracking_uri: str, experiment: str, key: str) -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri)
    (run,) = c.search_runs([c.get_experiment_by_name(experiment).experiment_id], filter_string="tags.stage = 'train'")
    return {m.step: m.value for m in c.get_metric_history(run.info.run_id, key)}


def _reference(corpus_dir: Path, tmp: Path, name: str, model: dict | None = None) -> dict:
    """An uninterrupted 6-step run (its own MLflow store)."""
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        cfg = _config(tmp, corpus_dir, name, model)
        assert cli.main(["run", cfg, "--only", "tokenizer"]) == 0
        assert cli.main(["run", cfg, "--only", "prepare"]) == 0
        assert cli.main(["run", cfg, "--only", "train"]) == 0
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI") if old is None else os.environ.__setitem__("MLFLOW_TRACKING_URI", old)
    return {"cfg": cfg, "uri": uri, "losses": _history(uri, name, "train/loss"),
            "val": _history(uri, name, "train/val_loss"), "dir": _train_dir(cfg)}


@pytest.fixture(scope="module")
def reference(corpus_dir, tmp_path_factory, ray_local):
    return _reference(corpus_dir, tmp_path_factory.mktemp("reference"), "reference")


@pytest.fixture(scope="module")
def reference_dropout(corpus_dir, tmp_path_factory, ray_local):
    return _reference(corpus_dir, tmp_path_factory.mktemp("reference-dropout"), "reference-dropout", {"dropout": 0.2})


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_a_killed_worker_resumes_exactly(dropout, request, corpus_dir, tmp_path, tracking_uri, monkeypatch):
    """With dropout the masks come from each rank's RNG, which must be checkpointed and restored too."""
    reference = request.getfixturevalue("reference_dropout" if dropout else "reference")
    assert sorted(reference["losses"]) == [1, 2, 3, 4, 5, 6]
    assert sorted(reference["val"]) == [3, 6] and reference["val"][6] < reference["val"][3]
    monkeypatch.setenv("LLMPIPE_FAULTS", "train.step:3:exit")  # a worker process dies right after step 3's checkpoint
    monkeypatch.setenv("LLMPIPE_FAULTS_DIR", str(tmp_path))
    name = f"killed-{dropout}"
    cfg = _config(tmp_path, corpus_dir, name, {"dropout": dropout}, max_failures=1)
    assert cli.main(["run", cfg]) == 0
    assert (tmp_path / "llmpipe-fault-train.step-3").exists()  # the worker really died
    losses = _history(tracking_uri, name, "train/loss")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    for step, value in reference["losses"].items():
        assert abs(losses[step] - value) <= 1e-6, f"step {step}: {losses[step]} vs {value}"
    a, b = load_file(str(reference["dir"] / "model.safetensors")), load_file(str(_train_dir(cfg) / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_non_finite_loss_stops_training_naming_the_step(corpus_dir, tmp_path, tracking_uri, monkeypatch, capsys, ray_local):
    monkeypatch.setenv("LLMPIPE_FAULTS", "train.nan:5:flag")
    monkeypatch.setenv("LLMPIPE_FAULTS_DIR", str(tmp_path))
    cfg = _config(tmp_path, corpus_dir, "nan")
    assert cli.main(["run", cfg]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "loss is nan at step 5" in last and "checkpoints up to step 3 are kept" in last
    root = Path(yaml.safe_load(open(cfg))["store"]["root"]) / "train"
    (folder,) = root.iterdir()
    assert not (folder / "_COMPLETE.json").exists()
    assert [p.name for p in sorted((folder / "ray_train").glob("step_*"))] == ["step_00000003"]


def test_fine_tuning_starts_from_earlier_weights_and_refuses_another_architecture(reference, corpus_dir, tmp_path,
                                                                                  tracking_uri, capsys, ray_local):
    cfg = _config(tmp_path, corpus_dir, "finetune", init_from=str(reference["dir"]), steps=2, warmup_steps=1,
                  checkpoint_every=2)
    assert cli.main(["run", cfg, "--only", "tokenizer"]) == 0
    assert cli.main(["run", cfg, "--only", "prepare"]) == 0
    assert cli.main(["run", cfg, "--only", "train"]) == 0
    first = _history(tracking_uri, "finetune", "train/loss")[1]
    assert first < reference["losses"][1] - 0.1  # starts where the reference run got to, not from scratch
    capsys.readouterr()
    assert cli.main(["run", cfg, "model.d_model=64", "--only", "train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "has another architecture (d_model: 32 there, 64 here;" in err


def test_resuming_from_the_final_checkpoint_keeps_the_final_metrics(reference, tmp_path, tracking_uri, ray_local):
    """A run killed after training finished but before the stage committed: the rerun resumes from the final
    checkpoint, trains nothing, and must still commit the final loss and learning rate of the run that trained."""
    raw = yaml.safe_load(Path(reference["cfg"]).read_text())
    shutil.copytree(raw["store"]["root"], tmp_path / "store")
    raw["store"]["root"] = str(tmp_path / "store")
    cfg = tmp_path / "resumed.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    committed = json.loads((reference["dir"] / "_COMPLETE.json").read_text())["metrics"]
    train_dir = tmp_path / "store" / "train" / reference["dir"].name
    (train_dir / "_COMPLETE.json").unlink()  # killed between the final checkpoint and the commit

    assert cli.main(["run", str(cfg)]) == 0  # not --only train: that forces a rebuild from scratch
    metrics = json.loads((train_dir / "_COMPLETE.json").read_text())["metrics"]
    assert committed["final_loss"] == reference["losses"][6]
    assert metrics["final_loss"] == committed["final_loss"] and metrics["final_lr"] == committed["final_lr"]
    state = json.loads((train_dir / "ray_train" / "step_00000006" / "train_state.json").read_text())
    assert state["metrics"]["train/loss"] == reference["losses"][6]  # the re-saved final checkpoint keeps them too
