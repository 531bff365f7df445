"""Starting or joining Ray: a new local instance by default, the cluster `RAY_ADDRESS` names otherwise.

Ray starts lazily (a fully cached run starts no Ray work). Token authentication
stays on: a local start asks for it explicitly and a client presents the token
Ray keeps in `~/.ray/auth_token`. `submission_id` tells a submitted job's
driver its Ray job id (the MLflow runs are tagged with it).
"""

from __future__ import annotations

import json
import logging
import os
import socket


class RayRuntime:
    """Start (or connect to) Ray lazily: a fully cached run starts no Ray work."""

    def __init__(self) -> None:
        self.started_here = False

    def ensure(self) -> None:
        import ray

        if ray.is_initialized():
            return
        address = os.environ.get("RAY_ADDRESS")
        keep_ray_token_auth(connecting=bool(address))
        if address:
            ray.init(address=address, logging_level=logging.WARNING)  # its INFO lines would reach the terminal before the run logs open
        else:  # a new local instance, even if a `ray start` cluster runs on this machine (RAY_ADDRESS picks that)
            init_local()
        self.started_here = True

    def shutdown(self) -> None:
        if self.started_here:
            import ray

            ray.shutdown()


def init_local(*, num_cpus: int | None = None, logging_level: int = logging.INFO) -> None:
    """A new local Ray instance whose dashboard (which Ray Train's state queries need) binds to loopback only.

    Processes of this instance that query Ray's state API without an address (Ray Train's placement-group cleaner
    does, every second) would otherwise pick "the" cluster of this machine: the one the last `ray start` recorded
    in /tmp/ray/ray_current_cluster, or any other Ray instance running here. That is not this one: a stopped
    cluster times out (`RpcError: Timed out while waiting for GCS`, a traceback in a run that succeeds), another
    one answers about the wrong actors. So every process of this instance is told its own dashboard.
    """
    import ray

    keep_ray_token_auth(connecting=False)
    port = _free_port()
    ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1", dashboard_port=port,
             logging_level=logging_level, runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keep_ray_token_auth(*, connecting: bool = True) -> None:
    """Keep Ray's token authentication on, and present the token when connecting to a cluster.

    Ray 2.60 turns token authentication on for a new local instance (generating `~/.ray/auth_token`)
    and for a `ray start` cluster where a token exists (`~/.ray/auth_token`, `RAY_AUTH_TOKEN`,
    `RAY_AUTH_TOKEN_PATH`), and refuses clients without it. A local start asks for it explicitly
    (the same protection, without Ray's notice on every run); a client whose mode is unset but that
    holds a token turns the mode on, as `ray start` does. An explicit `RAY_AUTH_MODE` always wins.
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    has_token = bool(os.environ.get("RAY_AUTH_TOKEN")) or any(
        p and os.path.isfile(os.path.expanduser(p)) for p in (os.environ.get("RAY_AUTH_TOKEN_PATH"), "~/.ray/auth_token"))
    if connecting and not has_token:
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    try:  # refresh Ray's cached config so this process, not only its children, sends the token
        from ray._raylet import Config

        Config.initialize("")
    except (ImportError, AttributeError):
        pass


def submission_id() -> str | None:
    """The Ray job submission id when this process is a submitted job's entrypoint."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return json.loads(raw).get("metadata", {}).get("job_submission_id")
    except ValueError:
        return None
