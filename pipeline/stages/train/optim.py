"""The optimisation settings as pure functions: the DeepSpeed config and the learning-rate schedule.

`deepspeed_config` is the one place the pipeline's `train` section becomes
DeepSpeed JSON (micro batch x accumulation x world size = global batch, ZeRO
stage and offload, precision, clipping, the raw-JSON escape hatch merged last);
`lr_at` is the LR schedule as a function of the step, so resume is exact.
`defer_deepspeed_compiles` keeps DeepSpeed from importing torch's compiler at
every worker's start for kernels we never run.
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Any

from pipeline.errors import ConfigError

# --- pure pieces -------------------------------------------------------------

def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int, schedule: str = "cosine",
          decay_fraction: float = 0.2) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warmup to `lr`, then
    cosine or linear decay to `min_lr` at `total_steps`, constant, or warmup-stable-decay
    (constant until the last `decay_fraction` of the steps, then linear to `min_lr`)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "wsd":
        decay_start = max(warmup_steps, total_steps - round(decay_fraction * total_steps))
        if step < decay_start:
            return lr
        progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
        return lr + (min_lr - lr) * progress
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return lr + (min_lr - lr) * progress
    assert schedule == "cosine", f"unknown lr schedule {schedule!r}"
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def resolve_precision(precision: str, *, on_gpu: bool, bf16_supported: bool) -> str:
    if precision == "auto":
        return "bf16" if on_gpu and bf16_supported else "fp32"
    if precision in ("bf16", "fp16") and not on_gpu:
        raise ConfigError(f"train.precision={precision} needs a GPU; use fp32 or auto on CPU")
    return precision


def _merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        base[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


def _zero_section(train: dict[str, Any]) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": int(train["zero_stage"])}
    if train.get("offload_optimizer"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if train.get("offload_params"):
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return zero


def deepspeed_config(train: dict[str, Any], *, world_size: int, precision: str) -> dict[str, Any]:
    """The DeepSpeed JSON for a pipeline `train` section (raw `train.deepspeed` merged last)."""
    micro, global_batch = train["micro_batch_size"], train["global_batch_size"]
    if global_batch % (micro * world_size):
        raise ConfigError(f"train.global_batch_size ({global_batch}) must be a multiple of "
                          f"train.micro_batch_size ({micro}) x world size ({world_size})")
    cfg: dict[str, Any] = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": global_batch // (micro * world_size),
        "gradient_clipping": float(train["grad_clip"]),
        "zero_optimization": _zero_section(train),
        "zero_allow_untested_optimizer": True,  # our torch AdamW under ZeRO (no CUDA-only fused Adam)
        "zero_force_ds_cpu_optimizer": False,  # offload keeps our AdamW rather than requiring DeepSpeedCPUAdam
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    cfg = _merge(cfg, copy.deepcopy(train.get("deepspeed") or {}))
    ds = cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * world_size
    if ds != cfg["train_batch_size"]:
        raise ConfigError(f"train.deepspeed: train_batch_size {cfg['train_batch_size']} != micro batch x accumulation x world size ({ds})")
    return cfg


def defer_deepspeed_compiles() -> None:
    """Make DeepSpeed's `compiler.compile()` decorator compile on the first call instead of at decoration.

    `deepspeed.initialize` (ZeRO's optimizer check) and ZeRO-1/2's first gradient reduction import its Muon
    optimizer just to compare our optimizer's type with it, and that module decorates its kernels with
    `torch.compile` at import, which imports torch's inductor: 3.5 s of every training worker's start on a CPU,
    for an optimizer we never build. Deferred, the kernels compile when (if ever) they first run, as before."""
    import deepspeed.runtime.compiler as ds_compiler
    import torch

    if getattr(ds_compiler.compile, "deferred", False):
        return

    def deferring(fn):
        compiled = None

        @functools.wraps(fn)
        def first_call_compiles(*args: Any, **kwargs: Any) -> Any:
            nonlocal compiled
            if compiled is None:
                compiled = torch.compile(fn)
            return compiled(*args, **kwargs)
        return first_call_compiles

    def compile_decorator():  # the signature of DeepSpeed's: called with no arguments, returns the decorator
        return deferring
    compile_decorator.deferred = True
    ds_compiler.compile = compile_decorator
