"""`llmpipe generate`, `export-hf` and `compare` on a committed store and MLflow runs laid out as a pipeline
leaves them (built directly: a tiny model, committed stage folders, parent and child runs in a temp SQLite store)."""

from __future__ import annotations

import pytest
import torch

from model import import_hf, load_model
from pipeline import cli
from pipeline.engine.store import ArtifactStore
from pipeline.tracking.mlflow import Tracker
from tests.test_decode import make_model_dir

TRAIN_FP, EVAL_FP, EVAL_FP2 = "a" * 64, "b" * 64, "c" * 64
LLAMA = {"norm": "rmsnorm", "mlp": "swiglu", "bias": False, "tie_embeddings": False}


@pytest.fixture
def pipeline_runs(tmp_path, tracking_uri):
    """A committed train + evaluate folder, and two invocations (rope, alibi) as parent runs with stage children."""
    store = ArtifactStore(str(tmp_path / "artifacts"))
    make_model_dir(store.working_dir("train", TRAIN_FP, keep_partial=False), "rope", **LLAMA)
    store.commit("train", TRAIN_FP, store.local_dir("train", TRAIN_FP), {"stage": "train", "upstream": {}})
    for fp in (EVAL_FP, EVAL_FP2):
        (store.working_dir("evaluate", fp, keep_partial=False) / "eval.json").write_text("{}")
        store.commit("evaluate", fp, store.local_dir("evaluate", fp), {"stage": "evaluate", "upstream": {"train": TRAIN_FP}})
    tracker = Tracker("tools", tracking_uri)
    ids = {}
    for pe, eval_fp, metrics in (("rope", EVAL_FP, {"val_loss": 5.5, "ppl_ctx_64": 300.0, "ppl_ctx_16": 250.0,
                                                     "ppl_ctx_64_yarn": 280.0, "duration_s": 3.0}),
                                 ("alibi", EVAL_FP2, {"val_loss": 5.25, "ppl_ctx_16": 240.0})):
        parent = tracker.start_parent(f"tiny {pe}", {"model.pos_encoding": pe, "train.lr": 0.001}, {})
        children = {}
        for stage, fp in (("train", TRAIN_FP), ("evaluate", eval_fp)):
            children[stage] = tracker.start_child(stage, {}, {"fingerprint": fp, "artifact_uri": store.stage_uri(stage, fp)})
        tracker.log_metrics(children["evaluate"], metrics)
        for run_id in (*children.values(), parent):
            tracker.end(run_id)
        ids[pe] = {"parent": parent, **children}
    return store, ids


def _generate(target: str, capsys) -> str:
    assert cli.main(["generate", target, "--prompt", "the king", "--max-new-tokens", "6", "--temperature", "0"]) == 0
    return capsys.readouterr().out


def test_generate_from_a_folder_or_any_run_of_the_invocation_samples_the_same_model(pipeline_runs, capsys):
    store, ids = pipeline_runs
    out = _generate(str(store.local_dir("train", TRAIN_FP)), capsys)
    assert out.startswith("--- prompt 'the king', sample 0: ") and "log-likelihood" in out
    assert out.splitlines()[1].startswith("the king")
    assert _generate(str(store.local_dir("evaluate", EVAL_FP)), capsys).splitlines()[1] == out.splitlines()[1]
    for target in (ids["rope"]["train"], ids["rope"]["evaluate"], ids["rope"]["parent"]):
        assert _generate(target, capsys).splitlines()[1] == out.splitlines()[1]


