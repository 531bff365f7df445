"""Training at scale on real Ray Train + DeepSpeed (2 CPU workers): exact resume after a killed
worker (with dropout), a resume from the final checkpoint keeping the final metrics, one worker vs two
(the same samples, equal up to floating-point reduction order), non-finite loss, fine-tuning from earlier weights,
periodic validation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
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


DROPOUT = 0.2  # the reference trains with dropout: its masks come from each rank's RNG, which a resume must restore


@pytest.fixture(scope="module")
def reference(corpus_dir, tmp_path_factory, ray_local):
    return _reference(corpus_dir, tmp_path_factory.mktemp("reference"), "reference", {"dropout": DROPOUT})


def test_a_killed_worker_resumes_exactly(reference, corpus_dir, tmp_path, tracking_uri, monkeypatch):
    """With dropout, so the ranks' RNG states must be checkpointed and restored too, beside the weights, the
    optimizer and the data position."""
    assert sorted(reference["losses"]) == [1, 2, 3, 4, 5, 6]
    assert sorted(reference["val"]) == [3, 6] and reference["val"][6] < reference["val"][3]
    monkeypatch.setenv("LLMPIPE_FAULTS", "train.step:3:exit")  # a worker process dies right after step 3's checkpoint
    monkeypatch.setenv("LLMPIPE_FAULTS_DIR", str(tmp_path))
    name = "killed"
    cfg = _config(tmp_path, corpus_dir, name, {"dropout": DROPOUT}, max_failures=1)
    assert cli.main(["run", cfg, "--to", "train"]) == 0
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

    assert cli.main(["run", str(cfg), "--to", "train"]) == 0  # not --only train: that forces a rebuild from scratch
    metrics = json.loads((train_dir / "_COMPLETE.json").read_text())["metrics"]
    assert committed["final_loss"] == reference["losses"][6]
    # what the run spent outside optimizer steps: the workers' start-up, one checkpoint (step 3) before the final
    assert committed["startup_s"] > 0 and committed["steps_s"] > 0 and committed["checkpoint_s"] > 0
    assert committed["wall_s"] > committed["startup_s"] + committed["steps_s"] and 0 < committed["outside_steps_frac"] < 1
    assert metrics["final_loss"] == committed["final_loss"] and metrics["final_lr"] == committed["final_lr"]
    state = json.loads((train_dir / "ray_train" / "step_00000006" / "train_state.json").read_text())
    assert state["metrics"]["train/loss"] == reference["losses"][6]  # the re-saved final checkpoint keeps them too


SPY = r"""
import json, sys
from pipeline.stages.train import worker

out = open(sys.argv[2], "w")
real_metrics = worker.Rates.metrics


def spied(real):  # the real sampler; what each step consumes is written down
    def indices(step, **kw):
        idx = real(step, **kw)
        out.write(json.dumps({"step": step, "ids": idx.tolist()}) + "\n")
        return idx
    return indices


def metrics(self, loss, lr, dt, done, **kw):  # the real method; the all-reduced loss at full precision
    out.write(json.dumps({"done": done, "loss": loss, "lr": lr}) + "\n")
    out.flush()
    return real_metrics(self, loss, lr, dt, done, **kw)


