"""Weighted data mixtures: the draw (shares, purity, ranks), the config's refusals, and a real two-source run whose
weights change without re-tokenising, with per-source validation losses and the realised shares in MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.errors import ConfigError
from tests.conftest import tiny_raw
from tokenization.mixture import mixture_indices, quotas, realised_shares

RANGES = [(0, 40), (40, 50), (50, 53)]  # windows of three sources: 40, 10 and 3


def _draw(step: int, world: int, weights: list[float], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    parts = [mixture_indices(step, rank=r, world_size=world, global_batch=8, ranges=RANGES, weights=weights, seed=seed)
             for r in range(world)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


@pytest.mark.parametrize("weights", [[0.7, 0.2, 0.1], [1, 1, 1], [5.0, 0.5, 94.5]])
def test_realised_shares_are_within_1_percent_of_the_weights_over_a_run_and_at_every_step(weights):
    w = np.asarray(weights) / sum(weights)
    counts = np.zeros(3)
    for step in range(200):
        idx, src = _draw(step, 1, weights)
        assert all(RANGES[s][0] <= i < RANGES[s][1] for i, s in zip(idx, src))  # each index is its source's window
        counts += np.bincount(src, minlength=3)
        if step >= 12:  # 104+ samples: each source within one sample (and 1%) of its share at every step
            assert np.abs(counts / counts.sum() - w).max() <= 0.01, (step, counts)
    assert np.allclose(counts / counts.sum(), realised_shares(200, global_batch=8, weights=weights))
    assert np.abs(realised_shares(200, global_batch=8, weights=weights) - w).max() <= 0.001


def test_the_draw_is_a_pure_function_of_the_step_split_across_ranks_and_walks_each_source_in_passes():
    weights = [0.5, 0.3, 0.2]
    first = [_draw(s, 1, weights) for s in range(100)]
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(first, [_draw(s, 1, weights) for s in range(100)]))
    for step in (0, 37, 99):  # two ranks take exactly the samples one rank would, every other one each
        one, two = _draw(step, 1, weights)[0], _draw(step, 2, weights)[0]
        assert sorted(one) == sorted(two)
    drawn = np.concatenate([d[0] for d in first])
    small = [int(i) for i in drawn if 50 <= i < 53]  # the 3-window source, drawn 160 times: whole passes in turn
    assert all(sorted(small[k:k + 3]) == [50, 51, 52] for k in range(0, len(small) - 2, 3))
    assert not np.array_equal(_draw(5, 1, weights, seed=1)[0], _draw(5, 1, weights, seed=0)[0])


def test_quotas_sum_to_the_period_and_follow_the_weights():
    assert quotas([1, 1, 1]).tolist() == [334, 333, 333]
    assert quotas([0.7, 0.2, 0.1]).tolist() == [700, 200, 100]
    assert quotas([1e-9, 1.0]).tolist() == [0, 1000]  # below 1/period: never drawn, and said by share_<name> = 0


@pytest.mark.parametrize("sources,key,words", [
    ([{"name": "a", "inputs": ["x"], "weight": -1}], "data.sources.0.weight", "weight > 0, got -1"),
    ([{"name": "a", "inputs": ["x"], "weight": 0}], "data.sources.0.weight", "weight > 0, got 0"),
    ([{"name": "a/b", "inputs": ["x"]}], "data.sources.0.name", "letters, digits"),
    ([{"name": "a", "inputs": []}], "data.sources.0.inputs", "at least one"),
    ([{"name": "a", "inputs": ["x"]}, {"name": "a", "inputs": ["y"]}], "data.sources", "repeated: a"),
])
def test_a_bad_source_is_one_line_naming_its_key(tmp_path, sources, key, words):
    from pipeline.config import parse_config

    with pytest.raises(ConfigError) as e:
        parse_config({"name": "x", "data": {"sources": sources}})
    assert f"{key}:" in str(e.value) and words in str(e.value) and "\n" not in str(e.value)


def test_inputs_and_sources_together_are_refused(tmp_path):
    from pipeline.config import parse_config

    with pytest.raises(ConfigError, match="data.sources: give data.inputs .* or data.sources .*, not both"):
        parse_config({"name": "x", "data": {"inputs": ["a"], "sources": [{"name": "b", "inputs": ["c"]}]}})


def _sources(corpus: Path, tmp: Path) -> list[dict]:
    plays = sorted(corpus.iterdir())
    for name, files in (("kings", plays[:24]), ("fools", plays[24:])):
        (tmp / name).mkdir(exist_ok=True)
        for f in files:
            (tmp / name / f.name).write_bytes(f.read_bytes())
    return [{"name": "kings", "inputs": [str(tmp / "kings")], "weight": 3.0},
            {"name": "fools", "inputs": [str(tmp / "fools")], "weight": 1.0}]


def test_fingerprints_weights_retrain_but_never_re_tokenise_and_one_corpus_keeps_its_fingerprints(tiny_config, corpus_dir,
                                                                                                   tmp_path):
    from pipeline.engine.plan import plan
    from pipeline.engine.store import ArtifactStore
    from pipeline.stages import STAGES

    def fps(**data):
        cfg = tiny_config(data=data)
        return {it.stage.name: it.fingerprint for it in plan(cfg, ArtifactStore(cfg.store.root), STAGES)}

    sources = _sources(corpus_dir, tmp_path)
    mixed = fps(inputs=[], sources=sources)
    reweighted = fps(inputs=[], sources=[{**sources[0], "weight": 1.0}, sources[1]])
    assert [s for s in mixed if mixed[s] != reweighted[s]] == ["train", "evaluate", "decode"]
    assert fps(inputs=[], sources=[{**s, "weight": 2 * s["weight"]} for s in sources]) == mixed  # normalised
    one = fps()  # one corpus: the fingerprints of before mixtures (pinned by tests/test_golden.py)
    assert one["prepare"] != mixed["prepare"] and one["tokenizer"] != mixed["tokenizer"]


@pytest.mark.slow
def test_a_two_source_run_draws_by_weight_scores_each_source_and_reweighting_keeps_prepare(corpus_dir, tmp_path, tracking_uri,
                                                                                          ray_local, capsys):
    from mlflow.tracking import MlflowClient

    from pipeline import cli

    raw = tiny_raw(corpus_dir, tmp_path / "store", train={"num_workers": 1, "steps": 4, "checkpoint_every": 4,
                                                           "log_model": False}, evaluate={"context_multipliers": [1.0]})
    raw["data"] = {**raw["data"], "inputs": [], "sources": _sources(corpus_dir, tmp_path)}
    cfg = tmp_path / "mix.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    for stage in ("tokenizer", "prepare", "train", "evaluate"):
        assert cli.main(["run", str(cfg), "--only", stage]) == 0, capsys.readouterr().err

    root = tmp_path / "store"
    (prep,) = (root / "prepare").glob("*/shards.json")
    manifest = json.loads(prep.read_text())
    assert {sh["source"] for sh in manifest["shards"]} == {"kings", "fools"}
    assert set(manifest["sources"]) == {"kings", "fools"}
    (train,) = (root / "train").glob("*/_COMPLETE.json")
    metrics = json.loads(train.read_text())["metrics"]
    assert abs(metrics["share_kings"] - 0.75) <= 0.01 and abs(metrics["share_fools"] - 0.25) <= 0.01
    (ev,) = (root / "evaluate").glob("*/eval.json")
    ev_metrics = json.loads(ev.read_text())["metrics"]
    assert {"val_loss_kings", "val_loss_fools", "val_bpb_kings"} <= set(ev_metrics)
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], "tags.stage = 'train'")
    assert runs[0].data.metrics["share_kings"] == metrics["share_kings"]

    capsys.readouterr()
    assert cli.main(["status", str(cfg), "data.sources.0.weight=1.0"]) == 0
    status = capsys.readouterr().out
    assert "prepare    cached" in status and "tokenizer  cached" in status
    assert "train      stale (mixture.fools: 0.25 -> 0.5; mixture.kings: 0.75 -> 0.5)" in status, status
