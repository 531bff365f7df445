"""Task evaluation: the scoring math on a model whose probabilities are written down, bad task files as one line
naming file:line, the fingerprint (content, not path; nothing else changes), and the stage on a real Ray and MLflow."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from model.tasks import (
    Question,
    TaskFormatError,
    encode_pair,
    loglikelihoods,
    read_questions,
    score_task,
)
from pipeline import cli
from pipeline.engine.plan import plan
from pipeline.engine.store import ArtifactStore
from pipeline.stages import STAGES
from tests.conftest import tiny_raw
from tests.test_decode import make_model_dir

CHARS = " ab"
# next-character probabilities after ' ', 'a', 'b' (rows) of ' ', 'a', 'b' (columns)
TABLE = [[0.02, 0.08, 0.9], [0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]


class Bigram(torch.nn.Module):
    """A character bigram model with the table above: every probability of the tests can be written by hand."""

    def __init__(self, max_seq_len: int = 16):
        super().__init__()
        self.logp = torch.nn.Parameter(torch.tensor(TABLE).log())
        self.config = SimpleNamespace(max_seq_len=max_seq_len)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.logp[idx]  # (B, T, vocab): the next character depends on this one only


def encode(text: str) -> list[int]:
    return [CHARS.index(c) for c in text]


def p(*path: str) -> float:
    """The probability of the characters path[1:] after path[0]."""
    out = 1.0
    for a, b in itertools.pairwise(path):
        out *= TABLE[CHARS.index(a)][CHARS.index(b)]
    return out


def test_multiple_choice_accuracy_length_normalised_accuracy_and_standard_errors_by_hand():
    qs = [Question("a", ("b", "bbbb"), gold=1), Question("b", ("a", "b"), gold=1)]
    r = score_task(Bigram(), encode, qs, "multiple_choice")
    # continuations are " " + choice: "a" -> " b" is p(a, ' ') p(' ', b); "a" -> " bbbb" adds p(b, b) three times
    lls = [[math.log(p("a", " ", "b")), math.log(p("a", " ", "b", "b", "b", "b"))],
           [math.log(p("b", " ", "a")), math.log(p("b", " ", "b"))]]
    for row, want in zip(r["records"], lls):
        assert row["loglikelihoods"] == pytest.approx(want, abs=1e-5)
    # question 1: " b" wins on log-likelihood (-0.80 > -1.47), " bbbb" per character (-1.47 / 4 > -0.80 / 1)
    assert [(x["pred"], x["pred_norm"]) for x in r["records"]] == [(0, 1), (1, 1)]
    m = r["metrics"]
    assert (m["acc"], m["acc_norm"], m["chance"], m["n"]) == (0.5, 1.0, 0.5, 2.0)
    assert m["acc_stderr"] == pytest.approx(math.sqrt(0.5) / math.sqrt(2))  # sample std of [0, 1] / sqrt(n)
    assert m["acc_norm_stderr"] == 0.0


def test_cloze_accuracy_is_greedy_decoding_of_the_last_word_and_perplexity_is_of_the_target():
    qs = read_questions(['{"text": "a a b"}', '{"text": "b a"}'], "cloze", source="c.jsonl")
    assert qs == [Question("a a", (" b",), 0), Question("b", (" a",), 0)]
    r = score_task(Bigram(), encode, qs, "cloze")
    # greedy after 'a' is ' ' (0.5), after ' ' is 'b' (0.9): " b" is greedy; after 'b' it is 'b', so " a" is not
    assert [x["acc"] for x in r["records"]] == [1.0, 0.0]
    m = r["metrics"]
    assert m["acc"] == 0.5 and m["chance"] == 0.5 and "acc_norm" not in m  # chance: the most common target's share
    assert m["ppl"] == pytest.approx(math.exp(-(math.log(p("a", " ", "b")) + math.log(p("b", " ", "a"))) / 2))


def test_the_context_s_trailing_space_moves_to_the_continuation_and_long_pairs_keep_their_end():
    assert encode_pair(encode, "ab  ", "a") == (encode("ab"), encode("  a"))
    # a window of 3 inputs: "babab" + " a" keeps its last 4 tokens, "ab" + " a" -> the same scores as the full pair
    (full,), (cut,) = (loglikelihoods(Bigram(m), [(encode("babab"), encode(" a"))], max_len=m) for m in (16, 3))
    assert cut == full and cut[0] == pytest.approx(math.log(p("b", " ", "a")))


def test_a_batch_scores_each_pair_as_alone():
    pairs = [(encode("ab"), encode(" ba")), (encode("a"), encode(" b")), (encode("bbbab"), encode(" a"))]
    alone = [loglikelihoods(Bigram(), [x], max_len=16)[0] for x in pairs]
    assert loglikelihoods(Bigram(), pairs, max_len=16, batch_size=2) == alone


def test_arc_records_become_lm_eval_s_question_answer_prompt():
    line = json.dumps({"question": "Which?", "choices": {"text": ["x", "y", "z"], "label": ["A", "B", "C"]},
                       "answerKey": "C"})
    assert read_questions([line], "multiple_choice", source="arc.jsonl") == [
        Question("Question: Which?\nAnswer:", ("x", "y", "z"), 2)]


@pytest.mark.parametrize("kind, lines, message", [
    ("multiple_choice", ['{"ctx": "a", "endings": ["b", "c"], "label": 0}', '{"ctx": "a", "endings": ["b", "c"]}'],
     'f.jsonl:2: no "label" (the index of the right ending)'),
    ("multiple_choice", ['{"ctx": "a", "endings": ["b", "c"], "label": 2}'], 'f.jsonl:1: "label" 2 is out of range for 2 endings'),
    ("multiple_choice", ['{"ctx": "a", "endings": ["b", "c"], "label": "x"}'], 'f.jsonl:1: "label" must be an integer'),
    ("multiple_choice", ['', '{"ctx": "a", "endings": ["b", "c"], "label": 1', ''], "f.jsonl:2: invalid JSON"),
    ("multiple_choice", ['{"question": "q", "choices": {"text": ["b", "c"], "label": ["A", "B"]}, "answerKey": "D"}'],
     'f.jsonl:1: "answerKey" "D" is not one of the labels ["A", "B"]'),
    ("multiple_choice", ['{"ctx": "a", "endings": ["b"], "label": 0}'], 'f.jsonl:1: "endings" must be a list of at least 2'),
    ("multiple_choice", ['{"text": "a b"}'], "f.jsonl:1: expected {\"ctx\", \"endings\", \"label\"}"),
    ("cloze", ['{"text": "word"}'], 'f.jsonl:1: "text" needs a context and a last word'),
    ("cloze", ['["a b"]'], "f.jsonl:1: expected a JSON object, got list"),
    ("cloze", ["", " "], "f.jsonl: holds no records"),
])
def test_a_bad_record_is_one_error_naming_file_and_line(kind, lines, message):
    with pytest.raises(TaskFormatError) as e:
        read_questions(lines, kind, source="f.jsonl")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_continuation_longer_than_the_context_is_refused_naming_the_record():
    with pytest.raises(TaskFormatError, match=r"t: record 2: a continuation of 5 tokens does not fit the model's context of 4"):
        score_task(Bigram(4), encode, [Question("a", ("b", "a"), 0), Question("a", ("bbbb", "a"), 0)],
                   "multiple_choice", source="t")


# --- the stage: config, fingerprint, errors, a run ---------------------------------------------------

MC = [{"ctx": "the king and", "endings": ["queen", "fool sea", "night"], "label": 0},
      {"ctx": "a song about", "endings": ["night", "horses"], "label": 1},
      {"ctx": "ladies read letters by the", "endings": ["fire", "sea", "castle", "song"], "label": 0}]
CLOZE = [{"text": "lords ride horses to the sea"}, {"text": "the fool who answers with a song"},
         {"text": "where lords ride horses to the sea"}]


def write(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def task_files(tmp_path: Path) -> dict[str, Path]:
    return {"mc": write(tmp_path / "mc.jsonl", MC), "cloze": write(tmp_path / "cloze.jsonl", CLOZE)}


def tasks_section(files: dict[str, Path], **kw) -> dict:
    return {"suite": [{"name": "mc", "path": str(files["mc"]), "kind": "multiple_choice"},
                      {"name": "cloze", "path": str(files["cloze"]), "kind": "cloze", "limit": 2}], **kw}


def fingerprints(cfg) -> dict[str, str]:
    return {it.stage.name: it.fingerprint for it in plan(cfg, ArtifactStore(cfg.store.root), STAGES)}


def test_the_tasks_stage_runs_only_with_a_tasks_section_and_changes_no_other_fingerprint(tiny_config, task_files):
    without, with_tasks = fingerprints(tiny_config()), fingerprints(tiny_config(tasks=tasks_section(task_files)))
    assert "tasks" not in without and with_tasks.pop("tasks") and with_tasks == without


def test_task_file_content_not_path_or_batch_size_enters_the_fingerprint(tiny_config, task_files, tmp_path):
    base = fingerprints(tiny_config(tasks=tasks_section(task_files)))
    (tmp_path / "elsewhere").mkdir()
    moved = {k: write(tmp_path / "elsewhere" / p.name, MC if k == "mc" else CLOZE) for k, p in task_files.items()}
    assert fingerprints(tiny_config(tasks=tasks_section(moved, batch_size=3))) == base
    write(task_files["mc"], [*MC, MC[0]])
    edited = fingerprints(tiny_config(tasks=tasks_section(task_files)))
    assert edited["tasks"] != base["tasks"] and {k: v for k, v in edited.items() if k != "tasks"} == \
        {k: v for k, v in base.items() if k != "tasks"}


def test_task_names_are_unique_and_name_metrics(tiny_config, task_files):
    section = tasks_section(task_files)
    section["suite"][1]["name"] = "mc"
    with pytest.raises(Exception, match=r"task names must be unique .* repeated: mc"):
        tiny_config(tasks=section)
    section["suite"][1]["name"] = "a b"
    with pytest.raises(Exception, match=r"tasks\.suite\.1\.name"):
        tiny_config(tasks=section)


@pytest.mark.parametrize("bad, message", [
    ("missing", "tasks.suite[0].path: {path} not found"),
    ('{"ctx": "a", "endings": ["b", "c"], "label": 0}\n{"ctx": "a", "endings": ["b", "c"], "label": 5}\n',
     '{path}:2: "label" 5 is out of range for 2 endings'),
])
def test_a_bad_task_file_stops_the_plan_with_one_line(tmp_path, corpus_dir, task_files, capsys, bad, message):
    path = tmp_path / "bad.jsonl"
    if bad != "missing":
        path.write_text(bad)
    raw = tiny_raw(corpus_dir, tmp_path / "artifacts", tasks={"suite": [{"name": "t", "path": str(path),
                                                                          "kind": "multiple_choice"}]})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert cli.main(["run", str(tmp_path / "c.yaml"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(path=path) in err


@pytest.mark.slow
def test_the_stage_scores_on_ray_logs_to_mlflow_and_compare_shows_it(ray_local, tiny_config, task_files, tmp_path,
                                                                    tracking_uri, capsys):
    """Tokenizer and train folders are committed directly (a tiny random model): `--only tasks` runs the stage."""
    cfg = tiny_config(tasks=tasks_section(task_files))
    store = ArtifactStore(cfg.store.root)
    fps = fingerprints(cfg)
    for stage in ("tokenizer", "train"):
        make_model_dir(store.working_dir(stage, fps[stage], keep_partial=False))
        store.commit(stage, fps[stage], store.local_dir(stage, fps[stage]), {"stage": stage, "upstream": {}})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny_raw(Path(cfg.data.inputs[0]), Path(cfg.store.root),
                                                             tasks=tasks_section(task_files))))
    assert cli.main(["run", str(tmp_path / "c.yaml"), "--only", "tasks"]) == 0
    out = capsys.readouterr().out
    assert "task mc: acc " in out and "vs chance 0.361, n=3" in out  # (1/3 + 1/2 + 1/4) / 3
    assert "task cloze: acc " in out and "n=2" in out
    (folder,) = [p for p in (Path(cfg.store.root) / "tasks").iterdir() if (p / "_COMPLETE.json").is_file()]
    result = json.loads((folder / "tasks.json").read_text())
    assert [len(result[t]["records"]) for t in ("mc", "cloze")] == [3, 2]
    metrics = json.loads((folder / "_COMPLETE.json").read_text())["metrics"]
    (committed,) = [line for line in out.splitlines() if line.startswith("[tasks] committed in")]
    shown = [kv.split("=")[0] for kv in committed.split()[4:]]  # acc and chance come first
    assert shown[:4] == ["tasks/cloze/acc", "tasks/mc/acc", "tasks/cloze/chance", "tasks/mc/chance"]
    assert metrics["tasks/mc/acc"] == result["mc"]["metrics"]["acc"]

    # the same task on the model directly gives the same numbers (the stage adds no scoring of its own)
    from model import load_model
    from tokenization.bpe import load_tokenizer
    model_dir = store.local_dir("train", fps["train"])
    tok = load_tokenizer(model_dir / "tokenizer.json")
    direct = score_task(load_model(model_dir)[0], lambda s: tok.encode(s).ids,
                        read_questions(task_files["mc"].read_text().splitlines(), "multiple_choice", source="mc"),
                        "multiple_choice")
    assert direct["metrics"] == result["mc"]["metrics"]

    # `llmpipe compare` of the invocation shows the task accuracies beside evaluate's metrics
    from pipeline.tracking.mlflow import Tracker
    tracker = Tracker("tiny", tracking_uri)
    parent = tracker.start_parent("both", {}, {})
    for stage, values in (("evaluate", {"val_loss": 5.0}), ("tasks", metrics)):
        child = tracker.start_child(stage, {}, {"fingerprint": stage})
        tracker.log_metrics(child, values)
        tracker.end(child)
    tracker.end(parent)
    assert cli.main(["compare", parent]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert names[:3] == ["val_loss", "tasks/cloze/acc", "tasks/cloze/acc_stderr"] and "tasks/mc/acc_norm" in names
