"""An MLflow outage never kills a run: a real `mlflow server` is stopped (and maybe started again on the same
port) while the pipeline runs on real Ray and DeepSpeed; every stage must still commit, what was logged during
the outage must reach MLflow once the server is back, anything that never did must be reported in one line, a
Ray Train worker restart must not add runs, and an unreachable tracking URI at start is one clear line before
any work."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from pipeline import cli
from pipeline.tracking.mlflow import StepLogger, Tracker
from tests.conftest import tiny_raw
from tests.servers import MlflowServer, free_port

TRAIN = {"steps": 6, "checkpoint_every": 3, "log_every": 1, "log_model": True}


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _runs(uri: str, experiment: str = "tiny") -> list:
    from mlflow.entities import ViewType

    c = _client(uri)
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], run_view_type=ViewType.ALL) if exp else []


def _steps(uri: str, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in _client(uri).get_metric_history(run_id, key))


def _committed(root: Path, stage: str) -> dict:
    (marker,) = (root / stage).glob("*/_COMPLETE.json")
    return json.loads(marker.read_text())


def _wait_for(what: str, condition: Callable[[], bool], timeout: float = 600.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(0.2)


@pytest.fixture
def config_file(pipeline_config) -> Callable[..., tuple[str, Path]]:
    return lambda **train: pipeline_config(**{**TRAIN, **train})


class Outage(threading.Thread):
    """Stops the server once the train run exists, while the driver is held before the train stage runs (the
    `stage:train:pause` fault in `faults_dir`), and only then lets training start: every training step happens
    during the outage however fast Ray Train starts. With `restart_after_step` (a `train.step:K:pause` fault)
    it starts the server again once training is held after step K's checkpoint, then lets training go on;
    without it the server stays down."""

    def __init__(self, server: MlflowServer, faults_dir: Path, *, restart_after_step: bool = False):
        super().__init__(daemon=True)
        self.server, self.faults_dir, self.restart = server, faults_dir, restart_after_step
        self.stopped_ms = self.restarted_ms = 0
        self.error: BaseException | None = None

    def _release(self, held: str) -> None:
        (self.faults_dir / f"llmpipe-release-{held}").touch()

    def run(self) -> None:
        try:
            _wait_for("the train stage to be held", lambda: (self.faults_dir / "llmpipe-fault-stage-train").exists())
            _wait_for("the train run", lambda: any(r.data.tags.get("stage") == "train" for r in _runs(self.server.uri)))
            self.server.stop()
            self.stopped_ms = int(time.time() * 1000)
            self._release("stage-train")
            if self.restart:
                _wait_for("training to pause", lambda: any(self.faults_dir.glob("llmpipe-fault-train.step-*")))
                self.restarted_ms = int(time.time() * 1000)
                self.server.start()
                (held,) = self.faults_dir.glob("llmpipe-fault-train.step-*")
                self._release(held.name.removeprefix("llmpipe-fault-"))
        except BaseException as e:  # noqa: BLE001 - re-raised by the test after join()
            self.error = e


def _tracking_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pipeline.tracking" and r.levelno == logging.WARNING]


@pytest.mark.slow
def test_a_server_outage_during_training_is_replayed_when_it_returns_and_every_stage_commits(
        config_file, mlflow_server, monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    # the driver waits before train until the server is down; training waits after step 3 until it is back
    monkeypatch.setenv("LLMPIPE_FAULTS", "stage:train:pause,train.step:3:pause")
    monkeypatch.setenv("LLMPIPE_FAULTS_DIR", str(tmp_path))
    cfg, root = config_file()
    outage = Outage(mlflow_server, tmp_path, restart_after_step=True)
    outage.start()
    assert cli.main(["run", cfg]) == 0
    outage.join(timeout=60)
    assert outage.error is None and outage.restarted_ms, outage.error

    manifests = {s: _committed(root, s) for s in ("tokenizer", "prepare", "train", "evaluate", "decode")}
    runs = _runs(mlflow_server.uri)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["stage"] for r in children) == sorted(manifests)  # one child per stage, no duplicate
    assert all(r.info.status == "FINISHED" for r in [parent, *children])
    train = next(r for r in children if r.data.tags["stage"] == "train")
    assert manifests["train"]["mlflow_run_id"] == train.info.run_id
    assert "model_uri" in train.data.tags  # the model was logged (queued while the server was down)
    history = _client(mlflow_server.uri).get_metric_history(train.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
    # steps 1-3 were measured while the server was down: they reached MLflow only by being replayed
    assert sorted(m.step for m in history if outage.stopped_ms <= m.timestamp < outage.restarted_ms) == [1, 2, 3]
    assert not any("did not record" in w for w in _tracking_warnings(caplog))


@pytest.mark.slow
def test_a_server_that_never_returns_costs_only_tracking_and_the_loss_is_reported_in_one_line(
        config_file, mlflow_server, monkeypatch, caplog, ray_worker_output, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("LLMPIPE_FAULTS", "stage:train:pause")  # the driver waits before train until the server is down
    monkeypatch.setenv("LLMPIPE_FAULTS_DIR", str(tmp_path))
    cfg, root = config_file()
    outage = Outage(mlflow_server, tmp_path)
    outage.start()
    assert cli.main(["run", cfg, "--only", "train"]) == 0
    outage.join(timeout=60)
    assert outage.error is None and outage.stopped_ms, outage.error

    manifest = _committed(root, "train")
    assert (root / "train" / manifest["fingerprint"][:16] / "model.safetensors").is_file()
    train_id = manifest["mlflow_run_id"]  # the run was created before the outage
    (report,) = [w for w in _tracking_warnings(caplog) if "did not record" in w]
    assert report.startswith(f"MLflow at {mlflow_server.uri} did not record: ") and "\n" not in report
    assert f"train run {train_id}: " in report and "the logged model, its end status" in report
    assert "parent run " in report and "Connection refused" in report
    # rank 0 reports the step points it could not send in its own line (Ray forwards it to the console)
    assert f"did not record: run {train_id}: " in ray_worker_output()
    # 7 metrics x 6 steps, and the run's time costs (startup_s, steps_s, checkpoint_s) with the last step
    assert f"run {train_id}: 45 metric points (steps 1-6)" in ray_worker_output()

    mlflow_server.start()  # look at what MLflow really has: what the report says is missing is missing
    run = _client(mlflow_server.uri).get_run(train_id)
    assert run.info.status == "RUNNING" and "model_uri" not in run.data.tags
    assert _steps(mlflow_server.uri, train_id) == []  # every step was measured during the outage


@pytest.mark.slow
def test_a_restarted_training_worker_keeps_one_parent_run_and_one_train_run(
        config_file, tracking_uri, monkeypatch, tmp_path):
    monkeypatch.setenv("LLMPIPE_FAULTS", "train.step:3:exit")  # rank processes die after step 3's checkpoint
    monkeypatch.setenv("LLMPIPE_FAULTS_DIR", str(tmp_path))
    cfg, root = config_file(max_failures=1, log_model=False)
    assert cli.main(["run", cfg, "--only", "train"]) == 0
    assert (tmp_path / "llmpipe-fault-train.step-3").exists()  # a worker really died and Ray Train restarted

    runs = _runs(tracking_uri)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    (train,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 2 and train.data.tags["stage"] == "train"
    assert parent.info.status == train.info.status == "FINISHED"
    assert _committed(root, "train")["mlflow_run_id"] == train.info.run_id
    assert _steps(tracking_uri, train.info.run_id) == [1, 2, 3, 4, 5, 6]  # each step once, across the restart


def test_an_unreachable_tracking_uri_at_start_is_one_line_exit_2_and_writes_nothing(corpus_dir, tmp_path, monkeypatch,
                                                                                   capsys):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    root = tmp_path / "store"
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_raw(corpus_dir, root)))
    assert cli.main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"llmpipe: error: MLflow tracking URI {uri} cannot be used")
    assert "set tracking.enabled: false" in err and "MLFLOW_TRACKING_URI" in err
    assert not root.exists() or not any(root.iterdir())


def test_runs_and_calls_made_during_an_outage_are_created_and_replayed_when_the_server_returns(mlflow_server, caplog):
    tracker = Tracker("outage", mlflow_server.uri)
    parent = tracker.start_parent("invocation", {"train.lr": 0.001}, {})
    child = tracker.start_child("evaluate", {}, {})
    steps = StepLogger(mlflow_server.uri, child, max_pending_points=3)  # room for 3 points while MLflow is down
    mlflow_server.stop()

    late = tracker.start_child("train", {"train.steps": 4}, {"fingerprint": "f" * 64})
    assert late.startswith("pending-") and tracker.mlflow_id(late) is None
    assert tracker.worker_run_id(late) is None  # Ray workers cannot log into a run that does not exist yet
    for step in (1, 2):
        tracker.log_metrics(late, {"train/loss": 5.0 - step}, step=step)
    tracker.log_text(late, "written during the outage", "note.txt")
    tracker.set_tags(late, {"model_uri": "models:/m/1"})
    tracker.end(late)
    for step in range(1, 6):
        steps.log_metrics({"val/loss": float(step)}, step=step)

    mlflow_server.start()
    steps.log_metrics({"val/loss": 6.0}, step=6)
    dropped = steps.close()
    tracker.end(child)
    tracker.end(parent)

    c = _client(mlflow_server.uri)
    train_id = tracker.mlflow_id(late)
    run = c.get_run(train_id)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["stage"] == "train"
    assert run.data.params == {"train.steps": "4"} and run.data.tags["model_uri"] == "models:/m/1"
    assert run.info.status == "FINISHED" and _steps(mlflow_server.uri, train_id) == [1, 2]
    assert [a.path for a in c.list_artifacts(train_id)] == ["note.txt"]
    assert len([r for r in _runs(mlflow_server.uri, "outage") if r.data.tags.get("stage") == "train"]) == 1
    assert c.get_run(parent).info.status == "FINISHED"
    assert tracker.report == f"MLflow at {mlflow_server.uri} did not record: train run {train_id}: what its Ray " \
                             "workers log (last error: Connection refused)"
    # the step logger kept the first 3 points of the outage, replayed them, and reports the 2 it had no room for
    assert _steps(mlflow_server.uri, child, "val/loss") == [1, 2, 3, 6]
    assert dropped == f"MLflow at {mlflow_server.uri} did not record: run {child}: 2 metric points (steps 4-5) " \
                      "(last error: Connection refused)"


def test_the_null_tracker_has_every_public_method_of_the_tracker_with_the_same_signature():
    import inspect

    from pipeline.tracking.mlflow import NullStepLogger, NullTracker

    for real, null in ((Tracker, NullTracker), (StepLogger, NullStepLogger)):
        public = {n for n, f in inspect.getmembers(real, inspect.isfunction) if not n.startswith("_")}
        assert public <= set(dir(null)), public - set(dir(null))
        for name in public:
            assert inspect.signature(getattr(real, name)) == inspect.signature(getattr(null, name)), name