worker.sample_indices, worker.segment_indices = spied(worker.sample_indices), spied(worker.segment_indices)
worker.Rates.metrics = metrics
worker.train_loop_per_worker(json.loads(sys.argv[1]))
"""


def _train_ranks(config: dict, world: int, tmp: Path) -> list[list[dict]]:
    """The per-worker loop in `world` processes of its own (DeepSpeed over gloo, no Ray): each rank's records."""
    from tests.servers import free_port

    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world))
    config = {**config, "train": {**config["train"], "num_workers": world}, "local_checkpoint_dir": str(tmp / f"ckpt-{world}")}
    procs = [subprocess.Popen([sys.executable, "-c", SPY, json.dumps(config), str(tmp / f"w{world}-r{r}.jsonl")],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    outs = [p.communicate(timeout=500)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    return [[json.loads(line) for line in open(tmp / f"w{world}-r{r}.jsonl")] for r in range(world)]


def resumed_equals_uninterrupted(config: dict, tmp: Path) -> dict:
    """4 steps uninterrupted (checkpoints at 2 and 4), then the same run resumed from its step-2 checkpoint: steps 3
    and 4 see the same samples, with bit-identical losses and final weights. Returns the final weights."""
    from safetensors.torch import load_file

    whole, resumed = tmp / "whole", tmp / "resumed"
    whole.mkdir(), resumed.mkdir()
    (reference,) = _train_ranks(config, 1, whole)
    shutil.copytree(whole / "ckpt-1", resumed / "ckpt-1")
    shutil.rmtree(resumed / "ckpt-1" / "step_00000004")
    (records,) = _train_ranks(config, 1, resumed)
    losses = {r["done"]: r["loss"] for r in records if "done" in r}
    assert sorted(losses) == [3, 4]  # resumed at step 2
    assert losses == {d: r["loss"] for r in reference if "done" in r and (d := r["done"]) in losses}
    ids = {r["step"]: r["ids"] for r in records if "ids" in r}
    assert ids == {r["step"]: r["ids"] for r in reference if "ids" in r and r["step"] in ids}
    a, b = (load_file(str(d / "ckpt-1" / "step_00000004" / "model.safetensors")) for d in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((resumed / "ckpt-1" / "step_00000004" / "train_state.json").read_text())["step"] == 4
    return a


def test_one_and_two_workers_train_on_the_same_samples_with_losses_equal_up_to_reduction_order(tmp_path):
    """`train.num_workers` is not fingerprinted: scaling out must not retrain. What that rests on: every step
    consumes the same samples (as a multiset) and the same learning rate, and the loss differs only by the order
    in which floating-point sums are taken (micro-batches accumulated on one rank vs all-reduced across two)."""
    from pipeline.schema import ModelSection, TrainConfig
    from tokenization.shards import write_shard

    rng = np.random.default_rng(0)
    write_shard(tmp_path / "train-00000.arrow", [rng.integers(0, 64, 300) for _ in range(20)], np.dtype(np.uint16))
    config = {"model": {**ModelSection(n_layer=2, n_head=2, d_model=32, max_seq_len=16).model_config_fields(), "vocab_size": 64},
              "train": TrainConfig(steps=6, global_batch_size=8, micro_batch_size=2, warmup_steps=1, checkpoint_every=6,
                                   log_every=1, zero_stage=1, lr=1e-2).model_dump(mode="json"),
              "seq_len": 16, "train_shards": [str(tmp_path / "train-00000.arrow")]}
    one, two = _train_ranks(config, 1, tmp_path), _train_ranks(config, 2, tmp_path)

    def samples(ranks):
        per_step: dict[int, list[int]] = {}
        for records in ranks:
            for r in records:
                if "ids" in r:
                    per_step.setdefault(r["step"], []).extend(r["ids"])
        return {step: sorted(ids) for step, ids in per_step.items()}

    assert samples(one) == samples(two) and sorted(samples(one)) == [0, 1, 2, 3, 4, 5]
    losses = [{r["done"]: (r["loss"], r["lr"]) for r in records if "done" in r} for records in (one[0], two[0], two[1])]
    assert sorted(losses[0]) == [1, 2, 3, 4, 5, 6] and losses[1] == losses[2]  # the loss is all-reduced: one value per step
    for step, (loss, lr) in losses[0].items():
        other, other_lr = losses[1][step]
        assert other_lr == lr
        # The tolerance: in fp32 (eps 1.2e-7) the loss is a mean over 8 x 16 tokens and each gradient a sum over 4
        # micro-batches, taken in another order with two workers (2 accumulated per rank, then all-reduced); measured
        # here, the losses differ by at most one ulp (1.1e-7 relative) over 8 steps at lr 1e-2, AdamW carrying the
        # perturbation without amplifying it. 1e-5 (~100 ulps) leaves room for other BLAS thread counts, while another
        # sample in a batch moves this loss by ~1e-2 relative (compare consecutive steps): it would be caught.
        assert abs(other - loss) <= 1e-5 * abs(loss), f"step {step}: {loss} with 1 worker, {other} with 2"


@pytest.mark.slow
def test_a_compiled_model_trains_under_zero_3_with_the_losses_of_eager(tmp_path):
    """`train.compile` compiles the module inside DeepSpeed (`engine.compile`). The graph capture through ZeRO-3's
    parameter hooks is what can break; `aot_eager` captures the same graphs as inductor (dynamo + AOTAutograd) but
    runs them with eager kernels, so the losses must agree to float rounding, and it compiles in seconds on a CPU."""
    from pipeline.schema import ModelSection, TrainConfig
    from tokenization.shards import write_shard

    rng = np.random.default_rng(0)
    write_shard(tmp_path / "train-00000.arrow", [rng.integers(0, 64, 300) for _ in range(20)], np.dtype(np.uint16))
    losses = {}
    for compiled in (False, True):
        train = TrainConfig(steps=4, global_batch_size=4, micro_batch_size=2, num_workers=1, warmup_steps=1,
                            checkpoint_every=4, log_every=1, zero_stage=3, lr=1e-2, compile=compiled,
                            compile_backend="aot_eager")
        config = {"model": {**ModelSection(n_layer=2, n_head=2, d_model=32, max_seq_len=16).model_config_fields(),
                            "vocab_size": 64},
                  "train": train.model_dump(mode="json"), "seq_len": 16, "train_shards": [str(tmp_path / "train-00000.arrow")]}
        folder = tmp_path / ("compiled" if compiled else "eager")
        folder.mkdir()
        (records,) = _train_ranks(config, 1, folder)
        losses[compiled] = {r["done"]: r["loss"] for r in records if "done" in r}
    assert sorted(losses[False]) == [1, 2, 3, 4] and losses[True].keys() == losses[False].keys()
    for step, loss in losses[False].items():
        assert abs(losses[True][step] - loss) <= 1e-5 * abs(loss), f"step {step}: eager {loss}, compiled {losses[True][step]}"
