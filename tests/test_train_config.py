import os
import subprocess
import sys

import pytest

from pipeline.errors import ConfigError
from pipeline.stages.train.optim import deepspeed_config, lr_at, resolve_precision

TRAIN = {"micro_batch_size": 4, "global_batch_size": 32, "grad_clip": 1.0, "zero_stage": 2, "deepspeed": {}}


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_micro_batch_times_accumulation_times_world_is_the_global_batch(world):
    ds = deepspeed_config(TRAIN, world_size=world, precision="fp32")
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world == ds["train_batch_size"] == 32
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 1.0
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]


def test_indivisible_global_batch_is_a_config_error():
    with pytest.raises(ConfigError, match=r"global_batch_size \(32\) must be a multiple of .* world size \(3\)"):
        deepspeed_config(TRAIN, world_size=3, precision="fp32")


def test_raw_deepspeed_json_is_merged_last_and_still_checked():
    ds = deepspeed_config({**TRAIN, "deepspeed": {"zero_optimization": {"reduce_bucket_size": 1000}}}, world_size=2, precision="bf16")
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000} and ds["bf16"]["enabled"]
    with pytest.raises(ConfigError, match="train_batch_size 32 != micro batch"):
        deepspeed_config({**TRAIN, "deepspeed": {"gradient_accumulation_steps": 1}}, world_size=2, precision="fp32")


def test_precision_auto_is_fp32_on_cpu_and_half_precision_needs_a_gpu():
    assert resolve_precision("auto", on_gpu=False, bf16_supported=False) == "fp32"
    assert resolve_precision("auto", on_gpu=True, bf16_supported=True) == "bf16"
    with pytest.raises(ConfigError, match="train.precision=bf16 needs a GPU"):
        resolve_precision("bf16", on_gpu=False, bf16_supported=False)


def test_lr_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert lr_at(0, **kw) == pytest.approx(0.1) and lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)
    assert lr_at(110, **kw) == pytest.approx(0.1)
    values = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("schedule,expected", [
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.5, 1.0, 1.0, 0.8875, 0.775, 0.6625, 0.55, 0.4375, 0.325, 0.2125]),
    ("wsd", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.7, 0.4]),
])
def test_lr_schedules(schedule, expected):
    got = [lr_at(s, lr=1.0, min_lr=0.1, warmup_steps=2, total_steps=10, schedule=schedule, decay_fraction=0.3) for s in range(10)]
    assert got == pytest.approx(expected)


def test_offload_goes_into_the_zero_section_and_impossible_combinations_are_config_errors(tmp_path):
    from pipeline.config import parse_config
    from tests.conftest import tiny_raw

    ds = deepspeed_config({**TRAIN, "zero_stage": 3, "offload_optimizer": True, "offload_params": True}, world_size=2, precision="fp32")
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    with pytest.raises(ConfigError, match="train.offload_params needs train.zero_stage 3, got 2"):
        parse_config(tiny_raw(tmp_path, tmp_path, train={"offload_params": True, "zero_stage": 2}))
    with pytest.raises(ConfigError, match="train.offload_optimizer needs train.zero_stage >= 1"):
        parse_config(tiny_raw(tmp_path, tmp_path, train={"offload_optimizer": True, "zero_stage": 0}))


def test_a_global_batch_in_tokens_sets_the_batch_in_sequences(tmp_path):
    from pipeline.config import parse_config
    from tests.conftest import tiny_raw

    cfg = parse_config(tiny_raw(tmp_path, tmp_path, train={"global_batch_tokens": 512}))  # seq_len 32
    assert cfg.train.global_batch_size == 16
    with pytest.raises(ConfigError, match=r"global_batch_tokens \(500\) must be a multiple of the sequence length \(32\)"):
        parse_config(tiny_raw(tmp_path, tmp_path, train={"global_batch_tokens": 500}))


def test_mfu_uses_the_configured_peak_and_the_progress_line_reads_well():
    import torch

    from pipeline.stages.train.metrics import peak_flops, progress_line

    assert peak_flops(torch.device("cpu"), None) is None and peak_flops(torch.device("cpu"), 2.0) == 2e12
    line = progress_line(120, 500, {"train/loss": 4.8123, "train/lr": 1.9e-3, "train/tokens_per_s": 12345.0, "train/mfu": 0.4},
                         elapsed_s=60.0, done_before=0)
    assert line == "step 120/500 (24%) loss 4.8123 lr 1.90e-03 12.3k tok/s MFU 40.0% ETA 3m10s"


def test_precision_auto_is_resolved_on_the_driver_and_fingerprinted_as_what_it_resolved_to(tiny_config):
    """auto and an explicit fp32 on CPU train the same model: one fingerprint. auto on a bf16 GPU trains another:
    a CPU-trained model is never taken from the cache for it."""
    from pipeline.engine.stage import fingerprint
    from pipeline.stages.train.hardware import TrainHardware, resolve_hardware
    from pipeline.stages.train.stage import STAGE, section_for

    up = {"tokenizer": "t" * 64, "prepare": "p" * 64}
    auto, fp32 = tiny_config(), tiny_config(train={"precision": "fp32"})
    assert resolve_hardware(auto) == TrainHardware(device="cpu", precision="fp32")  # no GPU here, nor in a local Ray
    assert STAGE.section(auto)["train"]["precision"] == "fp32" and STAGE.section(auto)["train"]["device"] == "cpu"
    assert fingerprint(STAGE, STAGE.section(auto), up) == fingerprint(STAGE, STAGE.section(fp32), up)
    gpu = section_for(auto, TrainHardware(device="cuda", precision="bf16"))
    assert gpu["train"]["precision"] == "bf16" and gpu["train"]["device"] == "cuda"
    assert fingerprint(STAGE, gpu, up) != fingerprint(STAGE, STAGE.section(auto), up)
    assert fingerprint(STAGE, section_for(auto, TrainHardware(device="cuda", precision="fp32")), up) != \
        fingerprint(STAGE, STAGE.section(auto), up)  # fp32 on a GPU is another device kind: another fingerprint
    with pytest.raises(ConfigError, match="train.precision=bf16 needs a GPU"):  # refused when planned, not at launch
        STAGE.section(tiny_config(train={"precision": "bf16"}))


def test_deepspeed_imports_no_compiler_at_a_workers_start_and_its_kernels_still_compile_when_first_run():
    """A worker's `deepspeed.initialize` imports DeepSpeed's Muon optimizer (to compare types with ours), whose
    kernels are decorated with torch.compile: deferred, the import costs no inductor, and a decorated function
    still runs compiled on its first call."""
    code = """
import sys
from pipeline.stages.train.optim import defer_deepspeed_compiles
defer_deepspeed_compiles()
import deepspeed.runtime.zero.muon.muon_optimizer
print("inductor at import:", "torch._inductor.compile_fx" in sys.modules)
import torch
from deepspeed.runtime import compiler
compiled = []
torch.compile = lambda fn: compiled.append(fn) or fn  # what the first call hands torch.compile (not a real compile)
square = compiler.compile()(lambda x: x * x)
print("before the first call:", len(compiled), "after two:", square(3) + square(4) - 25 + len(compiled))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[-2:] == ["inductor at import: False", "before the first call: 0 after two: 1"]
