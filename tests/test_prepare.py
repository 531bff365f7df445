"""The tokenizer and prepare stages on real Ray: determinism, retries, dedup, bad input, statistics."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline import cli
from tests.conftest import tiny_raw

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mixed_corpus(corpus_dir, tmp_path_factory) -> Path:
    """The markdown plays plus one large JSONL (split across tasks) holding 25 exact duplicates."""
    root = tmp_path_factory.mktemp("mixed")
    for p in sorted(corpus_dir.glob("*.md"))[:20]:
        shutil.copy(p, root / p.name)
    lines = [json.dumps({"text": f"Letter {i}: " + "the king rides to the sea and speaks. " * 8}) for i in range(500)]
    lines += [lines[i * 7] for i in range(25)]  # exact duplicates, later in the file
    (root / "letters.jsonl").write_text("\n".join(lines) + "\n")
    (root / "notes.csv").write_text("not an input\n")  # ignored, and said so
    return root


def _config(tmp_path: Path, corpus: Path, name: str = "c", **data) -> str:
    raw = tiny_raw(corpus, tmp_path / f"store-{name}", data={"shard_size_mb": 0.02, **data})
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return str(p)


def _stage_dir(cfg: str, stage: str) -> Path:
    root = Path(yaml.safe_load(open(cfg))["store"]["root"])
    (d,) = [p for p in (root / stage).iterdir() if (p / "_COMPLETE.json").exists()]
    return d


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.arrow"))} | {
        "shards.json": hashlib.sha256((folder / "shards.json").read_bytes()).hexdigest(),
        "tokenizer": hashlib.sha256((folder.parent.parent / "tokenizer").glob("*/tokenizer.json").__next__().read_bytes()).hexdigest()}


def test_same_bytes_with_one_or_three_tasks_and_after_a_killed_task(ray_local, tracking_uri, mixed_corpus, tmp_path, monkeypatch):
    outs = {}
    for name, tasks in (("one", 1), ("three", 3)):
        cfg = _config(tmp_path, mixed_corpus, name, num_tasks=tasks)
        assert cli.main(["run", cfg, "--only", "tokenizer"]) == 0
        assert cli.main(["run", cfg, "--only", "prepare"]) == 0
        outs[name] = _digest(_stage_dir(cfg, "prepare"))
    assert len([k for k in outs["one"] if k.endswith(".arrow")]) >= 10  # many shards, so 3 tasks really split the work
    assert outs["one"] == outs["three"]

    # a worker process dies on its first attempt at shard 1: Ray retries it, the output is unchanged
    monkeypatch.setenv("LLMPIPE_FAULTS", "prepare.shard:1:exit")
    monkeypatch.setenv("LLMPIPE_FAULTS_DIR", str(tmp_path))
    cfg = _config(tmp_path, mixed_corpus, "killed", num_tasks=3)
    assert cli.main(["run", cfg, "--only", "tokenizer"]) == 0
    assert cli.main(["run", cfg, "--only", "prepare"]) == 0
    assert (tmp_path / "llmpipe-fault-prepare.shard-1").exists()  # the fault really fired
    assert _digest(_stage_dir(cfg, "prepare")) == outs["one"]


def test_statistics_dedup_and_tracking(ray_local, tracking_uri, mixed_corpus, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    cfg = _config(tmp_path, mixed_corpus, "stats")
    assert cli.main(["run", cfg, "--only", "tokenizer"]) == 0
    assert cli.main(["run", cfg, "--only", "prepare"]) == 0
    folder = _stage_dir(cfg, "prepare")
    m = json.loads((folder / "shards.json").read_text())
    assert m["filtered"] == {"duplicate": 25}
    t = m["totals"]
    assert t["train"]["docs"] + t["val"]["docs"] == 20 + 500 and t["val"]["docs"] > 0
    assert sum(m["length_histogram"]["counts"]) == 520 and m["dtype"] == "uint16"
    assert (folder / "doc_lengths.png").read_bytes()[:4] == b"\x89PNG"
    client = MlflowClient(tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], filter_string="tags.stage = 'prepare'")[0]
    assert run.data.metrics["filtered_duplicate"] == 25 and run.data.metrics["docs"] == 520
    assert run.data.metrics["ignored_files"] == 1
    assert "[prepare] warning: data.inputs: ignored 1 file of other types (1 .csv); inputs are .txt, .md" in capsys.readouterr().out
    assert 0.05 < run.data.metrics["tokens_per_byte"] < 1.0
    assert {"shards.json", "doc_lengths.png", "skipped.jsonl"} <= {a.path for a in client.list_artifacts(run.info.run_id)}

    # dedup off: the duplicates are kept
    assert cli.main(["run", cfg, "data.dedup=false", "--only", "prepare"]) == 0
    root = Path(yaml.safe_load(open(cfg))["store"]["root"]) / "prepare"
    totals = [json.loads((d / "shards.json").read_text())["totals"] for d in root.iterdir()]
    assert sorted(x["train"]["docs"] + x["val"]["docs"] for x in totals) == [520, 545]


def test_bad_input_raise_commits_nothing_and_skip_counts_exactly(ray_local, tracking_uri, mixed_corpus, tmp_path, capsys):
    corpus = tmp_path / "bad"
    shutil.copytree(mixed_corpus, corpus)
    with open(corpus / "letters.jsonl", "ab") as f:
        f.write(b'{"text": "caf\xe9"}\n{"text": \n{"body": "no text field"}\n')
    cfg = _config(tmp_path, corpus, "raise")
    assert cli.main(["run", cfg]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (MLflow may log its DB creation above it)
    assert last.startswith("llmpipe: error: ") and last.endswith("letters.jsonl:526: invalid UTF-8 at byte 13 of the line")
    root = Path(yaml.safe_load(open(cfg))["store"]["root"])
    assert not list(root.glob("*/*/_COMPLETE.json"))  # nothing half-done is committed

    cfg = _config(tmp_path, corpus, "skip", on_error="skip")
    assert cli.main(["run", cfg, "--only", "tokenizer"]) == 0
    assert cli.main(["run", cfg, "--only", "prepare"]) == 0
    folder = _stage_dir(cfg, "prepare")
    assert json.loads((folder / "shards.json").read_text())["skipped"] == {"invalid_utf8": 1, "malformed_json": 1, "missing_field": 1}
    listed = [json.loads(line) for line in (folder / "skipped.jsonl").read_text().splitlines()]
    assert listed == [{"where": f"{corpus}/letters.jsonl:526", "reason": "invalid_utf8"},
                      {"where": f"{corpus}/letters.jsonl:527", "reason": "malformed_json"},
                      {"where": f"{corpus}/letters.jsonl:528", "reason": "missing_field"}]


def test_status_names_the_changed_input_files(ray_local, tracking_uri, mixed_corpus, tmp_path, capsys):
    corpus = tmp_path / "changing"
    shutil.copytree(mixed_corpus, corpus)
    cfg = _config(tmp_path, corpus, "status")
    assert cli.main(["run", cfg, "--only", "tokenizer"]) == 0
    assert cli.main(["run", cfg, "--only", "prepare"]) == 0
    capsys.readouterr()
    (corpus / "new_play.md").write_text("# A new play\n\nKING:\nHello.\n")
    assert cli.main(["status", cfg]) == 0
    out = capsys.readouterr().out
    assert "data.inputs.new_play.md: <unset> -> 27 bytes, sha256 " in out  # named relative to the input folder
    assert "prepare    stale" in out and "tokenizer  stale" in out


def test_zero_documents_is_always_an_error(ray_local, tracking_uri, tmp_path, capsys):
    corpus = tmp_path / "allbad"
    corpus.mkdir()
    (corpus / "x.jsonl").write_text('{"body": 1}\n{"body": 2}\n')
    cfg = _config(tmp_path, corpus, "zero", on_error="skip")
    assert cli.main(["run", cfg]) == 2
    assert "tokenizer: no documents to train on" in capsys.readouterr().err
