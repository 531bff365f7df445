"""On a real multi-node Ray cluster started on this machine: the launcher config, the refusals that
keep a cluster run safe, and a pipeline submitted through the Ray Jobs API that spreads its work
over two nodes, tracks into an MLflow server, and finishes after one node is killed mid-training.

Nodes are `ray start` processes, each in its own process group so one can be SIGKILLed like a
lost machine. A node that must not see the artifact store runs in its own mount namespace with a
tmpfs over the store folder (`unshare`), which is what a node without the shared mount looks like.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_raw
from tests.servers import S3Server, free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _node_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # the job's `python` is this venv's
    env.update(S3Server.ENV)  # the nodes' S3 credentials, as an instance profile would give them
    # The GCS marks a node dead after 5 failed health checks 3 s apart; a SIGKILLed node here fails each at once,
    # so the tests that kill nodes wait 1.5 s for it instead of 15 s (Ray's own tests shorten it the same way).
    env.update(RAY_health_check_period_ms="500", RAY_health_check_failure_threshold="3")
    return env


class LocalCluster:
    """A head and worker nodes as `ray start --block` process groups on 127.0.0.1."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs  # each node's `ray start` output, quoted when a node fails to come up
        self.nodes: dict[str, subprocess.Popen] = {}
        self._new_addresses()

    def _new_addresses(self) -> None:
        self.gcs = f"127.0.0.1:{free_port()}"
        self.dashboard = f"http://127.0.0.1:{free_port()}"

    def _start(self, name: str, args: list[str], hide: Path | None = None) -> None:
        # Every node on this host needs its own agent ports: the defaults (e.g. 52365) may be taken by another
        # Ray on the machine, and a head without its dashboard agent cannot accept jobs.
        ports = [f"--{flag}={free_port()}" for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                         "runtime-env-agent-port", "metrics-export-port")]
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--block", "--disable-usage-stats", *ports, *args]
        if hide is not None:  # this node's processes see an empty tmpfs where the store is
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   f"mount -t tmpfs tmpfs {shlex.quote(str(hide))} && exec {shlex.join(cmd)}"]
        with open(self.logs / f"{name}.log", "ab") as log:
            self.nodes[name] = subprocess.Popen(cmd, env=_node_env(), start_new_session=True,
                                                stdout=log, stderr=subprocess.STDOUT)

    def start_head(self, attempts: int = 3) -> None:
        """Start the head; a port picked free can be taken by another process before Ray binds it (other tests
        start Rays and servers meanwhile), so a head that dies or never shows up is started again on new ports."""
        for attempt in range(1, attempts + 1):
            port = self.dashboard.rsplit(":", 1)[1]
            self._start("head", ["--head", f"--port={self.gcs.rsplit(':', 1)[1]}", "--num-cpus=2",
                                 "--resources={\"head\": 1}", f"--ray-client-server-port={free_port()}",
                                 "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={port}"])
            try:
                self.wait_alive(1)
                return
            except AssertionError:
                self.kill("head")
                if attempt == attempts:
                    raise
                self._new_addresses()

    def add_node(self, name: str, *, num_cpus: int = 2, hide: Path | None = None, attempts: int = 3) -> None:
        """Start a worker node; on a loaded machine a raylet can time out registering with the GCS (`ray start`
        then exits), so a node that dies or never shows up is started again."""
        args = [f"--address={self.gcs}", f"--num-cpus={num_cpus}", f"--resources={{\"{name}\": 1}}"]
        for attempt in range(1, attempts + 1):
            self._start(name, args, hide)
            try:
                self.wait_alive(len(self.nodes))
                return
            except AssertionError:
                self.kill(name)
                if attempt == attempts:
                    raise
                self.wait_alive(len(self.nodes))  # the failed one gone: the others still alive

    def nodes_state(self) -> list[dict]:
        from ray.util.state import list_nodes

        return [n.__dict__ if hasattr(n, "__dict__") else dict(n) for n in list_nodes(address=self.dashboard, detail=True)]

    def node_id(self, name: str) -> str:
        for n in self.nodes_state():
            if n["state"] == "ALIVE" and name in (n.get("resources_total") or {}):
                return n["node_id"]
        raise AssertionError(f"no alive node with resource {name}")

    def alive(self) -> int:
        return sum(n["state"] == "ALIVE" for n in self.nodes_state())

    def wait_alive(self, count: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            dead = [name for name, proc in self.nodes.items() if proc.poll() is not None]
            if dead:
                raise AssertionError(f"node {dead[0]} exited with {self.nodes[dead[0]].returncode}:\n{self.log_tail(dead[0])}")
            try:
                if self.alive() == count:
                    return
            except Exception:  # noqa: BLE001 - the dashboard is still starting
                pass
            time.sleep(1)
        tails = "\n".join(f"--- {name}:\n{self.log_tail(name)}" for name in self.nodes)
        raise AssertionError(f"the cluster did not reach {count} alive nodes in {timeout:.0f}s\n{tails}")

    def log_tail(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else "(no output)"

    def kill(self, name: str) -> None:
        """SIGKILL a node's whole process group: raylet, object store, workers, as if the machine vanished."""
        proc = self.nodes.pop(name)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # it had exited by itself
            pass
        proc.wait()

    def shutdown(self) -> None:
        for name in list(self.nodes)[::-1]:
            try:
                self.kill(name)
            except ProcessLookupError:
                pass


@contextlib.contextmanager
def _cluster_token():
    """The nodes, the pipeline runs and this client share one token, as a real cluster's machines do.

    Left to Ray, each process decides by whether `~/.ray/auth_token` exists when it starts, and on a fresh machine
    another test's local Ray creates that file at any moment: a head started before it and a client after (or the
    reverse) do not agree, and the client's every state query is refused."""
    from ray._raylet import AuthenticationTokenLoader, Config

    keys = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))

    def reload() -> None:  # this process caches Ray's config and its token
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()

    reload()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reload()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with _cluster_token():
        c = LocalCluster(tmp_path_factory.mktemp("ray-nodes"))
        try:
            c.start_head()
            c.add_node("node2")
            yield c
        finally:
            c.shutdown()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.stop()


