"""The whole pipeline through the CLI on real Ray, DeepSpeed (2 CPU workers, gloo) and MLflow (temp SQLite)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import cli
from tests.conftest import tiny_raw

pytestmark = pytest.mark.slow


@pytest.fixture
def config_file(corpus_dir, tmp_path):
    def make(**sections):
        p = tmp_path / "tiny.yaml"
        p.write_text(yaml.safe_dump(tiny_raw(corpus_dir, tmp_path / "artifacts", **sections)))
        return str(p)
    return make


def _ran(out: str) -> list[str]:
    return [line.split("]")[0][1:] for line in out.splitlines() if "] running " in line]


def _children(client, parent_id: str):
    from mlflow.entities import ViewType

    return client.search_runs(
        [client.get_run(parent_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", run_view_type=ViewType.ALL)


def _parents(client, experiment_id: str):
    return [r for r in client.search_runs([experiment_id]) if "mlflow.parentRunId" not in r.data.tags]


def test_demo_flow_trains_caches_reruns_single_stages_and_tracks(ray_local, tracking_uri, config_file, capsys):
    from mlflow.tracking import MlflowClient

    cfg = config_file(train={"zero_stage": 1})  # ZeRO-1 here, ZeRO-3 below, the default 2 in tests/test_training.py
    assert cli.main(["run", cfg]) == 0
    out = capsys.readouterr().out
    assert _ran(out) == ["tokenizer", "prepare", "train", "evaluate", "decode"]

    # the committed outputs
    root = Path(yaml.safe_load(open(cfg))["store"]["root"])
    train_dirs = list((root / "train").iterdir())
    assert len(train_dirs) == 1 and (train_dirs[0] / "model.safetensors").is_file() and (train_dirs[0] / "_COMPLETE.json").is_file()
    assert json.loads((train_dirs[0] / "train_state.json").read_text())["step"] == 6
    ev = json.loads(next((root / "evaluate").glob("*/eval.json")).read_text())
    m = ev["metrics"]
    assert m["val_loss"] < math.log(300) and m["val_bpb"] > 0 and set(m) >= {"ppl_ctx_16", "ppl_ctx_32", "unigram_loss"}
    assert {"multiplier": 2.0, "context": 64, "supported": False} in ev["lengths"]  # learned positions cannot go past 32

    # MLflow: one parent, five children, the loss curve from rank 0, the samples table
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("tiny")
    (parent,) = _parents(client, exp.experiment_id)
    children = {r.data.tags["stage"]: r for r in _children(client, parent.info.run_id)}
    assert set(children) == {"tokenizer", "prepare", "train", "evaluate", "decode"}
    assert all(r.info.status == "FINISHED" and len(r.data.tags["fingerprint"]) == 64 for r in children.values())
    losses = client.get_metric_history(children["train"].info.run_id, "train/loss")
    assert sorted(x.step for x in losses) == [1, 2, 3, 4, 5, 6]
    assert children["train"].data.params["train.zero_stage"] == "1"
    assert "val_bpb" in children["evaluate"].data.metrics
    artifacts = {a.path for a in client.list_artifacts(children["decode"].info.run_id)}
    assert "samples.json" in artifacts
    table = json.loads(open(client.download_artifacts(children["decode"].info.run_id, "samples.json")).read())
    assert {"prompt", "completion", "temperature"} <= set(table["columns"]) and len(table["data"]) == 2

    # second run, in a fresh process: every stage cached and Ray never even imported (so no Ray work)
    probe = ("import sys; from pipeline import cli; rc = cli.main(['run', sys.argv[1]]); "
             "print('RAY_IMPORTED', 'ray' in sys.modules); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", probe, cfg], capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _ran(proc.stdout) == [] and "nothing to run" in proc.stdout and "RAY_IMPORTED False" in proc.stdout
    newest = max(_parents(client, exp.experiment_id), key=lambda r: r.info.start_time)
    hits = _children(client, newest.info.run_id)
    assert len(hits) == 5 and all(r.data.tags["cache"] == "hit" for r in hits)

    # changing only decode.temperature reruns only decode
    assert cli.main(["run", cfg, "decode.temperature=0.3"]) == 0
    assert _ran(capsys.readouterr().out) == ["decode"]

    # --only evaluate reruns evaluate alone
    assert cli.main(["run", cfg, "--only", "evaluate"]) == 0
    assert _ran(capsys.readouterr().out) == ["evaluate"]

    # status reflects it all
    assert cli.main(["status", cfg, "train.lr=5e-4"]) == 0
    status = capsys.readouterr().out
    assert "train      stale (train.lr: 0.001 -> 0.0005)" in status and "tokenizer  cached" in status


LLAMA_STYLE = {"pos_encoding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 1, "tie_embeddings": False, "bias": False}


@pytest.mark.parametrize("zero_stage,model", [(3, LLAMA_STYLE)], ids=["zero3-llama"])  # ZeRO-1: the demo flow
def test_two_worker_deepspeed_training_on_cpu_for_zero_stage(ray_local, tracking_uri, config_file, capsys, zero_stage, model):
    from model import load_model

    cfg = config_file(train={"zero_stage": zero_stage, "steps": 4, "checkpoint_every": 2}, model=model)
    assert cli.main(["run", cfg, "--dry-run"]) == 0
    assert _ran(capsys.readouterr().out) == []
    assert cli.main(["run", cfg]) == 0
    out = capsys.readouterr().out
    assert "[train] committed" in out
    root = Path(yaml.safe_load(open(cfg))["store"]["root"])
    (train_dir,) = (root / "train").iterdir()
    loaded, meta = load_model(train_dir)
    assert meta["step"] == 4 and loaded.num_params > 0
    assert all(getattr(loaded.config, k) == v for k, v in model.items())  # the architecture asked for is the one trained
    losses = [json.loads((d / "train_state.json").read_text())["metrics"]["train/loss"]
              for d in sorted((train_dir / "ray_train").glob("step_*"))]
    assert losses[-1] < losses[0]  # two steps more of training lowered the loss
    ev = json.loads(next((root / "evaluate").glob("*/eval.json")).read_text())
    beyond = next(r for r in ev["lengths"] if r["multiplier"] == 2.0)
    assert beyond["supported"] == (model.get("pos_encoding") == "rope")  # RoPE extrapolates, learned tables refuse
    ckpts = sorted(p.name for p in (train_dir / "ray_train").glob("step_*"))
    assert ckpts == ["step_00000002", "step_00000004"]
    # every rank's ZeRO optimizer shard was kept in the merged checkpoint
    shards = list((train_dir / "ray_train" / "step_00000004" / "deepspeed").glob("*optim_states.pt"))
    assert len(shards) == 2


def test_config_error_is_one_line_and_exit_code_2(config_file, capsys):
    cfg = config_file()
    assert cli.main(["run", cfg, "train.stpes=3"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "train.stpes: unknown key" in err


def test_only_with_missing_upstream_is_a_clear_error(config_file, capsys, tracking_uri):
    assert cli.main(["run", config_file(), "--only", "train"]) == 2
    assert "--only train: upstream stage tokenizer is missing" in capsys.readouterr().err
