"""Fixtures of the reliability suite: the tiny tokenizer and prepare stages committed once per session into a store
that each test copies, so a fault test pays only for the stages it breaks."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_raw


@pytest.fixture(scope="session")
def prepared_store(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory, ray_local) -> Path:
    """A store with the tiny tokenizer and prepare stages committed (tracking off). Copy it, never write to it."""
    from pipeline import cli

    tmp = tmp_path_factory.mktemp("prepared")
    cfg = tmp / "prepare.yaml"
    cfg.write_text(yaml.safe_dump(tiny_raw(corpus_dir, tmp / "store", tracking={"enabled": False})))
    assert cli.main(["run", str(cfg), "--only", "tokenizer"]) == 0
    assert cli.main(["run", str(cfg), "--only", "prepare"]) == 0
    return tmp / "store"


@pytest.fixture
def pipeline_config(prepared_store: Path, corpus_dir: Path, tmp_path: Path) -> Callable[..., tuple[str, Path]]:
    """make(**train) -> (config file, store root): the tiny config over a private copy of the prepared store, so
    tokenizer and prepare are cached and the given `train` keys override the tiny ones."""
    def make(**train) -> tuple[str, Path]:
        root = tmp_path / "store"
        shutil.copytree(prepared_store, root)
        path = tmp_path / "tiny.yaml"
        path.write_text(yaml.safe_dump(tiny_raw(corpus_dir, root, train=train)))
        return str(path), root

    return make


@pytest.fixture
def ray_worker_output(ray_local) -> Callable[[], str]:
    """What Ray's worker processes of this session printed so far (their log files): training workers' own lines."""
    def read() -> str:
        logs = Path(ray_local._private.worker.global_worker.node.get_logs_dir_path())
        return "".join(p.read_text(errors="replace") for p in sorted(logs.glob("worker-*.out")) + sorted(logs.glob("worker-*.err")))

    return read