def test_generate_sampling_flags_and_several_samples(pipeline_runs, capsys):
    store, _ = pipeline_runs
    args = ["generate", str(store.local_dir("train", TRAIN_FP)), "--prompt", "a", "--prompt", "the fool",
            "--num-samples", "2", "--top-p", "0.9", "--repetition-penalty", "1.3", "--max-new-tokens", "4"]
    assert cli.main(args) == 0
    headers = [line for line in capsys.readouterr().out.splitlines() if line.startswith("--- ")]
    assert [h.split(":")[0] for h in headers] == ["--- prompt 'a', sample 0", "--- prompt 'a', sample 1",
                                                  "--- prompt 'the fool', sample 0", "--- prompt 'the fool', sample 1"]
    assert cli.main([*args, "--num-beams", "2"]) == 0


@pytest.mark.parametrize("target, message", [
    ("0123456789abcdef0123456789abcdef", "MLflow run 0123456789abcdef0123456789abcdef not found"),
    ("no/such/folder", "no/such/folder: not an existing folder nor an MLflow run id"),
])
def test_unknown_target_is_one_line_and_exit_code_2(pipeline_runs, capsys, target, message):
    assert cli.main(["generate", target, "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("llmpipe: error: ") and message in err


def test_a_folder_that_is_no_stage_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["export-hf", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "not a committed stage folder" in capsys.readouterr().err


def test_export_hf_from_a_run_id_round_trips_the_weights(pipeline_runs, tmp_path, capsys):
    store, ids = pipeline_runs
    out = tmp_path / "hf"
    assert cli.main(["export-hf", ids["rope"]["evaluate"], str(out)]) == 0
    assert "llama" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    ours, _ = load_model(store.local_dir("train", TRAIN_FP))
    idx = torch.tensor([[5, 17, 3, 42, 8]])
    with torch.no_grad():
        assert torch.allclose(import_hf(out)(idx), ours(idx), atol=1e-5)


def test_export_hf_refuses_an_architecture_hugging_face_cannot_load(tmp_path, capsys):
    folder = make_model_dir(tmp_path / "alibi", "alibi")
    assert cli.main(["export-hf", str(folder), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs pos_encoding 'learned' (GPT-2) or 'rope' (LLaMA)" in err


def test_compare_parent_runs_side_by_side(pipeline_runs, capsys):
    _, ids = pipeline_runs
    assert cli.main(["compare", ids["rope"]["parent"], ids["alibi"]["evaluate"]]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows[0] == ["run", ids["rope"]["evaluate"][:8], ids["alibi"]["evaluate"][:8]]
    assert rows[1] == ["model.pos_encoding", "rope", "alibi"]  # the only config key that differs
    assert [r[0] for r in rows[2:]] == ["val_loss", "ppl_ctx_16", "ppl_ctx_64", "ppl_ctx_64_yarn"]  # no duration_s
    assert rows[2][1:] == ["5.5", "5.25"] and rows[4][1:] == ["300", "-"]


def test_compare_filters_metrics_and_an_experiment_gives_one_column_per_evaluation(pipeline_runs, capsys, tracking_uri):
    _, ids = pipeline_runs
    tracker = Tracker("tools", tracking_uri)  # a later cached invocation: the same evaluate fingerprint again
    parent = tracker.start_parent("cached", {"model.pos_encoding": "rope", "train.lr": 0.001}, {})
    hit = tracker.start_child("evaluate", {}, {"fingerprint": EVAL_FP, "cache": "hit"})
    tracker.log_metrics(hit, {"val_loss": 5.5})
    tracker.end(hit)
    tracker.end(parent)
    assert cli.main(["compare", "--experiment", "tools", "--metrics", "val_*"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows[0] == ["run", ids["alibi"]["evaluate"][:8], hit[:8]] and [r[0] for r in rows[2:]] == ["val_loss"]


def test_compare_refuses_a_run_of_another_stage_and_no_runs(pipeline_runs, capsys):
    _, ids = pipeline_runs
    assert cli.main(["compare", ids["rope"]["train"]]) == 2
    assert "is a train stage run, not evaluate; give the evaluate run or its parent run" in capsys.readouterr().err
    assert cli.main(["compare"]) == 2
    assert "give run ids or --experiment" in capsys.readouterr().err
