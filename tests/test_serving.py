"""The trained model as an MLflow pyfunc model: logged to a run (left RUNNING), registered, loaded, and (slow)
served by `mlflow models serve` on 127.0.0.1, answering a generation request over HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from model import load_model
from model.generate import SamplingOptions
from pipeline.completion import complete
from pipeline.tracking.models import log_generation_model
from tests.test_decode import make_model_dir
from tokenization.bpe import load_tokenizer


@pytest.fixture
def logged(tmp_path, tracking_uri):
    """A tiny model logged to a RUNNING run in a temp SQLite store (artifacts under tmp_path), registered as 'tiny'."""
    from mlflow.tracking import MlflowClient

    model_dir = make_model_dir(tmp_path / "train", "rope")
    client = MlflowClient(tracking_uri)
    exp = client.create_experiment("serving", artifact_location=(tmp_path / "mlruns").as_uri())
    run = client.create_run(exp)
    uri = log_generation_model(tracking_uri, run.info.run_id, model_dir, registered_name="tiny")
    return uri, model_dir, client, run.info.run_id


def _greedy(model_dir: Path, prompt: str, n: int) -> str:
    model, tok = load_model(model_dir)[0], load_tokenizer(model_dir / "tokenizer.json")
    return complete(model, tok, [prompt], SamplingOptions(max_new_tokens=n, temperature=0.0))[0]["completion"]


def test_logged_model_is_registered_leaves_the_run_running_and_predicts_per_row_options(logged):
    import mlflow

    uri, model_dir, client, run_id = logged
    assert uri == "models:/tiny/1"
    assert client.get_run(run_id).info.status == "RUNNING"  # the stage that logged it still owns the run
    model = mlflow.pyfunc.load_model(uri)
    out = model.predict(pd.DataFrame({"prompt": ["the king", "a fool", "night"], "max_new_tokens": [3, 7, 3],
                                      "temperature": [0.0, 0.0, 0.0]}))
    assert out == [_greedy(model_dir, "the king", 3), _greedy(model_dir, "a fool", 7), _greedy(model_dir, "night", 3)]
    assert len(model.predict({"prompt": ["the king"]})) == 1  # a dict of columns, defaults for the rest


def test_logging_leaves_the_callers_tracking_uri_alone(tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    store = f"sqlite:///{tmp_path / 'store.db'}"
    client = MlflowClient(store)
    run = client.create_run(client.create_experiment("x", artifact_location=(tmp_path / "mlruns").as_uri()))
    uri = log_generation_model(store, run.info.run_id, make_model_dir(tmp_path / "train"))
    assert os.environ["MLFLOW_TRACKING_URI"] == elsewhere and mlflow.get_tracking_uri() == elsewhere
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert mlflow.get_tracking_uri() == store  # no global left behind to shadow the variable
    assert uri.startswith("models:/") and client.get_run(run.info.run_id).info.status == "RUNNING"


def test_missing_model_files_are_named(tmp_path, tracking_uri):
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri).create_run(MlflowClient(tracking_uri).create_experiment("x"))
    (tmp_path / "model.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors, tokenizer.json"):
        log_generation_model(tracking_uri, run.info.run_id, tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, payload: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _wait_until_up(proc: subprocess.Popen, url: str, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    pytest.fail(f"mlflow models serve did not answer within {timeout_s}s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_generation_request_on_loopback(logged, tmp_path, tracking_uri):
    uri, model_dir, _, _ = logged
    port = _free_port()
    bin_dir = Path(sys.executable).parent  # the server starts `uvicorn` from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(bin_dir / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local",
                                 "--host", "127.0.0.1", "--port", str(port)],
                                env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until_up(proc, f"http://127.0.0.1:{port}/ping", log)
        reply = _post(f"http://127.0.0.1:{port}/invocations",
                      {"dataframe_records": [{"prompt": "the king", "max_new_tokens": 5, "temperature": 0.0},
                                             {"prompt": "a fool"}]})
        assert isinstance(reply["predictions"], list) and len(reply["predictions"]) == 2
        assert all(isinstance(p, str) for p in reply["predictions"])
        assert reply["predictions"][0] == _greedy(model_dir, "the king", 5)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker: the session this test started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
