"""The GPU benchmark is ready to run where there is a GPU: its dry run builds what the real run would use."""

from __future__ import annotations

import json
import subprocess
import sys


def test_the_gpu_benchmark_dry_run_builds_gpt2_small_and_its_zero_2_bf16_deepspeed_config():
    out = subprocess.run([sys.executable, "-m", "bench.gpu", "--dry-run", "--micro", "8", "--accumulation", "4"],
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    head, _, body = out.stdout.partition("\n")
    assert head.startswith("# GPT-2 small: 124.5M parameters, seq 1024, 32,768 tokens per step (micro 8 x accumulation 4)")
    ds = json.loads(body)
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] is True
    assert ds["train_batch_size"] == 32 == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"]
