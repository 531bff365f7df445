"""What `llmpipe run` prints and leaves behind, as a user runs it: a fresh process on real Ray, DeepSpeed and MLflow.

One quiet run of the tiny pipeline (stdout a pipe, as in CI or `ray job` logs) is shared by the tests of this
module: its terminal output, its log files, and its MLflow runs (datasets, descriptions, system metrics); a
second, verbose run retrains only `train`. Its Ray temp folder names a stopped cluster as the machine's latest
(what `ray start` then `ray stop`-less shutdowns leave behind), which Ray Train's placement-group cleaner used to
query instead of the run's own Ray: a traceback in the middle of a run that succeeded.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_raw

pytestmark = pytest.mark.slow
STAGES = ("tokenizer", "prepare", "train", "evaluate", "decode")
OUR_LINES = [  # every line `llmpipe run` prints, by kind
    r"plan for tiny \(store \S+\):",
    r"  (tokenizer|prepare|train|evaluate|decode) +(missing|cached|stale).*",
    r"logs: \S+ \(Ray, DeepSpeed and MLflow output, a file per stage; -v shows it here\)",
    r"MLflow: experiment 'tiny', parent run [0-9a-f]{32} \(sqlite:///\S+\)",
    (r"\[(tokenizer|prepare|train|evaluate|decode)\] (running|committed in|cached|training a|hashed|tokenized|step"
     r"|scoring|\d+ prompt\(s\)) .*"),
    r"validation loss \d+\.\d+ \(ppl \d+\.\d+, \d+\.\d+ bits/byte\) vs unigram \d+\.\d+",
]


def _llmpipe(run: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "run", str(run["config"]), *args], capture_output=True,
                          text=True, timeout=1200, check=False, env=run["env"], cwd=run["root"])


@pytest.fixture(scope="module")
def quiet_run(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("run-output")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(corpus_dir, root / "store")))
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths live under it
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")  # a cluster that is gone
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "RAY_TMPDIR": str(ray_tmp),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("RAY_ADDRESS", None)
    run = {"root": root, "config": config, "env": env, "uri": env["MLFLOW_TRACKING_URI"]}
    run["proc"] = _llmpipe(run)
    return run


def test_a_run_prints_only_the_pipelines_own_lines(quiet_run):
    proc = quiet_run["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) <= 30, proc.stdout
    strange = [line for line in lines if not any(re.fullmatch(p, line) for p in OUR_LINES)]
    assert strange == [], "\n".join(strange)
    assert proc.stderr == ""
    assert [line.split("]")[0][1:] for line in lines if "] committed in " in line] == list(STAGES)


def test_library_output_is_in_one_log_per_stage_named_in_the_output(quiet_run):
    (logs_line,) = [line for line in quiet_run["proc"].stdout.splitlines() if line.startswith("logs: ")]
    folder = Path(logs_line.split()[1])
    assert folder.parent == quiet_run["root"] / "store" / "_logs"
    logs = {p.stem: p.read_text(errors="replace") for p in folder.glob("*.log")}
    assert set(logs) == {"run", *STAGES}
    assert "Started a local Ray instance" in logs["run"]  # Ray's own logging
    assert "RayTrainWorker" in logs["train"] and "deepspeed" in logs["train"].lower()  # the workers, forwarded
    assert re.search(r"step 6/6 \(100%\) loss", logs["train"]) is None  # rank 0's progress went to the display


def test_a_run_that_succeeds_shows_no_traceback_though_another_cluster_was_the_latest(quiet_run):
    proc = quiet_run["proc"]
    logs = "".join(p.read_text(errors="replace") for p in (quiet_run["root"] / "store").glob("_logs/*/*.log"))
    assert proc.returncode == 0 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    # Ray Train's placement-group cleaner asked the stopped cluster about the run's controller, hung on it (so its
    # stop timed out: a traceback of the controller) or timed out itself (a traceback of its thread)
    for sign in ("PlacementGroupCleanerMonitor", "Timed out while waiting for GCS", "Failed to stop PlacementGroupCleaner",
                 "Monitor thread did not exit"):
        assert sign not in proc.stderr and sign not in logs, sign


def test_each_stage_run_has_its_inputs_as_datasets_and_a_description(quiet_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(quiet_run["uri"])
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    fingerprints = {s: r.data.tags["fingerprint"] for s, r in children.items()}

    train_inputs = {d.dataset.name: d for d in children["train"].inputs.dataset_inputs}
    assert list(train_inputs) == ["prepare", "tokenizer"]  # the data first: the runs table shows the first one
    prepare = train_inputs["prepare"]
    assert prepare.dataset.digest == fingerprints["prepare"][:16]
    assert {t.key: t.value for t in prepare.tags} == {"mlflow.data.context": "training"}
    profile = json.loads(prepare.dataset.profile)
    assert profile["docs"] == 40 and profile["shards"] >= 1 and profile["tokens"] > 1000
    assert json.loads(prepare.dataset.source)["uri"].endswith(f"/prepare/{fingerprints['prepare'][:16]}")
    assert {d.dataset.name for d in children["evaluate"].inputs.dataset_inputs} == {"tokenizer", "prepare", "train"}
    assert children["tokenizer"].inputs.dataset_inputs == []

    for stage, run in children.items():
        note = run.data.tags["mlflow.note.content"]
        assert note.startswith(f"**{stage}** ran in ") and fingerprints[stage][:16] in note
        assert f"{stage}.log" in note
    assert "final_loss" in children["train"].data.tags["mlflow.note.content"]
    summary = parent.data.tags["mlflow.note.content"]
    assert all(f"**{s}** ran in" in summary for s in STAGES) and str(quiet_run["root"] / "store") in summary


def test_the_train_run_has_system_metrics(quiet_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(quiet_run["uri"])
    exp = client.get_experiment_by_name("tiny")
    (train,) = client.search_runs([exp.experiment_id], "tags.stage = 'train'")
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_percentage"} <= set(train.data.metrics)
    assert client.get_metric_history(train.info.run_id, "system/system_memory_usage_percentage")[0].value > 0


def test_a_failing_stage_names_its_log_before_the_one_line_error(ray_local, corpus_dir, tmp_path, capsys):
    from tokenizers import Tokenizer, models

    from pipeline import cli

    given = tmp_path / "tokenizer.json"
    Tokenizer(models.BPE()).save(str(given))  # no end-of-text token: the tokenizer stage refuses it when it runs
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(corpus_dir, tmp_path / "store", tokenizer={"path": str(given)},
                                              tracking={"enabled": False})))
    assert cli.main(["run", str(config), "--only", "tokenizer"]) == 2
    out, err = capsys.readouterr()
    (failed,) = [line for line in out.splitlines() if line.startswith("[tokenizer] failed after ")]
    log = Path(re.fullmatch(r"\[tokenizer\] failed after \d+\.\ds \(log: (.+)\)", failed).group(1))
    assert log.name == "tokenizer.log" and log.parent.parent == tmp_path / "store" / "_logs" and log.is_file()
    assert err.count("\n") == 1 and err.startswith(f"llmpipe: error: tokenizer.eos_token '<|endoftext|>' is not a token of {given}")


def test_verbose_shows_the_library_output_and_writes_no_logs(quiet_run):
    before = set((quiet_run["root"] / "store" / "_logs").iterdir())
    proc = _llmpipe(quiet_run, "--force", "train", "-v")
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = proc.stdout + proc.stderr
    assert "RayTrainWorker" in shown and "Started a local Ray instance" in shown
    assert "[train] committed in " in proc.stdout and "logs: " not in proc.stdout
    assert set((quiet_run["root"] / "store" / "_logs").iterdir()) == before
