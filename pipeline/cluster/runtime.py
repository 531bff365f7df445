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
            ray.init(address=address, logging_level=logging.WARNING)
        else:  # a new local instance, even if a `ray start` cluster runs on this machine (RAY_ADDRESS picks that);
            # its dashboard (which Ray Train's state queries need) binds to loopback only
            ray.init(address="local", dashboard_host="127.0.0.1", logging_level=logging.WARNING)
        self.started_here = True

    def shutdown(self) -> None:
        if self.started_here:
            import ray

            ray.shutdown()


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
