"""User errors cross Ray by type: a task's or a training worker's error is found inside Ray's wrapper and printed
as its own one line, while a bug keeps its traceback."""

from __future__ import annotations

import pytest

from pipeline import cli
from pipeline.errors import ConfigError, TrainingError, UserError, user_cause
from tokenization.inputs import InputError


def _raise(exc: BaseException) -> None:
    raise exc


@pytest.mark.slow
def test_a_user_error_raised_in_a_ray_task_is_found_by_type(ray_local):
    task = ray_local.remote(_raise)
    with pytest.raises(Exception) as e:
        ray_local.get(task.remote(InputError("corpus.jsonl:3: malformed JSON")))
    assert type(e.value) is not InputError  # Ray wrapped it
    cause = user_cause(e.value)
    assert isinstance(cause, InputError) and str(cause) == "corpus.jsonl:3: malformed JSON"
    with pytest.raises(Exception) as bug:
        ray_local.get(task.remote(KeyError("a bug")))
    assert user_cause(bug.value) is None


def test_a_training_worker_error_is_found_inside_ray_trains_failure():
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    worker = TrainingError("train: loss is nan at step 5")
    failure = WorkerGroupError("training failed", {0: UserExceptionWithTraceback(worker, "Traceback ..."),
                                                   1: UserExceptionWithTraceback(RuntimeError("peer died"), "...")})
    assert user_cause(failure) is worker
    assert user_cause(WorkerGroupError("failed", {0: UserExceptionWithTraceback(ZeroDivisionError(), "...")})) is None


def test_the_innermost_user_error_wins_and_the_cli_prints_it_as_one_line(capsys):
    inner = ConfigError("train: c.yaml was written by 2 workers")
    try:
        try:
            raise inner
        except ConfigError as e:
            raise TrainingError("train: failed") from e
    except UserError as outer:
        assert user_cause(outer) is inner
    assert cli._guarded(lambda: _raise(TrainingError("train: failed"))) == 2
    assert capsys.readouterr().err == "llmpipe: error: train: failed\n"
    with pytest.raises(KeyError):
        cli._guarded(lambda: _raise(KeyError("a bug keeps its traceback")))
