"""Measuring pieces shared by the benchmarks under `bench/`.

A benchmark measures each side in a fresh child process of itself (`python -m bench.<name>
--one KIND ...`, which reports one JSON object on its last line of output), runs the sides
interleaved for `--repeats` rounds and keeps each side's median, then prints a Markdown table
headed by a line describing the machine. Nothing here imports torch or Ray at module level:
the tokenization children import this module too and must stay free of them.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any


def run_one(module: str, kind: str, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Runs `python -m module --one kind *args` and returns the JSON object its last stdout line holds."""
    # `-m` with the parent's cwd and environment: the child finds `bench`, `model`, `pipeline`
    # exactly where the parent did, with no sys.path edits.
    child_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    out = subprocess.run([sys.executable, "-m", module, "--one", kind, *args],
                         check=False, capture_output=True, text=True, env=child_env)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(**result: float) -> None:
    """The child's side of `run_one`: prints its result as the last line of output."""
    print(json.dumps(result))


def seconds(fn: Callable[..., object], *args: object) -> float:
    """Seconds that `fn(*args)` took."""
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def interleaved_medians(sides: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Calls every side once a round, in order, for `repeats` rounds; returns each side's median."""
    # Round by round rather than side after side, so that drifts in machine load hit every side alike;
    # medians, since these machines are noisy.
    results: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            results[name].append(fn())
    return {name: statistics.median(v) for name, v in results.items()}


def row(cells: Sequence[object]) -> str:
    """One Markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def header(columns: Sequence[str]) -> list[str]:
    """A Markdown table's header and separator lines."""
    return [row(columns), "|" + "---|" * len(columns)]


def print_table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    print("\n".join(header(columns) + [row(r) for r in rows]))


def describe_device() -> str:
    """The GPU's name where there is one, else the CPU's core count."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"


def describe_cpu() -> str:
    """The CPU's architecture and torch's thread count, for benchmarks that always run on the CPU."""
    import torch

    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
