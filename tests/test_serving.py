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

import mlflow.pyfunc
import pandas as pd
import pytest

from model import load_model
from model.generation import SamplingOptions
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


def test_logged_model_is_code_not_a_pickle_and_loads_with_unpickling_disallowed(logged, monkeypatch):
    import mlflow
    import yaml

    uri, model_dir, _, _ = logged
    folder = Path(mlflow.artifacts.download_artifacts(uri))
    flavor = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
    assert "python_model" not in flavor  # the key naming a pickled model object
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert (folder / Path(flavor["model_code_path"]).name).is_file()  # models from code: MLflow runs this file
    assert not [p for p in folder.rglob("*") if p.suffix in (".pkl", ".pickle", ".cloudpickle")]
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")  # a pickle would now be refused
    model = mlflow.pyfunc.load_model(uri)
    assert model.predict({"prompt": ["the king"], "max_new_tokens": [3], "temperature": [0.0]}) == [
        _greedy(model_dir, "the king", 3)]


def test_a_request_for_more_tokens_than_the_bound_is_refused(logged, tmp_path, tracking_uri):
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri, model_dir, _, _ = logged
    model = mlflow.pyfunc.load_model(uri)
    with pytest.raises(MlflowException, match=r"row 1: max_new_tokens 1000000000 exceeds this model's limit of 32"):
        model.predict({"prompt": ["a", "b"], "max_new_tokens": [2, 10**9]})  # default bound: the model's context
    client = MlflowClient(tracking_uri)
    run = client.create_run(client.create_experiment("bound", artifact_location=(tmp_path / "b").as_uri()))
    bounded = mlflow.pyfunc.load_model(log_generation_model(tracking_uri, run.info.run_id, model_dir, max_new_tokens_limit=4))
    assert len(bounded.predict({"prompt": ["a"], "max_new_tokens": [4]})) == 1
    with pytest.raises(MlflowException, match=r"row 0: max_new_tokens 5 exceeds this model's limit of 4"):
        bounded.predict({"prompt": ["a"], "max_new_tokens": [5]})


