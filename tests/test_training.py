"""Training at scale on real Ray Train + DeepSpeed (2 CPU workers): exact resume after a killed
worker, non-finite loss, fine-tuning from earlier weights, periodic validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline import cli
from tests.conftest import tiny_raw

pytestmark = pytest.mark.slow

TRAIN = {"steps": 6, "checkpoint_every": 3, "log_every": 1, "max_failures": 0, "eval_every": 3, "eval_tokens": 512}


def _config(tmp_path: Path, corpus: Path, name: str, **train) -> str:
    raw = tiny_raw(corpus, tmp_path / f"store-{name}", train={**TRAIN, **train})
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


@pytest.fixture(scope="module")
def reference(corpus_dir, tmp_path_factory, ray_local):
    """An uninterrupted 6-step run (its own MLflow store)."""
    import os

    tmp = tmp_path_factory.mktemp("reference")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        cfg = _config(tmp, corpus_dir, "reference")
        assert cli.main(["run", cfg, "--only", "tokenizer"]) == 0
        assert cli.main(["run", cfg, "--only", "prepare"]) == 0
        assert cli.main(["run", cfg, "--only", "train"]) == 0
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI") if old is None else os.environ.__setitem__("MLFLOW_TRACKING_URI", old)
    return {"cfg": cfg, "uri": uri, "losses": _history(uri, "reference", "train/loss"),
            "val": _history(uri, "reference", "train/val_loss"), "dir": _train_dir(cfg)}


def test_a_killed_worker_resumes_exactly(reference, corpus_dir, tmp_path, tracking_uri, monkeypatch):
    assert sorted(reference["losses"]) == [1, 2, 3, 4, 5, 6]
    assert sorted(reference["val"]) == [3, 6] and reference["val"][6] < reference["val"][3]
    monkeypatch.setenv("LLMPIPE_FAULTS", "train.step:3:exit")  # a worker process dies right after step 3's checkpoint
    monkeypatch.setenv("LLMPIPE_FAULTS_DIR", str(tmp_path))
    cfg = _config(tmp_path, corpus_dir, "killed", max_failures=1)
    assert cli.main(["run", cfg]) == 0
    assert (tmp_path / "llmpipe-fault-train.step-3").exists()  # the worker really died
    losses = _history(tracking_uri, "killed", "train/loss")
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