def _write_config(folder: Path, corpus: Path, store: Path | str, **sections) -> Path:
    raw = tiny_raw(corpus, store, **sections)
    raw["name"] = "tiny-cluster"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run_on(cluster: LocalCluster, config: Path, *args: str, tracking_uri: str | None = None):
    env = {**_node_env(), "RAY_ADDRESS": cluster.gcs}
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return subprocess.run([sys.executable, "-m", "pipeline", "run", str(config), *args], env=env, capture_output=True,
                          text=True, timeout=300)


def test_cluster_yaml_passes_the_launchers_own_validation_and_keeps_services_on_loopback():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(cfg))  # what `ray up` runs: the schema, after filling in the AWS defaults
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types and cfg["provider"]["type"] == "aws"
    workers = [t for n, t in types.items() if n != cfg["head_node_type"]]
    assert workers and all(w["resources"].get("GPU", 0) >= 1 and w["max_workers"] >= w["min_workers"] for w in workers)
    assert cfg["max_workers"] >= sum(w["max_workers"] for w in workers)
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert any("pip install" in c and "-e ." in c for c in cfg["setup_commands"])
    assert any("$RAY_HEAD_IP" in c for c in cfg["worker_start_ray_commands"])


def test_a_local_sqlite_tracking_store_is_refused_on_a_multi_node_cluster_before_any_work(cluster, corpus_dir, tmp_path):
    store = tmp_path / "store"
    config = _write_config(tmp_path / "wd", corpus_dir, store)
    db = tmp_path / "mlflow.db"
    out = _run_on(cluster, config, tracking_uri=f"sqlite:///{db}")
    assert out.returncode == 2, out.stderr
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and "is a local store" in err[0] and "MLFLOW_TRACKING_URI=http" in err[0], err
    assert not db.exists() and not glob.glob(f"{store}/*/*")  # nothing tracked, no stage started


