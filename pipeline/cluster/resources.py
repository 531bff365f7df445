"""Where stages run: a stage's `resources.<stage>` section as Ray task options or Ray Train scaling.

`task_options` and `train_scaling` turn a stage's `resources.<stage>` section
into Ray task options or Ray Train `ScalingConfig` arguments, so every stage
asks for its CPUs, GPUs, memory, custom resources and node labels the same way
(GPU stages default to one GPU when the cluster has any). `train_gets_gpus`
answers, before Ray starts if need be, whether the train workers will get GPUs:
the device kind that the train stage resolves into its fingerprint. Nothing
else here enters a fingerprint.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from pipeline.schema import StageResources

GPU_STAGES = ("train", "evaluate", "decode", "tasks")


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def train_gets_gpus(res: StageResources) -> bool:
    """Whether the train workers will get GPUs: the rule `train_scaling` applies once Ray is up, answered earlier
    when it must be (the plan fingerprints it). An explicit `resources.train.num_gpus` decides; else the GPUs of the
    cluster this process is connected to, or of the one `RAY_ADDRESS` names (connected to for the question, as the
    run would be a moment later); else this machine's CUDA devices, which is what a local Ray start finds."""
    if res.num_gpus is not None:
        return res.num_gpus > 0
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        if not os.environ.get("RAY_ADDRESS"):
            import torch

            return torch.cuda.device_count() > 0
        from pipeline.cluster.runtime import RayRuntime

        RayRuntime().ensure()
    return cluster_gpus() > 0


def gpus_per_task(res: StageResources, stage: str) -> float:
    if res.num_gpus is not None:
        return res.num_gpus
    return 1.0 if stage in GPU_STAGES and cluster_gpus() > 0 else 0.0


def task_options(res: StageResources, stage: str, **extra: Any) -> dict[str, Any]:
    """Ray `.options(...)` for a task of `stage`."""
    opts: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": gpus_per_task(res, stage), **extra}
    if res.memory_gb:
        opts["memory"] = int(res.memory_gb * 2**30)
    if res.custom:
        opts["resources"] = dict(res.custom)
    if res.label_selector:
        opts["label_selector"] = dict(res.label_selector)
    if res.spread:
        opts["scheduling_strategy"] = "SPREAD"
    return opts


def train_scaling(res: StageResources, num_workers: int) -> dict[str, Any]:
    """`ScalingConfig` arguments: one worker per GPU by default when the cluster has GPUs."""
    gpus = gpus_per_task(res, "train")
    per_worker: dict[str, float] = {"CPU": res.num_cpus, **res.custom}
    if gpus:
        per_worker["GPU"] = gpus
    if res.memory_gb:
        per_worker["memory"] = res.memory_gb * 2**30
    kw: dict[str, Any] = {"num_workers": num_workers, "use_gpu": gpus > 0, "resources_per_worker": per_worker,
                          "placement_strategy": "SPREAD" if res.spread else "PACK"}
    if res.label_selector:
        kw["label_selector"] = dict(res.label_selector)
    return kw
