"""What the train workers compute on, resolved on the driver so that the fingerprint can hold it.

`train.precision: auto` means bf16 on GPUs that support it and fp32 on CPU, so
one config trains different models on different hardware. The train stage's
fingerprint therefore holds what `auto` resolved to and the device kind (`cpu`
or `cuda`), never the word `auto`: auto and an explicit fp32 on CPU are one
fingerprint, auto on CPU and auto on a bf16 GPU are two, and a model trained on
CPUs is never taken from the cache for a GPU run.

The fingerprint is taken in `plan`, before `execute` brings Ray up, so the
answer must be available there. The rule:
1. whether the workers get GPUs is `cluster.resources.train_gets_gpus`: an
   explicit `resources.train.num_gpus`; else the GPUs of the cluster this
   process is connected to, or of the one `RAY_ADDRESS` names (connected to for
   the question: the run joins it a moment later anyway); else this machine's
   CUDA devices, which are what a local Ray start finds;
2. bf16 support (asked only for `auto` on GPUs): when Ray is connected, of one
   GPU of the cluster, by a tiny Ray task placed like a train worker (its
   custom resources and node labels); else of this machine's GPU 0
   (`torch.cuda.is_bf16_supported`, compute capability 8.0 or newer).
The answer is cached per process. At launch, with Ray up, the stage checks that
the workers really get the device kind the plan assumed (a ConfigError saying
what to set if not), and each worker checks its own device; checkpoints record
both values and a resume across a change of either is refused before launch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from pipeline.cluster.resources import cluster_gpus, task_options, train_gets_gpus
from pipeline.errors import ConfigError
from pipeline.schema import Config, StageResources
from pipeline.stages.train.optim import resolve_precision

PROBE_TIMEOUT_S = 300.0  # a GPU node an autoscaler still has to start


@dataclass(frozen=True)
class TrainHardware:
    device: str  # "cpu" | "cuda"
    precision: str  # "fp32" | "bf16" | "fp16": never "auto"


def resolve_hardware(cfg: Config) -> TrainHardware:
    res = cfg.resources.train
    on_gpu = train_gets_gpus(res)
    bf16 = on_gpu and cfg.train.precision == "auto" and _bf16_supported(res.model_dump_json())
    return TrainHardware(device="cuda" if on_gpu else "cpu",
                         precision=resolve_precision(cfg.train.precision, on_gpu=on_gpu, bf16_supported=bf16))


def _probe() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


@functools.lru_cache(maxsize=8)
def _bf16_supported(resources_json: str) -> bool:
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return _probe()  # Ray will start here: its GPUs are this machine's
    if cluster_gpus() == 0:
        return False  # GPUs were asked for explicitly but none is there: no GPU to ask
    res = StageResources.model_validate_json(resources_json)
    opts = task_options(res, "train", max_calls=1)  # max_calls=1: the worker exits, freeing the GPU context
    opts["num_gpus"] = min(opts["num_gpus"] or 1.0, 1.0)
    try:
        return bool(ray.get(ray.remote(_probe).options(**opts).remote(), timeout=PROBE_TIMEOUT_S))
    except ray.exceptions.GetTimeoutError:
        raise ConfigError(f"train.precision=auto: no GPU of the cluster answered within {PROBE_TIMEOUT_S:.0f}s whether it "
                          "supports bf16; set train.precision (bf16, fp16 or fp32) explicitly") from None