def test_a_store_folder_another_node_cannot_see_is_refused_naming_the_node(cluster, corpus_dir, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    cluster.add_node("blind", num_cpus=1, hide=store)
    try:
        blind = cluster.node_id("blind")
        config = _write_config(tmp_path / "wd", corpus_dir, store, tracking={"enabled": False})
        out = _run_on(cluster, config)
    finally:
        cluster.kill("blind")
        cluster.wait_alive(2)
    assert out.returncode == 2, out.stderr
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and f"store.root {str(store)!r}" in err[0] and blind[:12] in err[0], err
    assert "shared filesystem mounted at the same path on every node" in err[0]
    assert not [p for p in store.iterdir() if p.name not in ("_probe", "_locks")]  # no stage folder was started


def test_input_files_another_node_cannot_see_are_refused_naming_the_node_and_the_file(cluster, corpus_dir, tmp_path):
    inputs = tmp_path / "inputs"
    (inputs / "shared").mkdir(parents=True)
    for f in sorted(corpus_dir.iterdir())[:3]:
        (inputs / "shared" / f.name).write_bytes(f.read_bytes())
    (inputs / "head_only").mkdir()  # the blind node sees an empty tmpfs here, as a node without the mount would
    (inputs / "head_only" / "extra.md").write_text("# Extra\n\nKING:\nOnly the head has this play.\n")
    store = tmp_path / "store"  # every node sees the store: only the inputs differ
    cluster.add_node("blind", num_cpus=1, hide=inputs / "head_only")
    try:
        blind = cluster.node_id("blind")
        config = _write_config(tmp_path / "wd", inputs, store, tracking={"enabled": False}, data={"on_error": "skip"})
        out = _run_on(cluster, config)
    finally:
        cluster.kill("blind")
        cluster.wait_alive(2)
    assert out.returncode == 2, out.stderr
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and "data.inputs: node " in err[0] and blind[:12] in err[0], err
    assert f"does not see {inputs / 'head_only' / 'extra.md'}" in err[0] and "of 3 nodes" not in err[0], err
    assert not [p for p in store.iterdir() if p.name not in ("_probe", "_locks")]  # no stage folder was started


def test_the_first_difference_between_two_views_of_the_inputs_is_named():
    from pipeline.cluster.preflight import first_difference

    driver = [("/d/a.md", 10), ("/d/b.md", 20), ("/d/c.md", 30)]
    assert first_difference(driver, list(driver)) is None
    assert first_difference(driver, driver[:1] + driver[2:]) == "does not see /d/b.md (20 bytes on the driver)"
    assert first_difference(driver, driver + [("/d/d.md", 1)]) == "sees /d/d.md (1 bytes), which the driver does not"
    assert first_difference(driver, [("/d/a.md", 10), ("/d/b.md", 21), ("/d/c.md", 30)]) == (
        "sees /d/b.md with 21 bytes, the driver with 20")
    assert first_difference(driver, "error: InputError: data.inputs: '/d' matches no files") == (
        "cannot resolve them (error: InputError: data.inputs: '/d' matches no files)")


def _wait_for(predicate, timeout: float, what: str, context=lambda: ""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}\n{context()}")


def test_a_submitted_pipeline_on_s3_spreads_over_nodes_tracks_to_the_server_and_survives_losing_a_node(
        cluster, s3, corpus_dir, tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient
    from pyarrow.fs import FileSelector
    from ray.job_submission import JobStatus
    from ray.util.state import list_actors, list_tasks

    from pipeline.cli import main
    from pipeline.cluster import jobs

    fs, base = s3.filesystem(), f"{s3.bucket}/cluster-test"
    wd = tmp_path / "wd"
    config = _write_config(wd, corpus_dir, s3.uri("cluster-test"), data={"num_tasks": 4},
                           train={"steps": 40, "checkpoint_every": 10, "log_model": False},
                           resources={"prepare": {"spread": True}, "train": {"spread": True}})
    head, node2 = cluster.node_id("head"), cluster.node_id("node2")
    job = jobs.submit(str(config), [], [], address=cluster.dashboard, working_dir=str(wd), tracking_uri=mlflow_server.uri)
    client = jobs.client(cluster.dashboard)

    def logs() -> str:
        return client.get_job_logs(job)

    def stored(pattern: str) -> list[str]:
        return [i.path for i in fs.get_file_info(FileSelector(base, recursive=True, allow_not_found=True))
                if fnmatch.fnmatch(i.path, f"{base}/{pattern}")]

    # Both nodes train: wait for the first checkpoint in S3, then kill node2 while its worker is mid-run.
    def first_checkpoint():
        if client.get_job_status(job) in (JobStatus.FAILED, JobStatus.STOPPED):
            raise AssertionError(f"job ended early:\n{logs()[-4000:]}")
        return stored("train/*/ray_train/step_*/train_state.json")

    _wait_for(first_checkpoint, 400, "the first training checkpoint", lambda: logs()[-4000:])
    workers = [a for a in list_actors(address=cluster.dashboard, filters=[("state", "=", "ALIVE")], detail=True)
               if "TrainWorker" in a.class_name]
    assert {a.node_id for a in workers} == {head, node2}, "the two train workers should sit on different nodes"
    assert not stored("train/*/_COMPLETE.json"), "training finished before the node could be killed"
    cluster.kill("node2")

    final = _wait_for(lambda: (s := client.get_job_status(job)) in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) and s,
                      480, "the job to end", lambda: logs()[-4000:])
    assert final == JobStatus.SUCCEEDED, logs()[-6000:]

    manifests = {}
    for path in stored("*/*/_COMPLETE.json"):
        with fs.open_input_stream(path) as f:
            manifests[path.split("/")[-3]] = json.loads(f.read())
    assert set(manifests) == {"tokenizer", "prepare", "train", "evaluate", "decode"}
    shards = [f["path"] for f in manifests["prepare"]["files"] if f["path"].endswith(".arrow")]
    assert len(shards) >= 8  # written by tasks on both nodes, straight into the bucket
    assert {"model.safetensors", "model.json", "tokenizer.json"} <= {f["path"] for f in manifests["train"]["files"]}
    tokenize_nodes = {t.node_id for t in list_tasks(address=cluster.dashboard, detail=True, limit=10000)
                      if t.name.endswith("tokenize_task")}
    assert tokenize_nodes == {head, node2}, "prepare's tasks should have run on both nodes"
    all_workers = [a for a in list_actors(address=cluster.dashboard, detail=True, limit=10000) if "TrainWorker" in a.class_name]
    assert len(all_workers) >= 4 and sum(a.node_id == node2 for a in all_workers) == 1  # restarted on the head

    mlflow = MlflowClient(mlflow_server.uri)
    exp = mlflow.get_experiment_by_name("tiny-cluster")
    tagged = mlflow.search_runs([exp.experiment_id], f"tags.`ray.job_submission_id` = '{job}'")
    parents = [r for r in tagged if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = mlflow.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert sorted(r.data.tags["stage"] for r in children) == ["decode", "evaluate", "prepare", "tokenizer", "train"]
    train = next(r for r in children if r.data.tags["stage"] == "train")
    steps = [m.step for m in mlflow.get_metric_history(train.info.run_id, "train/loss")]
    assert max(steps) == 40
    # resumed from the checkpoint in S3, not from step 0: the steps up to the first checkpoint were trained once
    assert all(steps.count(s) == 1 for s in range(1, 11)), sorted(steps)

    status = subprocess.run([sys.executable, "-m", "pipeline", "status", "--job", job, "--address", cluster.dashboard],
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and f"{job}: SUCCEEDED" in status.stdout
    assert main(["logs", job, "--address", cluster.dashboard]) == 0
