"""Hermetic fixtures: a tiny corpus, a temp SQLite MLflow store, one local Ray, tiny configs."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

WORDS = ("the king and queen of a castle speak to the fool who answers with a song about night and "
         "day where lords ride horses to the sea while ladies read letters by the fire").split()


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))).capitalize() + "."


# `make test` runs two test processes on two cores: a tiny model gains nothing from a second torch thread, and on a
# busy machine the threads of one process wait on each other (the in-process training tests took 4x as long). Ray's
# workers already get one thread per CPU they hold; `llmpipe run` subprocesses inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Ray Train's controller notices a finished or failed worker group at its next health check (every 2 s by default)
# and watches for cloud preemption notices in an actor of its own; the suite's many short runs wait less without both.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

# The longest modules start first (`make test` runs whole modules per process, `--dist loadfile`, in this order), so
# that the quick ones fill in at the end instead of one long module running alone; the rest: slow before quick.
LONGEST_FIRST = ("tests/test_cluster.py", "tests/reliability/test_driver_kill.py",
                 "tests/reliability/test_tracking_outage.py", "tests/test_training.py",
                 "tests/reliability/test_security.py", "tests/test_run_output.py", "tests/test_pipeline_e2e.py",
                 "tests/test_evaluate.py", "tests/test_context_extension.py", "tests/test_golden.py")


def pytest_configure(config: pytest.Config) -> None:
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case a plugin imported torch before this file


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    module = {item: item.nodeid.split("::")[0] for item in items}
    slow = {module[item] for item in items if item.get_closest_marker("slow")}
    first = {name: i for i, name in enumerate(LONGEST_FIRST)}
    order = {item: i for i, item in enumerate(items)}
    items.sort(key=lambda item: (first.get(module[item], len(first)), module[item] not in slow, order[item]))


@pytest.fixture(scope="session", autouse=True)
def _own_hash_memo(tmp_path_factory: pytest.TempPathFactory):
    """Input files' content hashes are remembered per user (tokenization.content_hash); the tests keep their own."""
    old = os.environ.get("LLMPIPE_CACHE_DIR")
    os.environ["LLMPIPE_CACHE_DIR"] = str(tmp_path_factory.mktemp("llmpipe-cache"))
    yield
    if old is None:
        os.environ.pop("LLMPIPE_CACHE_DIR", None)
    else:
        os.environ["LLMPIPE_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 small markdown 'plays' of pseudo-English (deterministic)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(40):
        lines = [f"# Play {i}"] + [f"{rng.choice(['KING', 'FOOL', 'QUEEN'])}:\n{_sentence(rng)}" for _ in range(60)]
        (root / f"play_{i:02d}.md").write_text("\n\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture
def tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def ray_local():
    import logging

    import ray

    from pipeline.cluster.runtime import init_local

    # always a fresh instance of our own, never one another process on this machine started, as `llmpipe run` does
    init_local(num_cpus=2, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


def tiny_raw(corpus: Path, root: Path, **sections) -> dict:
    raw = {
        "name": "tiny",
        "store": {"root": str(root)},
        "data": {"inputs": [str(corpus)], "val_fraction": 0.2, "shard_size_mb": 0.01},
        "tokenizer": {"vocab_size": 300},
        "model": {"n_layer": 2, "n_head": 2, "d_model": 32, "max_seq_len": 32},
        "train": {"steps": 6, "global_batch_size": 8, "micro_batch_size": 2, "warmup_steps": 2,
                  "checkpoint_every": 3, "num_workers": 2, "log_every": 1},
        "evaluate": {"max_tokens": 2000, "context_multipliers": [0.5, 1.0, 2.0]},
        "decode": {"prompts": ["KING:\n"], "max_new_tokens": 8, "num_samples": 2},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return raw


@pytest.fixture
def tiny_config(corpus_dir: Path, tmp_path: Path):
    from pipeline.config import parse_config

    def make(**sections):
        return parse_config(tiny_raw(corpus_dir, tmp_path / "artifacts", **sections))

    return make


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend), stopped after the test."""
    from tests.servers import MlflowServer

    server = MlflowServer(tmp_path / "mlflow-server").start()
    yield server
    server.stop()


def refused_before_any_work(raw: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> str:
    """Run config `raw`, which must be refused at plan time: exit 2, one line on stderr (returned), no store made."""
    import yaml

    from pipeline import cli

    (tmp_path / "refused.yaml").write_text(yaml.safe_dump(raw))
    assert cli.main(["run", str(tmp_path / "refused.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert not Path(raw["store"]["root"]).exists()
    return err[0]
