"""Evaluation: every metric on hand-computable cases, sliding windows, the length sweep (RoPE scaling, learned
tables refusing), plots; and (slow) two tiny pipelines, learned vs ALiBi, read back through `llmpipe compare`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml
from PIL import Image

from model import GPT, ModelConfig
from model.scoring import EvalOptions, score_windows, sweep, window_plan
from pipeline.stages.evaluate import plot
from tests.conftest import tiny_raw

V = 97


def uniform_gpt(**kw) -> GPT:
    """A GPT whose logits are all zero (zeroed unembedding): every token has probability 1/V."""
    m = GPT(ModelConfig(vocab_size=V, n_layer=1, n_head=2, d_model=16, max_seq_len=64, **kw)).eval()
    with torch.no_grad():
        m.lm_head.weight.zero_()
    return m


class Successor(nn.Module):
    """Predicts token x + 1 with certainty once `warmup` positions of the window have passed, uniform before."""

    def __init__(self, warmup: int):
        super().__init__()
        self.warmup = warmup
        self.dummy = nn.Parameter(torch.zeros(1))  # gives the module a device

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        logits = torch.zeros(B, T, V)
        logits.scatter_(2, ((idx + 1) % V)[..., None], 100.0)
        logits[:, : self.warmup] = 0.0
        return logits


def test_uniform_logits_give_ln_v_loss_v_perplexity_and_bits_per_byte_from_token_bytes():
    rng = np.random.default_rng(0)
    buffers = [rng.integers(0, V, size=100), rng.integers(0, V, size=60)]
    byte_lengths = np.arange(V) % 4  # token 0, 4, 8, ... stand for no bytes (like special tokens)
    plan = window_plan([100, 60], 16, stride=16, max_targets=10_000)
    r = score_windows(uniform_gpt(), buffers, plan, L=16, batch_size=4, byte_lengths=byte_lengths)
    targets = np.concatenate([buffers[b][s + 1 : s + 17] for b, s, _ in plan])
    assert len(plan) == 6 + 3 and r["tokens"] == len(targets) == 144  # windows of 17 tokens fit 6 and 3 times
    assert r["loss"] == pytest.approx(math.log(V), rel=1e-6)
    assert r["ppl"] == pytest.approx(V, rel=1e-5)
    assert r["token_accuracy"] == pytest.approx(np.mean(targets == 0))  # argmax of equal logits is token 0
    assert r["token_accuracy"] > 0
    assert r["bpb"] == pytest.approx(math.log(V) / math.log(2) * len(targets) / byte_lengths[targets].sum(), rel=1e-6)


def test_loss_by_position_buckets_and_accuracy_of_a_model_that_needs_six_tokens_of_context():
    buffers = [np.arange(80)]  # x + 1 always follows x; no target is token 0
    plan = window_plan([80], 16, stride=16, max_targets=10_000)
    r = score_windows(Successor(warmup=6), buffers, plan, L=16, batch_size=2, byte_lengths=np.ones(V),
                      position_buckets=4)
    assert r["loss_by_position"]["start"] == [0, 4, 8, 12] and r["loss_by_position"]["end"] == [4, 8, 12, 16]
    assert r["loss_by_position"]["loss"] == pytest.approx([math.log(V), math.log(V) / 2, 0.0, 0.0], abs=1e-6)
    assert r["token_accuracy"] == pytest.approx(10 / 16)
    assert r["loss"] == pytest.approx(6 / 16 * math.log(V), rel=1e-6)


def test_sliding_windows_score_every_target_once_with_at_least_window_minus_stride_context():
    plan = window_plan([100, 40], 16, stride=4, max_targets=10_000)
    scored = [(b, s + 1 + k + i) for b, s, k in plan for i in range(16 - k)]
    assert len(scored) == len(set(scored))  # no target twice
    assert {t for b, t in scored if b == 0} == set(range(1, 97))  # contiguous up to the last full window (start 80)
    assert all(k in (0, 12) for _, _, k in plan)
    r = score_windows(Successor(warmup=6), [np.arange(100)], window_plan([100], 16, stride=4, max_targets=10_000),
                      L=16, batch_size=8, byte_lengths=np.ones(V))
    # only the first window's first six targets lack context: later windows score positions 12..15 only
    assert r["loss"] == pytest.approx(6 * math.log(V) / r["tokens"], rel=1e-6) and r["tokens"] == 96


def test_max_tokens_bounds_the_windows_scored():
    assert len(window_plan([10_000], 16, stride=16, max_targets=40)) == 3  # 48 targets: one window past 40 at most
    assert window_plan([10], 16, stride=16, max_targets=100) == []  # too short for one window


def _sweep(model: nn.Module, **opts) -> dict:
    rng = np.random.default_rng(1)
    val = [rng.integers(0, V, size=300)]
    return sweep(model, val, train_seq_len=16, opts=EvalOptions(context_multipliers=(0.5, 2.0, 4.0), max_tokens=200, **opts),
                 byte_lengths=np.ones(V), unigram_logp=np.full(V, -math.log(V)))


def test_learned_positions_refuse_lengths_beyond_their_table_and_report_no_metric_for_them():
    torch.manual_seed(0)
    learned = GPT(ModelConfig(vocab_size=V, n_layer=1, n_head=2, d_model=16, max_seq_len=32)).eval()
    r = _sweep(learned, rope_scalings=("none", "yarn"))
    assert {"multiplier": 4.0, "context": 64, "supported": False} in r["lengths"]
    assert "ppl_ctx_64" not in r["metrics"] and {"ppl_ctx_8", "ppl_ctx_16", "ppl_ctx_32"} <= set(r["metrics"])
    assert r["metrics"]["unigram_loss"] == pytest.approx(math.log(V))
    assert any("[64]" in n for n in r["notes"]) and any("rope_scalings" in n for n in r["notes"])
    assert r["rope_scaled"] == {}


def test_rope_sweep_adds_scaled_metrics_past_the_context_and_restores_the_model():
    torch.manual_seed(0)
    rope = GPT(ModelConfig(vocab_size=V, n_layer=1, n_head=2, d_model=16, max_seq_len=16, pos_encoding="rope")).eval()
    with torch.no_grad():
        for p in rope.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.5)  # sharp attention, so scaling changes the numbers
    r = _sweep(rope, rope_scalings=("none", "linear", "yarn"))
    m = r["metrics"]
    assert {"ppl_ctx_32_linear", "ppl_ctx_64_linear", "ppl_ctx_32_yarn", "ppl_ctx_64_yarn", "bpb_ctx_64_yarn"} <= set(m)
    assert "ppl_ctx_16_linear" not in m and "ppl_ctx_8_yarn" not in m  # factor 1 is the unscaled model
    assert m["ppl_ctx_64_linear"] != pytest.approx(m["ppl_ctx_64"])
    assert [row["factor"] for row in r["rope_scaled"]["yarn"]] == [2.0, 4.0]
    assert rope.config.rope_scaling == "none" and rope.config.rope_factor == 1.0
    assert all(row["supported"] for row in r["lengths"])


def test_plots_are_pngs(tmp_path):
    torch.manual_seed(0)
    r = _sweep(GPT(ModelConfig(vocab_size=V, n_layer=1, n_head=2, d_model=16, max_seq_len=32)).eval())
    for path in plot(r, tmp_path):
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size == (760, 420)
            assert len(img.getcolors(maxcolors=100_000)) > 3  # axes, text and lines were drawn


# --- slow: two tiny pipelines ----------------------------------------------------------------------

def _eval_by_encoding(root: Path) -> dict[str, dict]:
    out = {}
    for marker in (root / "evaluate").glob("*/_COMPLETE.json"):
        train_fp = json.loads(marker.read_text())["upstream"]["train"]
        pos = json.loads((root / "train" / train_fp[:16] / "model.json").read_text())["model_config"]["pos_encoding"]
        out[pos] = json.loads((marker.parent / "eval.json").read_text())
    return out


@pytest.mark.slow
def test_alibi_scores_every_length_and_learned_refuses_past_its_table(corpus_dir, tmp_path, tracking_uri, ray_local, capsys,
                                                                     monkeypatch):
    from pipeline import cli

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root (./mlruns) lands in the temp folder

    raw = tiny_raw(corpus_dir, tmp_path / "artifacts", evaluate={"context_multipliers": [0.5, 1.0, 2.0, 4.0]},
                   train={"steps": 4, "checkpoint_every": 4, "num_workers": 1}, decode={"num_samples": 1})
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    parents = []
    for pe in ("alibi", "learned"):
        assert cli.main(["run", str(cfg), f"model.pos_encoding={pe}"]) == 0
        parents += [line.split("parent run ")[1].split()[0] for line in capsys.readouterr().out.splitlines()
                    if "parent run " in line]
    ev = _eval_by_encoding(tmp_path / "artifacts")
    alibi, learned = ev["alibi"], ev["learned"]
    assert [r["context"] for r in alibi["lengths"]] == [16, 32, 64, 128]
    assert all(r["supported"] and math.isfinite(r["ppl"]) for r in alibi["lengths"])
    assert all(f"ppl_ctx_{T}" in alibi["metrics"] for T in (16, 32, 64, 128))
    assert {"multiplier": 4.0, "context": 128, "supported": False} in learned["lengths"]
    assert "ppl_ctx_128" not in learned["metrics"] and "ppl_ctx_32" in learned["metrics"]
    assert len(alibi["lengths"][-1]["loss_by_position"]["loss"]) == 16

    # the one table: a column per run, the changed key as a header row, '-' where learned refused
    assert cli.main(["compare", *parents, "--metrics", "ppl_ctx_*"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split() == ["model.pos_encoding", "alibi", "learned"]
    row = next(line.split() for line in table if line.startswith("ppl_ctx_128 "))
    assert float(row[1]) > 0 and row[2] == "-"
    assert [line.split()[0] for line in table[2:]] == ["ppl_ctx_16", "ppl_ctx_32", "ppl_ctx_64", "ppl_ctx_128"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_run(parents[0]).info.experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parents[0]}' and tags.stage = 'evaluate'")
    assert {a.path for a in client.list_artifacts(children[0].info.run_id)} >= {"eval.json", "extrapolation.png",
                                                                               "loss_by_position.png"}
    curve = client.get_metric_history(children[0].info.run_id, "pos_loss_ctx_32")
    assert sorted(p.step for p in curve) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30]

    # decode ran too: its table has the completion's log-likelihood under the model
    (decode,) = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parents[0]}' and tags.stage = 'decode'")
    table = json.loads(Path(client.download_artifacts(decode.info.run_id, "samples.json")).read_text())
    assert {"prompt", "completion", "log_likelihood", "tokens_per_s", "top_p", "num_beams"} <= set(table["columns"])
    assert decode.data.metrics["mean_token_log_likelihood"] < 0
