import pytest

from pipeline.config import ConfigError
from pipeline.train_loop import deepspeed_config, lr_at, resolve_precision

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
