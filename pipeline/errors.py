"""The errors a user can fix, one family: the CLI prints any `UserError` as one line and exits 2.

Each class says which part of the pipeline refused (the config, the workflow,
the store, the cluster, a job, MLflow, training, a model lookup); every message
names the file, key, path or URI it is about. Bad input data is
`tokenization.inputs.InputError` (the pure layer cannot import this module), so
`USER_ERRORS` lists both families. An error raised inside a Ray task or a Ray
Train worker reaches the driver wrapped by Ray; `user_cause` finds the typed
error inside (Ray keeps the original exception as the `cause` of a task error,
and each worker's as a `worker_failures` entry of a training failure), never by
reading the error text.
"""

from __future__ import annotations

from tokenization.inputs import InputError


class UserError(Exception):
    """Something the user can fix; the message is one line naming what to change."""


class ConfigError(UserError, ValueError):
    """A configuration problem (names the file and the dotted key)."""


class WorkflowError(UserError, RuntimeError):
    """A request the workflow cannot satisfy (e.g. --only with a missing upstream)."""


class StoreError(UserError, RuntimeError):
    """The artifact store cannot be read or written (names the path)."""


class ClusterError(UserError, RuntimeError):
    """The cluster cannot run this config safely (says what to set)."""


class JobError(UserError, RuntimeError):
    """The job server cannot be reached, or a job request cannot be honoured."""


class TrackingError(UserError, ValueError):
    """The MLflow tracking URI cannot be used at start (names the URI and what to do)."""


class TargetError(UserError, LookupError):
    """A folder or MLflow run that leads to no trained model or evaluation (names what was tried)."""


class TrainingError(UserError, RuntimeError):
    """Training failed after Ray Train's retries (the worker's own error, in one line)."""


USER_ERRORS = (UserError, InputError, FileNotFoundError)
# Where Ray keeps the original exception: a task error's `cause`; in Ray Train, a controller failure and each
# worker's error (`worker_failures` values, wrapped with their traceback text as `_base_exc`).
_WRAPPED = ("cause", "controller_failure", "_base_exc")


def causes(e: BaseException) -> list[BaseException]:
    """`e` and the exceptions wrapped inside it, outermost first: a Ray task error's `cause`, a Ray Train
    failure's per-worker errors, and Python's `__cause__` chain."""
    out: list[BaseException] = []
    todo = [e]
    while todo:
        x = todo.pop(0)
        if x is None or any(x is seen for seen in out):
            continue
        out.append(x)
        todo += [getattr(x, attr, None) for attr in _WRAPPED]
        failures = getattr(x, "worker_failures", None)
        if isinstance(failures, dict):
            todo.extend(failures.values())
        todo.append(x.__cause__)
    return out


def user_cause(e: BaseException) -> BaseException | None:
    """The innermost user-fixable error wrapped in `e` (or `e` itself), else None."""
    found = [x for x in causes(e) if isinstance(x, USER_ERRORS)]
    return found[-1] if found else None
