"""The node cache of a remote (`s3://`) store, against a real S3 server on 127.0.0.1 (moto's): a stage recommitted
under the same fingerprint (what `--force` does) is read anew, never from a stale copy; two stores never share
copies; the cache lives in a folder only its user can write to; and it stays under its size cap by evicting the
least recently used copies, never one a live process is reading."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline.engine.store import ArtifactStore, StageRef
from pipeline.errors import StoreError
from tests.servers import S3Server

REPO = Path(__file__).parents[2]
FP = "c0ffee" * 10 + "abcd"  # a fingerprint: 64 hex digits


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as mp:
        for k, v in S3Server.ENV.items():
            mp.setenv(k, v)
        server = S3Server(tmp_path_factory.mktemp("s3")).start()
        yield server
        server.stop()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own node cache (the per-user folder is LLMPIPE_CACHE_DIR when set)."""
    monkeypatch.setenv("LLMPIPE_CACHE_DIR", str(tmp_path / "node"))
    return tmp_path / "node"


def _commit(store: ArtifactStore, stage: str, files: dict[str, bytes], fp: str = FP) -> dict:
    """Build `stage` with these files and commit it, as `execute` does (a forced rebuild when already committed)."""
    work = store.working_dir(stage, fp, keep_partial=False)
    for name, data in files.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_bytes(data)
    return store.commit(stage, fp, work, {"stage": stage})


def test_a_recommit_under_the_same_fingerprint_is_read_anew_and_an_open_copy_keeps_its_files(s3, cache, tmp_path):
    store = ArtifactStore(s3.uri(f"ab-{tmp_path.name}"))
    _commit(store, "train", {"model.safetensors": b"A" * 100, "model.json": b"{}"})
    first = store.local_dir("train", FP)
    one = store.local_dir("train", FP, ["model.safetensors"])
    assert (first / "model.safetensors").read_bytes() == b"A" * 100 and (one / "model.safetensors").read_bytes() == b"A" * 100

    _commit(store, "train", {"model.safetensors": b"B" * 100, "model.json": b"{}"})  # same size, same fingerprint
    assert (store.local_dir("train", FP) / "model.safetensors").read_bytes() == b"B" * 100
    assert (store.local_dir("train", FP, ["model.safetensors"]) / "model.safetensors").read_bytes() == b"B" * 100
    assert (StageRef(store.location, "train", FP).local(["model.safetensors"]) / "model.safetensors").read_bytes() == b"B" * 100
    assert (first / "model.safetensors").read_bytes() == b"A" * 100  # a reader of the first commit keeps its copy


def test_two_stores_never_share_a_cached_copy(s3, cache, tmp_path):
    one, two = ArtifactStore(s3.uri(f"one-{tmp_path.name}")), ArtifactStore(s3.uri(f"two-{tmp_path.name}"))
    _commit(one, "tokenizer", {"tokenizer.json": b"1" * 50})
    _commit(two, "tokenizer", {"tokenizer.json": b"2" * 50})
    assert (one.local_dir("tokenizer", FP, ["tokenizer.json"]) / "tokenizer.json").read_bytes() == b"1" * 50
    assert (two.local_dir("tokenizer", FP, ["tokenizer.json"]) / "tokenizer.json").read_bytes() == b"2" * 50
    assert (two.local_dir("tokenizer", FP) / "tokenizer.json").read_bytes() == b"2" * 50


def test_the_node_cache_is_a_folder_only_its_user_can_write_to(s3, tmp_path, monkeypatch):
    monkeypatch.delenv("LLMPIPE_CACHE_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the machine's temporary folder, for this test
    store = ArtifactStore(s3.uri(f"private-{tmp_path.name}"))
    _commit(store, "train", {"model.safetensors": b"A" * 100})
    planted = tmp_path / "llmpipe-cache" / "train" / FP[:16] / "model.safetensors"  # the old shared path
    planted.parent.mkdir(parents=True)
    planted.write_bytes(b"X" * 100)  # another user's file of the right size

    folder = store.local_dir("train", FP, ["model.safetensors"])
    assert (folder / "model.safetensors").read_bytes() == b"A" * 100
    private = tmp_path / f"llmpipe-{os.getuid()}"
    assert folder.is_relative_to(private)
    assert stat.S_IMODE(private.stat().st_mode) == 0o700 and private.stat().st_uid == os.getuid()

    private.chmod(0o777)  # a folder others can write to may hold planted files: refused, nothing read from it
    with pytest.raises(StoreError, match=rf"^node cache {private}: writable by other users \(mode 0o777\); "):
        store.local_dir("train", FP, ["model.safetensors"])


READ = r"""
import sys, time
from pathlib import Path
from pipeline.engine.store import StageRef
folder = StageRef(sys.argv[1], sys.argv[2], sys.argv[3]).local()
print(folder, flush=True)
while Path(sys.argv[4]).exists():  # hold the copy while the file exists
    time.sleep(0.05)
"""


def _read_in_process(store: ArtifactStore, stage: str, hold: Path | None = None) -> tuple[subprocess.Popen, Path]:
    """Another process reads `stage` through the node cache; it exits at once, or holds its copy while `hold` exists."""
    proc = subprocess.Popen([sys.executable, "-c", READ, store.location, stage, FP, str(hold or "/nonexistent")],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    folder = Path(proc.stdout.readline().strip())
    assert folder.is_dir(), proc.communicate()
    if hold is None:
        assert proc.wait(60) == 0
    return proc, folder


def test_the_cache_evicts_the_least_recently_used_copies_over_its_cap_but_never_one_in_use(s3, cache, tmp_path,
                                                                                           monkeypatch):
    store = ArtifactStore(s3.uri(f"lru-{tmp_path.name}"))
    for stage in ("s1", "s2", "s3", "s4"):
        _commit(store, stage, {"data.bin": bytes(10_000)})
    monkeypatch.setenv("LLMPIPE_CACHE_MAX_GB", str(25_000 / 1e9))  # room for two copies, not three

    hold = tmp_path / "hold"
    hold.touch()
    holder, s1 = _read_in_process(store, "s1", hold)  # s1 in use by a live process
    _, s2 = _read_in_process(store, "s2")  # s2 read and released
    s3_copy = store.local_dir("s3", FP)  # over the cap: s2 goes, s1 is in use and stays
    assert s1.is_dir() and not s2.exists() and s3_copy.is_dir()

    hold.unlink()
    assert holder.wait(60) == 0  # s1 released
    _, s4 = _read_in_process(store, "s4")  # over the cap again: s1 is now the least recently used and free
    assert not s1.exists() and s3_copy.is_dir() and s4.is_dir()
    assert (s3_copy / "data.bin").read_bytes() == bytes(10_000)
