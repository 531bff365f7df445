"""The workflow contract with fake stages (no Ray): fingerprints, plan states, selection, commit."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from pipeline.engine.execute import execute
from pipeline.engine.plan import plan
from pipeline.engine.stage import Stage, fingerprint
from pipeline.engine.store import MARKER, ArtifactStore
from pipeline.errors import WorkflowError
from pipeline.fingerprints import fingerprint_view
from pipeline.stages import STAGES


def fake_stages(calls: list[str]) -> list[Stage]:
    def make(name: str, needs: tuple[str, ...], section):
        def run(ctx):
            calls.append(name)
            for n in needs:  # a downstream stage only ever sees committed upstreams
                assert (ctx.inputs[n].ref.local() / MARKER).is_file()
            (ctx.out_dir / "out.txt").write_text(f"{name} {ctx.fingerprint}")
            return {"value": float(len(calls))}
        return Stage(name=name, needs=needs, section=section, version=1, run=run, uses_ray=False)

    return [
        make("tokenizer", (), lambda c: fingerprint_view(c.tokenizer)),
        make("prepare", ("tokenizer",), lambda c: {"val_fraction": c.data.val_fraction}),
        make("train", ("tokenizer", "prepare"), lambda c: {"model": fingerprint_view(c.model), "train": fingerprint_view(c.train)}),
        make("evaluate", ("tokenizer", "prepare", "train"), lambda c: fingerprint_view(c.evaluate)),
        make("decode", ("tokenizer", "train"), lambda c: fingerprint_view(c.decode)),
    ]


def fps(cfg, stages=None):
    store = ArtifactStore(cfg.store.root)
    return {it.stage.name: it.fingerprint for it in plan(cfg, store, stages or fake_stages([]))}


def run_all(cfg, stages, **kw):
    items = plan(cfg, ArtifactStore(cfg.store.root), stages, **kw)
    execute(cfg, items, stages, echo=lambda s: None)
    return items


def test_fingerprint_is_stable_and_canonical():
    s = fake_stages([])[0]
    a = fingerprint(s, {"x": 1, "y": [1, 2]}, {})
    assert a == fingerprint(s, {"y": [1, 2], "x": 1}, {})
    assert a != fingerprint(s, {"x": 2, "y": [1, 2]}, {})
    assert a != fingerprint(s, {"x": 1, "y": [1, 2]}, {"up": "f"})
    assert len(a) == 64


def test_real_stage_fingerprints_ignore_worker_counts_but_not_hyperparameters(tiny_config):
    base = fps(tiny_config(), STAGES)
    assert fps(tiny_config(train={"num_workers": 1, "global_batch_size": 8, "log_every": 5, "checkpoint_every": 2}), STAGES) == base
    changed = fps(tiny_config(train={"lr": 5e-4}), STAGES)
    assert [n for n in base if base[n] != changed[n]] == ["train", "evaluate", "decode"]


def test_changing_decode_temperature_changes_only_decode(tiny_config):
    base = fps(tiny_config(), STAGES)
    changed = fps(tiny_config(decode={"temperature": 0.3}), STAGES)
    assert [n for n in base if base[n] != changed[n]] == ["decode"]


def test_adding_an_input_file_makes_the_tokenizer_and_everything_after_it_change(tiny_config, corpus_dir, tmp_path):
    import shutil

    corpus = tmp_path / "corpus"
    shutil.copytree(corpus_dir, corpus)
    base = fps(tiny_config(data={"inputs": [str(corpus)]}), STAGES)
    (corpus / "extra.md").write_text("A new play.\n")
    changed = fps(tiny_config(data={"inputs": [str(corpus)]}), STAGES)
    assert all(base[n] != changed[n] for n in base)


def test_stages_run_in_dependency_order_then_are_cached(tiny_config):
    calls: list[str] = []
    cfg = tiny_config()
    stages = fake_stages(calls)
    items = run_all(cfg, stages)
    assert calls == ["tokenizer", "prepare", "train", "evaluate", "decode"]
    assert all(it.state == "missing" for it in items)
    calls.clear()
    again = run_all(cfg, stages)
    assert calls == [] and all(it.state == "cached" and not it.run for it in again)


def test_stale_stage_reports_the_changed_keys(tiny_config):
    calls: list[str] = []
    stages = fake_stages(calls)
    run_all(tiny_config(), stages)
    items = {it.stage.name: it for it in plan(tiny_config(train={"lr": 5e-4}), ArtifactStore(tiny_config().store.root), stages)}
    assert items["tokenizer"].state == "cached" and items["prepare"].state == "cached"
    assert items["train"].state == "stale"
    assert any(r.startswith("train.lr: 0.001 -> 0.0005") for r in items["train"].reasons)
    assert "upstream train changed" in items["evaluate"].reasons


def test_only_runs_one_stage_and_needs_cached_upstreams(tiny_config):
    calls: list[str] = []
    stages = fake_stages(calls)
    cfg = tiny_config()
    with pytest.raises(WorkflowError, match="--only evaluate: upstream stage tokenizer is missing"):
        plan(cfg, ArtifactStore(cfg.store.root), stages, only="evaluate")
    run_all(cfg, stages)
    calls.clear()
    run_all(cfg, stages, only="evaluate")
    assert calls == ["evaluate"]


def test_from_forces_the_stage_and_everything_downstream(tiny_config):
    calls: list[str] = []
    stages = fake_stages(calls)
    cfg = tiny_config()
    run_all(cfg, stages)
    calls.clear()
    run_all(cfg, stages, from_stage="train")
    assert calls == ["train", "evaluate", "decode"]
    calls.clear()
    run_all(cfg, stages, force=["prepare"])
    assert calls == ["prepare"]


def test_to_runs_a_stage_and_what_it_needs_and_nothing_downstream(tiny_config):
    calls: list[str] = []
    stages = fake_stages(calls)
    cfg = tiny_config()
    items = run_all(cfg, stages, to="train")
    assert calls == ["tokenizer", "prepare", "train"] and [it.stage.name for it in items] == calls
    calls.clear()
    run_all(cfg, stages, to="decode")  # decode needs the tokenizer and train, both cached: evaluate is left out
    assert calls == ["decode"]
    calls.clear()
    run_all(cfg, stages, to="evaluate", from_stage="train")  # forced from train, but not past evaluate
    assert calls == ["train", "evaluate"]
    with pytest.raises(WorkflowError, match="--force decode: not run with --to train, which needs only tokenizer, prepare, train"):
        plan(cfg, ArtifactStore(cfg.store.root), stages, to="train", force=["decode"])
    with pytest.raises(WorkflowError, match="--to trian: unknown stage"):
        plan(cfg, ArtifactStore(cfg.store.root), stages, to="trian")


def test_an_optional_stage_joins_the_graph_only_when_configured_and_only_its_readers_depend_on_it(tiny_config):
    import dataclasses

    calls: list[str] = []
    base = fake_stages(calls)
    # "index" is configured by decode.prompts here (any config field serves); evaluate reads it when sliding_window is set
    index = dataclasses.replace(base[0], name="index", needs=("tokenizer",), section=lambda c: {"p": c.decode.prompts},
                                enabled=lambda c: len(c.decode.prompts) > 1, run=base[0].run)
    evaluate = dataclasses.replace(base[3], extra_needs=lambda c: ("index",) if c.evaluate.sliding_window else ())
    stages = [base[0], index, *base[1:3], evaluate, base[4]]
    plain = tiny_config()
    assert [it.stage.name for it in plan(plain, ArtifactStore(plain.store.root), stages)] == [
        "tokenizer", "prepare", "train", "evaluate", "decode"]
    with pytest.raises(WorkflowError, match="--only index: this config does not configure that stage"):
        plan(plain, ArtifactStore(plain.store.root), stages, only="index")
    with pytest.raises(WorkflowError, match="evaluate needs stage index, which this config does not configure"):
        plan(tiny_config(evaluate={"sliding_window": True}), ArtifactStore(plain.store.root), stages)

    one = fps(tiny_config(decode={"prompts": ["a", "b"]}, evaluate={"sliding_window": True}), stages)
    other = fps(tiny_config(decode={"prompts": ["a", "c"]}, evaluate={"sliding_window": True}), stages)
    assert [n for n in one if one[n] != other[n]] == ["index", "evaluate", "decode"]  # decode: its own prompts changed
    unread = fps(tiny_config(decode={"prompts": ["a", "b"]}), stages)
    assert unread["evaluate"] == fps(tiny_config(decode={"prompts": ["a", "c"]}), stages)["evaluate"]


def test_unknown_stage_name_is_rejected(tiny_config):
    cfg = tiny_config()
    with pytest.raises(WorkflowError, match="--from trian: unknown stage"):
        plan(cfg, ArtifactStore(cfg.store.root), fake_stages([]), from_stage="trian")


def test_folder_without_marker_is_never_used_and_is_redone(tiny_config):
    calls: list[str] = []
    stages = fake_stages(calls)
    cfg = tiny_config()
    store = ArtifactStore(cfg.store.root)
    tok_fp = plan(cfg, store, stages)[0].fingerprint
    partial = store.working_dir("tokenizer", tok_fp, keep_partial=False)
    (partial / "half-written.bin").write_bytes(b"\0" * 10)
    items = plan(cfg, store, stages)
    assert items[0].state == "missing" and "incomplete folder: will redo" in items[0].reasons
    run_all(cfg, stages)
    assert calls[0] == "tokenizer"
    assert not (partial / "half-written.bin").exists()  # cleared, not mixed into the new output


@pytest.mark.parametrize("damage", ["delete_file", "truncate_file", "wrong_fingerprint", "corrupt_marker"])
def test_damaged_commit_is_treated_as_incomplete(tiny_config, damage):
    stages = fake_stages([])
    cfg = tiny_config()
    run_all(cfg, stages)
    store = ArtifactStore(cfg.store.root)
    fp = plan(cfg, store, stages)[0].fingerprint
    folder = store.local_dir("tokenizer", fp)
    assert store.manifest("tokenizer", fp) is not None
    if damage == "delete_file":
        (folder / "out.txt").unlink()
    elif damage == "truncate_file":
        (folder / "out.txt").write_text("x")
    elif damage == "wrong_fingerprint":
        m = json.loads((folder / MARKER).read_text())
        m["fingerprint"] = "0" * 64
        (folder / MARKER).write_text(json.dumps(m))
    else:
        (folder / MARKER).write_text('{"fingerprint": ')
    assert store.manifest("tokenizer", fp) is None
    assert plan(cfg, store, stages)[0].state != "cached"


def test_commit_writes_the_marker_last_with_the_file_list(tmp_path, monkeypatch):
    store = ArtifactStore(str(tmp_path / "root"))
    work = store.working_dir("s", "ab" * 32, keep_partial=False)
    (work / "sub").mkdir()
    (work / "sub" / "a.bin").write_bytes(b"1234")
    seen_at_marker: list[dict] = []
    replace = os.replace

    def spy(src, dst) -> None:  # when the marker appears, the data is complete, and nothing is written after it
        if Path(dst).name == MARKER:
            seen_at_marker.append({"data": (work / "sub" / "a.bin").read_bytes(), "marker_before": (work / MARKER).exists()})
        replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    m = store.commit("s", "ab" * 32, work, {"stage": "s"})
    assert seen_at_marker == [{"data": b"1234", "marker_before": False}]
    last_data_write = max(p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file() and p.name != MARKER)
    assert (work / MARKER).stat().st_mtime_ns >= last_data_write
    assert m["files"] == [{"path": "sub/a.bin", "size": 4}]
    assert store.manifest("s", "ab" * 32)["stage"] == "s"
    assert not list(work.glob(".*tmp"))


def test_the_mlflow_experiment_opens_as_model_training(tracking_uri):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.mlflow import Tracker

    Tracker("kind-test")
    exp = MlflowClient(tracking_uri).get_experiment_by_name("kind-test")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_stage_folder_written_before_generations_is_read_in_place_and_a_forced_rebuild_replaces_it(tiny_config):
    calls: list[str] = []
    stages = fake_stages(calls)
    cfg = tiny_config()
    run_all(cfg, stages)
    store = ArtifactStore(cfg.store.root)
    fp = plan(cfg, store, stages)[0].fingerprint
    link = Path(store.stage_path("tokenizer", fp))
    assert link.is_symlink() and (link / MARKER).is_file()  # a generation, linked
    old = Path(os.path.realpath(link))
    link.unlink()
    shutil.move(old, link)  # the layout before generations: the files in the stage folder itself
    assert plan(cfg, store, stages)[0].state == "cached" and store.local_dir("tokenizer", fp) == link

    calls.clear()
    run_all(cfg, stages, force=["tokenizer"])
    assert calls == ["tokenizer"] and link.is_symlink() and store.manifest("tokenizer", fp) is not None
    assert sorted(p.name for p in link.iterdir()) == [MARKER, "out.txt"]
    generations = sorted((Path(store.base) / "_generations" / "tokenizer").iterdir())
    assert generations == [Path(os.path.realpath(link))]  # the old folder was moved aside, then removed at the commit