def test_logging_the_model_warns_of_no_pickle_and_no_missing_type_hints(tmp_path):
    """In a fresh interpreter, where MLflow checks `predict` as the class is defined and warns while it logs."""
    script = f"""
import sys
from pathlib import Path
from mlflow.tracking import MlflowClient
from pipeline.tracking.models import log_generation_model
from tests.test_decode import make_model_dir
uri = "sqlite:///{tmp_path}/m.db"
client = MlflowClient(uri)
run = client.create_run(client.create_experiment("w", artifact_location=Path("{tmp_path}/mlruns").as_uri()))
print("LOGGED", log_generation_model(uri, run.info.run_id, make_model_dir(Path("{tmp_path}/train"))))
"""
    out = subprocess.run([sys.executable, "-W", "always", "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1], check=False)
    text = out.stdout + out.stderr
    assert out.returncode == 0 and "LOGGED models:/" in out.stdout, text[-3000:]
    assert "CloudPickle" not in text and "Add type hints" not in text, text[-3000:]


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


def test_the_model_decode_logs_with_its_index_retrieves_and_cites_its_sources(logged, tmp_path, tracking_uri):
    """What `decode` logs when it retrieves: the model and the index in one served model; each row gets its top-k
    passages in front (as decode would) and its sources, `retrieve: 0` none; the plain model refuses `retrieve`."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from model.retrieval import Retriever
    from pipeline.stages.decode import decode_samples
    from tokenization.bpe import EOS
    from tokenization.documents import DocOptions
    from tokenization.inputs import resolve_inputs
    from tokenization.passages import PassageOptions, file_passages

    uri, model_dir, _, _ = logged
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "facts.md").write_text("The lamp room of Varnholm is painted vermilion.\n", encoding="utf-8")
    tok = load_tokenizer(model_dir / "tokenizer.json")
    table, _, _ = file_passages(resolve_inputs([str(tmp_path / "k")]), tok, DocOptions(),
                              PassageOptions(passage_tokens=8, overlap=2))
    Retriever.build(table, "bm25").save(tmp_path / "index")
    client = MlflowClient(tracking_uri)
    run = client.create_run(client.create_experiment("rag", artifact_location=(tmp_path / "r").as_uri()))
    rag = mlflow.pyfunc.load_model(log_generation_model(tracking_uri, run.info.run_id, model_dir,
                                                        index_dir=tmp_path / "index", retrieve=1))
    prompt = "the lamp room of Varnholm is painted"
    got = rag.predict({"prompt": [prompt, prompt], "max_new_tokens": [4, 4], "temperature": [0.0, 0.0],
                       "retrieve": [None, 0]})
    (want,) = decode_samples(str(model_dir), prompts=[prompt], opts=SamplingOptions(max_new_tokens=4, temperature=0.0),
                             eos_token=EOS, index_dir=str(tmp_path / "index"), retrieve=1)
    assert got[0] == {"completion": want["completion"], "sources": want["sources"]}  # the default k: decode's
    assert got[0]["sources"][0]["file"].endswith("facts.md") and got[0]["sources"][0]["line"] == 1
    assert got[1] == {"completion": _greedy(model_dir, prompt, 4), "sources": []}
    with pytest.raises(MlflowException, match=r"row 0: retrieve 999 exceeds the \d+ passages of this model's index"):
        rag.predict({"prompt": ["a"], "retrieve": [999]})
    with pytest.raises(MlflowException, match=r"row 0: retrieve 1: this model holds no index"):
        mlflow.pyfunc.load_model(uri).predict({"prompt": ["a"], "retrieve": [1]})


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
        with pytest.raises(urllib.error.HTTPError) as refused:
            _post(f"http://127.0.0.1:{port}/invocations", {"dataframe_records": [{"prompt": "a", "max_new_tokens": 10**9}]})
        assert refused.value.code == 400
        assert "max_new_tokens 1000000000 exceeds this model's limit of 32" in refused.value.read().decode()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker: the session this test started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _log(model_dir: Path, tmp_path: Path, tracking_uri: str, name: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    run = client.create_run(client.create_experiment(name, artifact_location=(tmp_path / f"mlruns-{name}").as_uri()))
    return log_generation_model(tracking_uri, run.info.run_id, model_dir)


def test_an_encoders_served_model_fills_masks_and_refuses_a_prompt_without_one(tmp_path, tracking_uri):
    from mlflow.exceptions import MlflowException

    from pipeline.completion import fill_masks

    model_dir = make_model_dir(tmp_path / "train", "learned", family="encoder", norm_position="post",
                               special_tokens=["<|endoftext|>", "<|pad|>", "<|mask|>"])
    served = mlflow.pyfunc.load_model(_log(model_dir, tmp_path, tracking_uri, "bert"))
    prompts = ["the king <|mask|> the queen", "a <|mask|> of the <|mask|>"]
    answers = served.predict(pd.DataFrame({"prompt": prompts}))
    model, tok = load_model(model_dir)[0], load_tokenizer(model_dir / "tokenizer.json")
    direct = fill_masks(model, tok, prompts, mask_token="<|mask|>", top_k=50)
    assert [a["completion"] for a in answers] == [d["completion"] for d in direct]
    assert [len(a["predictions"]) for a in answers] == [1, 2] and len(answers[0]["predictions"][0]) == 50
    with pytest.raises(MlflowException, match="has no <|mask|>"):
        served.predict({"prompt": ["no mask here"]})


def test_an_encoder_decoders_served_model_answers_each_prompt_as_a_source(tmp_path, tracking_uri):
    from pipeline.completion import transduce

    model_dir = make_model_dir(tmp_path / "train", "t5", family="encoder-decoder", norm="rmsnorm", bias=False,
                               mlp="relu", scale_attention=False)
    served = mlflow.pyfunc.load_model(_log(model_dir, tmp_path, tracking_uri, "t5"))
    prompts = ["the king and", "a lady of the"]
    answers = served.predict(pd.DataFrame({"prompt": prompts, "temperature": [0.0, 0.0], "max_new_tokens": [5, 5]}))
    model, tok = load_model(model_dir)[0], load_tokenizer(model_dir / "tokenizer.json")
    direct = transduce(model, tok, prompts, SamplingOptions(max_new_tokens=5, temperature=0.0))
    assert answers == [d["completion"] for d in direct] and all(answers)
