"""Running the pipeline on a Ray cluster as a Ray job: `llmpipe submit`, `logs`, `status --job`, `stop`.

`submit` validates the config here first (a typo never reaches the cluster),
refuses what cannot work there (a relative `store.root`, which would resolve
inside the job's temporary working directory; a local MLflow store, which the
cluster cannot reach), then submits `python -m pipeline run CONFIG ...` through
the Ray Jobs API with the project folder as the job's `working_dir` (so the
code you run is the code you have) and `MLFLOW_TRACKING_URI` plus any `--env`
variables passed on. The job's driver runs on the head node; the stages fan
out from there, and the MLflow parent run is tagged with the submission id.

The job server is the head's dashboard address: `--address`, else
`RAY_ADDRESS` when it is an http(s) URL, else http://127.0.0.1:8265, where
`ray dashboard cluster.yaml` forwards it over SSH.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.cluster.preflight import is_local_tracking_uri
from pipeline.cluster.runtime import keep_ray_token_auth
from pipeline.config import load_config
from pipeline.errors import JobError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
AGENT_WAIT_S = 120  # how long to wait for a just-started head's job agent
EXCLUDES = [".venv/", "artifacts/", "mlruns/", "mlflow.db", ".git/", ".whl/", "__pycache__/", ".pytest_cache/"]



def job_address(address: str | None = None) -> str:
    env = os.environ.get("RAY_ADDRESS", "")
    return address or (env if env.startswith(("http://", "https://")) else DEFAULT_ADDRESS)


def client(address: str | None = None) -> Any:
    from ray.job_submission import JobSubmissionClient

    keep_ray_token_auth()
    url = job_address(address)
    try:
        return JobSubmissionClient(url)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise JobError(f"cannot reach the Ray job server at {url} ({str(e).splitlines()[0]}); start "
                       "`ray dashboard cluster.yaml` to forward it, or pass --address / set RAY_ADDRESS") from None


def entrypoint(config: str, overrides: list[str], run_args: list[str]) -> str:
    return shlex.join(["python", "-m", "pipeline", "run", config, *overrides, *run_args])


def check_submittable(config: str, overrides: list[str], working_dir: Path, tracking_uri: str | None) -> str:
    """Validate the config and what the cluster will need; returns its path relative to the working dir."""
    cfg = load_config(config, overrides)
    try:
        rel = Path(config).resolve().relative_to(working_dir.resolve())
    except ValueError:
        raise JobError(f"{config}: the config must be inside the folder shipped to the cluster ({working_dir}); "
                       "move it there or pass --working-dir") from None
    root = cfg.store.root
    if "://" not in root and not Path(root).expanduser().is_absolute():
        raise JobError(f"store.root {root!r} is a relative path: in a Ray job it would land in the job's temporary "
                       "working directory on the head node; set store.root to shared storage (s3://bucket/prefix, "
                       "gs://..., or an absolute path on a filesystem every node mounts)")
    if cfg.tracking.enabled and (not tracking_uri or is_local_tracking_uri(tracking_uri)):
        raise JobError(f"tracking: the job needs an MLflow server the cluster can reach, got "
                       f"{tracking_uri or 'no MLFLOW_TRACKING_URI'}; start `mlflow server` on the head (see README) and "
                       "pass --tracking-uri http://<head-private-ip>:5000, or set tracking.enabled=false")
    return rel.as_posix()


def submit(config: str, overrides: list[str], run_args: list[str], *, address: str | None = None,
           working_dir: str = ".", env: list[str] = (), tracking_uri: str | None = None) -> str:
    """Submit the pipeline as a Ray job; returns the submission id."""
    wd = Path(working_dir)
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    rel = check_submittable(config, overrides, wd, tracking_uri)
    env_vars = {"MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else {}
    for name in env:
        if name not in os.environ:
            raise JobError(f"--env {name}: not set in this shell")
        env_vars[name] = os.environ[name]
    runtime_env = {"working_dir": str(wd.resolve()), "excludes": EXCLUDES, "env_vars": env_vars}
    c = client(address)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return c.submit_job(entrypoint=entrypoint(rel, overrides, run_args), runtime_env=runtime_env,
                                metadata={"llmpipe.config": rel})
        except RuntimeError as e:
            # Right after a cluster starts, the head's job agent may not have registered yet: Ray asks to retry.
            if "No available agent" in str(e) and time.monotonic() < deadline:
                time.sleep(2)
                continue
            raise JobError(f"the job server at {job_address(address)} refused the job: {str(e).splitlines()[0]}") from None


def follow(job_id: str, *, address: str | None = None, out=sys.stdout) -> str:
    """Stream a job's logs until it ends; returns its final status."""
    c = client(address)

    async def tail() -> None:
        async for chunk in c.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
    return str(c.get_job_status(job_id).value)


def logs(job_id: str, *, address: str | None = None) -> str:
    return _known(lambda c: c.get_job_logs(job_id), job_id, address)


def status(job_id: str, *, address: str | None = None) -> dict[str, Any]:
    info = _known(lambda c: c.get_job_info(job_id), job_id, address)
    return {"job": job_id, "status": str(info.status.value), "entrypoint": info.entrypoint, "message": info.message or "",
            "start_time": info.start_time, "end_time": info.end_time}


def stop(job_id: str, *, address: str | None = None) -> bool:
    return bool(_known(lambda c: c.stop_job(job_id), job_id, address))


def _known(fn, job_id: str, address: str | None) -> Any:
    c = client(address)
    try:
        return fn(c)
    except RuntimeError as e:  # the SDK raises RuntimeError for an unknown id
        raise JobError(f"job {job_id}: {str(e).splitlines()[0]}") from None
