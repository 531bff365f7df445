"""The optional `index` stage: its place in the plan, its fingerprint, and a real run on local Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline import cli
from pipeline.engine.plan import plan
from pipeline.engine.store import ArtifactStore
from pipeline.stages import STAGES
from tests.conftest import tiny_raw

FACT = "The lighthouse keeper Oswin Marrable painted the lamp room vermilion in 1907."


def _knowledge(root: Path, fact: str = FACT) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(5):
        lines = [f"Note {i}.{j}: the fool sings to the king about horses and the sea." for j in range(12)]
        if i == 2:
            lines[6] = fact
        (root / f"notes_{i}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "more.jsonl").write_text(json.dumps({"text": "The queen reads letters by the fire."}) + "\n")
    return root


def _fps(cfg) -> dict[str, str]:
    return {it.stage.name: it.fingerprint for it in plan(cfg, ArtifactStore(cfg.store.root), STAGES)}


def test_without_an_index_section_the_plan_is_unchanged_and_index_inputs_change_only_index(tiny_config, tmp_path):
    plain = _fps(tiny_config())
    assert list(plain) == ["tokenizer", "prepare", "train", "evaluate", "decode"]
    a = _fps(tiny_config(index={"inputs": [str(_knowledge(tmp_path / "a"))]}))
    b = _fps(tiny_config(index={"inputs": [str(_knowledge(tmp_path / "b", fact=FACT.replace("1907", "1908")))]}))
    assert list(a) == ["tokenizer", "prepare", "train", "index", "evaluate", "decode"]
    assert {n: a[n] for n in plain} == plain  # configuring an index changes no other stage
    assert [n for n in a if a[n] != b[n]] == ["index"]
    # scaling the index out is not a change; what it builds is
    assert _fps(tiny_config(index={"inputs": [str(tmp_path / "a")], "num_tasks": 3}))["index"] == a["index"]
    assert _fps(tiny_config(index={"inputs": [str(tmp_path / "a")], "overlap": 8}))["index"] != a["index"]
    # a dense index reads the trained model: it follows train, and a train change reaches it
    dense = tiny_config(index={"inputs": [str(tmp_path / "a")], "kind": "dense"})
    (item,) = [it for it in plan(dense, ArtifactStore(dense.store.root), STAGES) if it.stage.name == "index"]
    assert set(item.upstream) == {"tokenizer", "train"}


def test_an_empty_knowledge_corpus_is_one_line_naming_index_inputs(tiny_config, tmp_path, capsys):
    from tokenization.inputs import InputError

    (tmp_path / "empty").mkdir()
    cfg = tiny_config(index={"inputs": [str(tmp_path / "empty")]})
    with pytest.raises(InputError, match=r"^index\.inputs: .* matches no files"):
        plan(cfg, ArtifactStore(cfg.store.root), STAGES)


def _write(cfg_path: Path, raw: dict) -> str:
    cfg_path.write_text(yaml.safe_dump(raw))
    return str(cfg_path)


@pytest.mark.slow
def test_the_index_stage_builds_a_searchable_index_identical_for_any_task_count(ray_local, corpus_dir, tmp_path,
                                                                                tracking_uri, capsys):
    from model.retrieval import Retriever

    knowledge = _knowledge(tmp_path / "knowledge")
    root = tmp_path / "store"
    raw = tiny_raw(corpus_dir, root, index={"inputs": [str(knowledge)], "passage_tokens": 32, "overlap": 8,
                                            "num_tasks": 1})
    cfg = _write(tmp_path / "one.yaml", raw)
    assert cli.main(["run", cfg, "--only", "tokenizer"]) == 0
    assert cli.main(["run", cfg, "--only", "index"]) == 0
    (folder,) = [p for p in (root / "index").iterdir() if (p / "_COMPLETE.json").is_file()]
    manifest = json.loads((folder / "_COMPLETE.json").read_text())
    summary = json.loads((folder / "index.json").read_text())
    assert summary["passages"] == manifest["metrics"]["passages"] > 5 and summary["input_files"] == 6
    assert manifest["metrics"]["index_bytes"] > 0 and manifest["metrics"]["build_s"] >= 0
    first = {f: (folder / f).read_bytes() for f in summary["files"]}

    retriever = Retriever.load(folder)
    (hit, *_), = retriever.search(["Who painted the lamp room vermilion?"], 2)
    assert "Marrable" in hit.text and hit.file == "notes_2.txt" and hit.line == 7

    # three tasks instead of one: the same fingerprint and, forced to rebuild, the same bytes
    raw["index"]["num_tasks"] = 3
    cfg3 = _write(tmp_path / "three.yaml", raw)
    assert cli.main(["run", cfg3, "--only", "index", "--force", "index"]) == 0
    (folder3,) = [p for p in (root / "index").iterdir() if (p / "_COMPLETE.json").is_file()]
    assert {f: (folder3 / f).read_bytes() for f in summary["files"]} == first

    # a knowledge corpus of empty files: one line naming the file, or (skipping bad files) naming index.inputs
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("\n")
    raw["index"]["inputs"] = [str(tmp_path / "blank")]
    for on_error, says in (("raise", "a.txt: empty file"), ("skip", "index.inputs: no passages")):
        raw["index"]["on_error"] = on_error
        capsys.readouterr()
        assert cli.main(["run", _write(tmp_path / "blank.yaml", raw), "--only", "index"]) == 2
        (err,) = capsys.readouterr().err.strip().splitlines()
        assert err.startswith("llmpipe: error: ") and says in err, err
