"""Context extension: `train.init_from` accepts a base whose position settings differ (max_seq_len, RoPE scaling,
factor, theta) and nothing else; a RoPE base trained at T and fine-tuned briefly at 4T with YaRN scores better at 4T
than the base with inference-only YaRN. The base trains with document-aware packing through the real stages, and
its evaluation runs in that mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline import cli
from pipeline.errors import ConfigError
from pipeline.stages.train.init_from import check_init_compatible
from tests.conftest import tiny_raw

BASE = {"vocab_size": 300, "n_layer": 2, "n_head": 2, "d_model": 32, "max_seq_len": 16, "pos_encoding": "rope"}


@pytest.mark.parametrize("change", [{"max_seq_len": 64}, {"rope_scaling": "yarn", "rope_factor": 4.0},
                                    {"rope_theta": 40000.0}, {"rope_original_max_seq_len": 16, "max_seq_len": 48}])
def test_fine_tuning_may_change_the_position_settings(change):
    check_init_compatible(BASE, {**BASE, **change}, "base")


def test_fine_tuning_still_refuses_any_other_difference_naming_it():
    with pytest.raises(ConfigError, match=r"another architecture \(n_head: 2 there, 4 here; n_kv_head"):
        check_init_compatible(BASE, {**BASE, "n_head": 4, "max_seq_len": 64}, "base")
    with pytest.raises(ConfigError, match=r"pos_encoding: 'rope' there, 'alibi' here"):
        check_init_compatible(BASE, {**BASE, "pos_encoding": "alibi"}, "base")


def test_a_learned_position_table_is_never_grown_silently():
    learned = {**BASE, "pos_encoding": "learned"}
    with pytest.raises(ConfigError, match="learned position table of 16 rows; model.max_seq_len 64"):
        check_init_compatible(learned, {**learned, "max_seq_len": 64}, "base")
    check_init_compatible(learned, {**learned, "rope_theta": 500.0}, "base")  # meaningless for it, and harmless


def _run(cfg: Path, *stages: str) -> None:
    for stage in stages:
        assert cli.main(["run", str(cfg), "--only", stage]) == 0, stage


def _eval(root: Path, train_dir: Path) -> dict:
    """eval.json of the evaluate folder whose train upstream is `train_dir`."""
    fingerprint = json.loads((train_dir / "_COMPLETE.json").read_text())["fingerprint"]
    for folder in (root / "evaluate").iterdir():
        manifest = folder / "_COMPLETE.json"
        if manifest.is_file() and fingerprint in manifest.read_text():
            return json.loads((folder / "eval.json").read_text())
    raise AssertionError(f"no evaluate folder for {train_dir}")


def _train_dirs(root: Path) -> set[Path]:
    return {p for p in (root / "train").iterdir() if (p / "_COMPLETE.json").is_file()}


@pytest.mark.slow
def test_a_context_extended_fine_tune_beats_inference_only_yarn_at_4x(corpus_dir, tmp_path, ray_local, capsys):
    root = tmp_path / "store"
    common = {"tracking": {"enabled": False},
              "evaluate": {"max_tokens": 3000, "context_multipliers": [1.0, 4.0], "rope_scalings": ["none", "yarn"]}}
    train = {"num_workers": 1, "global_batch_size": 8, "micro_batch_size": 8, "zero_stage": 1, "precision": "fp32",
             "log_model": False, "packing": "documents", "lr": 3e-3, "min_lr": 3e-4}
    base = tiny_raw(corpus_dir, root, model={"pos_encoding": "rope", "max_seq_len": 16},
                    train={**train, "steps": 60, "warmup_steps": 5, "checkpoint_every": 60}, **common)
    base_cfg = tmp_path / "base.yaml"
    base_cfg.write_text(yaml.safe_dump({**base, "name": "base"}))
    _run(base_cfg, "tokenizer", "prepare", "train", "evaluate")
    (base_dir,) = _train_dirs(root)
    base_eval = _eval(root, base_dir)
    assert base_eval["packing"] == "documents"  # scored as it trained
    base_yarn = base_eval["metrics"]["loss_ctx_64_yarn"]

    # 4x the context: YaRN over the base's 16 positions, a few steps on the same (cached) data
    tuned = tiny_raw(corpus_dir, root, model={"pos_encoding": "rope", "max_seq_len": 64, "rope_scaling": "yarn",
                                              "rope_factor": 4.0, "rope_original_max_seq_len": 16},
                     train={**train, "steps": 8, "warmup_steps": 1, "checkpoint_every": 8, "lr": 1e-3,
                            "init_from": str(base_dir)}, **common)
    tuned_cfg = tmp_path / "tuned.yaml"
    tuned_cfg.write_text(yaml.safe_dump({**tuned, "name": "tuned"}))
    _run(tuned_cfg, "train", "evaluate")
    (tuned_dir,) = _train_dirs(root) - {base_dir}
    tuned_eval = _eval(root, tuned_dir)
    assert tuned_eval["train_seq_len"] == 64
    assert tuned_eval["metrics"]["val_loss"] < base_yarn, (tuned_eval["metrics"]["val_loss"], base_yarn)

    # anything but the position settings is still refused, by name, before training
    capsys.readouterr()
    assert cli.main(["run", str(tuned_cfg), "model.n_layer=3", "--only", "train"]) == 2
    assert "has another architecture (n_layer: 2 there, 3 here)" in capsys.readouterr().err
