"""What `llmpipe run` shows: its own lines on the terminal, library output in one log file per stage (no Ray here)."""

from __future__ import annotations

import io
import logging
import os
import re
import sys

import pytest

from pipeline.terminal import Output


def _library_chatter(tag: str) -> None:
    """What Ray, DeepSpeed and MLflow do in the driver: C-level writes, prints, log records (Python warnings
    write to sys.stderr too, but pytest records them instead: the CLI test sees them in the logs)."""
    os.write(1, f"{tag}: C-level stdout\n".encode())
    os.write(2, f"{tag}: C-level stderr\n".encode())
    print(f"{tag}: python stdout")
    print(f"{tag}: python stderr", file=sys.stderr)
    handler = logging.StreamHandler()  # bound to sys.stderr as a library sets it up
    lib = logging.getLogger("llmpipe_test_library")
    lib.addHandler(handler)
    try:
        lib.warning(f"{tag}: a library log record")
    finally:
        lib.removeHandler(handler)


def test_library_output_goes_to_one_log_per_stage_and_only_our_lines_to_the_terminal(tmp_path, capfd):
    term = io.StringIO()
    with Output(term, log_dir=tmp_path / "logs") as out:
        out.line("plan for tiny (store x):")
        assert out.log_dir is None and not (tmp_path / "logs").exists()  # nothing written before the engine starts
        out.capture_logs()
        _library_chatter("setup")
        with out.stage("train") as progress:
            _library_chatter("train")
            progress.update(done=1, total=6, status="step 1/6 loss 5.68")
        out.line("[train] committed in 1.0s")
    assert term.getvalue().splitlines() == [
        "plan for tiny (store x):",
        f"logs: {tmp_path / 'logs'} (Ray, DeepSpeed and MLflow output, a file per stage; -v shows it here)",
        "[train] step 1/6 loss 5.68", "[train] committed in 1.0s"]
    train_log = (tmp_path / "logs" / "train.log").read_text()
    run_log = (tmp_path / "logs" / "run.log").read_text()
    for what in ("C-level stdout", "C-level stderr", "python stdout", "python stderr", "a library log record"):
        assert f"train: {what}" in train_log and f"train: {what}" not in run_log
        assert f"setup: {what}" in run_log and f"setup: {what}" not in train_log
    leaked = capfd.readouterr()
    assert leaked.out == leaked.err == ""  # nothing reached the process's own stdout and stderr
    assert out.failed_log is None


def test_a_failing_stage_names_its_log_and_the_terminal_comes_back(tmp_path, capfd):
    term = io.StringIO()
    with pytest.raises(RuntimeError), Output(term, log_dir=tmp_path / "logs") as out, out.stage("prepare"):
        print("a traceback Ray printed")
        raise RuntimeError("boom")
    assert out.failed_log == tmp_path / "logs" / "prepare.log"
    assert "a traceback Ray printed" in out.failed_log.read_text()
    assert re.search(rf"^\[prepare\] failed after \d+\.\ds \(log: {tmp_path}/logs/prepare.log\)$", term.getvalue(), re.MULTILINE)
    print("after the run")  # stdout is the process's own again
    assert capfd.readouterr().out == "after the run\n"


def test_pipeline_warnings_during_a_run_stay_on_the_terminal(tmp_path):
    term = io.StringIO()
    with Output(term, log_dir=tmp_path / "logs") as out, out.stage("train"):
        logging.getLogger("pipeline.tracking.outbox").warning("MLflow at http://x did not record: run 1: its end status")
    assert term.getvalue().splitlines()[-1] == "llmpipe: warning: MLflow at http://x did not record: run 1: its end status"


def test_verbose_leaves_library_output_where_it_was_and_writes_no_logs(tmp_path, capfd):
    term = io.StringIO()
    with Output(term, log_dir=None) as out, out.stage("train"):
        os.write(1, b"ray says hello\n")
    assert capfd.readouterr().out == "ray says hello\n"
    assert out.log_dir is None and not (tmp_path / "logs").exists()


def test_plain_progress_is_one_prefixed_line_at_most_every_interval(tmp_path):
    term = io.StringIO()
    with Output(term, log_dir=None, progress_every_s=3600) as out, out.stage("prepare") as progress:
        for done in range(1, 15):
            progress.update(done=done, total=14, status=f"{done}/14 shards")
        progress.note("hashed 40 documents")
    assert term.getvalue().splitlines() == ["[prepare] 1/14 shards", "[prepare] hashed 40 documents"]
