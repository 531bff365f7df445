"""Golden outputs: a fixed tiny corpus and config whose tokenizer, shards and trained weights (fp32, CPU) have
pinned sha256 values, each pinned with the stage `version` that produced it.

A cached stage must be what rerunning it would give, so a change to what a stage writes must come with a bump
of its `version` (which changes its fingerprint and so retires every cached folder of the old kind). When an
output changes, this test says which: bump that stage's version and pin the new hash beside the new version.
The weights are compared on this machine kind (CPU, fp32, gloo); the tokenizer and shards anywhere.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from pipeline import cli
from pipeline.stages import STAGES
from tests.conftest import tiny_raw

pytestmark = pytest.mark.slow

# stage -> (the version that produced it, sha256 over its output files)
GOLDEN = {
    "tokenizer": (3, "a4b006905327742d737d5f412066df2d603c7934dbe47a114cd22cadbc4aa791"),
    "prepare": (4, "130b02012bcd6ec1c2b139cf7ccc5ebc4ba29bc88d6af4cc1159c7f77ca57a5e"),
    "train": (2, "efa3697464e38b4116e89bcf0c4a9162f8002fc16660906f7b46dedeb5a6ba45"),
}
OUTPUTS = {"tokenizer": ("tokenizer.json",), "prepare": ("*.arrow",), "train": ("model.safetensors",)}


def output_hash(folder: Path, patterns: tuple[str, ...]) -> str:
    """sha256 over (name, sha256 of content) of the stage's output files, in name order."""
    h = hashlib.sha256()
    files = sorted(p for pattern in patterns for p in folder.glob(pattern))
    assert files, f"{folder} holds none of {patterns}"
    for p in files:
        h.update(p.name.encode() + b"\0" + hashlib.sha256(p.read_bytes()).hexdigest().encode() + b"\n")
    return h.hexdigest()


def golden_problems(actual: dict[str, str], versions: dict[str, int]) -> list[str]:
    problems = []
    for stage, (pinned_version, pinned_hash) in GOLDEN.items():
        if actual[stage] == pinned_hash and versions[stage] == pinned_version:
            continue
        if versions[stage] == pinned_version:
            problems.append(f"{stage} output changed: bump {stage}.version ({pinned_version} -> {pinned_version + 1}) "
                            f"and update the golden hash: GOLDEN[{stage!r}] = ({pinned_version + 1}, {actual[stage]!r})")
        else:
            problems.append(f"{stage}.version is {versions[stage]}, the golden hash was pinned at {pinned_version}: "
                            f"update the golden hash: GOLDEN[{stage!r}] = ({versions[stage]}, {actual[stage]!r})")
    return problems


def test_the_message_says_what_to_do():
    versions = {s: v for s, (v, _) in GOLDEN.items()}
    same = {s: h for s, (_, h) in GOLDEN.items()}
    assert golden_problems(same, versions) == []
    changed = {**same, "prepare": "f" * 64}
    (problem,) = golden_problems(changed, versions)
    assert problem.startswith(f"prepare output changed: bump prepare.version ({versions['prepare']} -> ")
    (problem,) = golden_problems(changed, {**versions, "prepare": versions["prepare"] + 1})
    assert "update the golden hash" in problem and "f" * 64 in problem


def test_stage_outputs_match_their_pinned_hashes_or_the_version_was_bumped(ray_local, corpus_dir, tmp_path):
    root = tmp_path / "store"
    raw = tiny_raw(corpus_dir, root, train={"num_workers": 1, "global_batch_size": 4, "micro_batch_size": 4,
                                             "zero_stage": 1, "precision": "fp32", "log_model": False},
                   tracking={"enabled": False})
    raw["name"] = "golden"
    cfg = tmp_path / "golden.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    for stage in ("tokenizer", "prepare", "train"):
        assert cli.main(["run", str(cfg), "--only", stage]) == 0
    actual = {}
    for stage, patterns in OUTPUTS.items():
        (folder,) = [p for p in (root / stage).iterdir() if (p / "_COMPLETE.json").is_file()]
        actual[stage] = output_hash(folder, patterns)
    versions = {s.name: s.version for s in STAGES}
    problems = golden_problems(actual, versions)
    assert not problems, "\n".join(problems)
