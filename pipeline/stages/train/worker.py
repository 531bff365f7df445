"""The per-worker training function: plain PyTorch + DeepSpeed, with or without Ray.

`train_loop_per_worker(config)` is what Ray Train's `TorchTrainer` runs on every
worker; benchmarks call it directly in one process. Everything it needs comes
from its argument. It runs for a step budget (no epochs), reads its samples
from the memory-mapped shards by a pure function of the step, and checkpoints
through DeepSpeed's save/load. Under Ray each rank's checkpoint files (with its
marker and RNG states) are reported with `ray.train.report`, which merges them
into one folder in the run's storage; a worker-group restart or a rerun resumes
from the newest one that verifies, which rank 0 chooses for all. Without Ray
they go to a local folder. The precision and device kind come resolved from the
driver (a direct call may still say `auto`); the worker checks it got them.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import (
    ModelConfig,
    build_model,
    save_model,
    state_dict_for_save,
)
from model.lora import LoraOptions, add_adapters, is_adapted
from pipeline import faults
from pipeline.engine.store import StageRef
from pipeline.errors import TrainingError
from pipeline.objectives import Objective, objective_from_ids
from pipeline.stages.train.checkpoints import (
    STATE,
    Checkpoints,
    check_same_hardware,
    check_same_layout,
    step_name,
)
from pipeline.stages.train.init_from import check_init_compatible, initial_weights
from pipeline.stages.train.lora import final_weights, write_adapter
from pipeline.stages.train.memory import TrainMemories, memories_for
from pipeline.stages.train.metrics import Costs, Rates, forward_loss, validation_loss
from pipeline.stages.train.optim import (
    deepspeed_config,
    defer_deepspeed_compiles,
    lr_at,
    resolve_precision,
)
from pipeline.stages.train.progress import report_progress
from pipeline.stages.train.rng import load_rng, restore_rng, save_rng, seed_rank
from pipeline.tracking.mlflow import step_logger
from tokenization.dataset import TokenWindows, sample_indices, segment_indices
from tokenization.mixture import mixture_indices
from tokenization.pairs import TaskPairs
from tokenization.shards import shard_paths

DS_TAG = "deepspeed"


# --- the worker ----------------------------------------------------------------

@dataclass
class WorkerConfig:
    model: dict[str, Any]
    train: dict[str, Any]
    seq_len: int
    train_shards: list[str]
    val_shards: list[str] = field(default_factory=list)
    prepare: dict[str, str] | None = None  # a prepare StageRef's fields: the shards are opened on this worker's node
    local_checkpoint_dir: str | None = None  # without Ray: where checkpoints go (under Ray: the run's storage)
    tracking_uri: str | None = None
    run_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # provenance written into model.json
    mixture: dict[str, float] = field(default_factory=dict)  # {source: weight} of a data mixture; empty: one corpus
    objective: dict[str, Any] | None = None  # masked LM / span corruption: the tokenizer's ids; None: causal LM
    progress: Any = None  # the driver's progress sink (a Ray actor); without one rank 0 prints its progress line


def _in_ray_train() -> bool:
    try:
        import ray.train

        ray.train.get_context().get_world_rank()
        return True
    except Exception:  # noqa: BLE001 - "not inside a Ray Train worker" has no single exception type
        return False


def _init_single_process(backend: str) -> None:
    import deepspeed

    if not torch.distributed.is_initialized():
        for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(k, v)
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        deepspeed.init_distributed(dist_backend=backend)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not biases, norms); frozen parameters (a LoRA base) are not optimised."""
    trained = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trained if p.dim() >= 2]
    no_decay = [p for p in trained if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class NonFiniteLoss(TrainingError):
    """The loss became NaN or infinite: training stops, the last good checkpoint is kept."""


def _device_and_group() -> tuple[torch.device, bool]:
    if _in_ray_train():
        import ray.train.torch

        return ray.train.torch.get_device(), True
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    _init_single_process("nccl" if device.type == "cuda" else "gloo")
    return device, False


def _hardware(t: dict[str, Any], device: torch.device) -> dict[str, str]:
    """The precision and device kind this worker trains in: the driver's resolution, which it must have got."""
    if t.get("device", device.type) != device.type:
        raise TrainingError(f"train: the driver resolved device {t['device']} (it is in the fingerprint) but this worker "
                            f"got {device}; set resources.train.num_gpus explicitly")
    on_gpu = device.type == "cuda"
    precision = resolve_precision(t["precision"], on_gpu=on_gpu, bf16_supported=on_gpu and torch.cuda.is_bf16_supported())
    return {"precision": precision, "device": device.type}


def _build(cfg: WorkerConfig, device: torch.device, world: int, precision: str) -> tuple[Any, torch.optim.Optimizer, dict[str, Any]]:
    """Model (from init_from weights if given), AdamW and the DeepSpeed engine."""
    import deepspeed

    defer_deepspeed_compiles()

    t = cfg.train
    torch.manual_seed(t["seed"])  # the initial weights: one function of the seed, the same on every rank
    model = build_model(ModelConfig(**cfg.model))
    if t.get("init_from"):
        init_config, state_dict = initial_weights(t["init_from"])
        check_init_compatible(init_config, cfg.model, t["init_from"])
        model.load_state_dict(state_dict, strict=False)  # strict=False only for a tied lm_head.weight
    if t.get("lora"):  # adapters on the loaded base, which PEFT freezes; A drawn from the seeded generator
        add_adapters(model, LoraOptions(**t["lora"]))
    model.to(device)
    optimizer = torch.optim.AdamW(_param_groups(model, t["weight_decay"]), lr=t["lr"], betas=tuple(t["betas"]), eps=1e-8)
    ds_config = deepspeed_config(t, world_size=world, precision=precision)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if t.get("compile"):  # in place (nn.Module.compile): parameter names, hence checkpoints, stay those of eager
        engine.compile(backend=t.get("compile_backend", "inductor"))
    return engine, optimizer, ds_config


def _choose(checkpoints: Checkpoints, rank: int, device: torch.device) -> tuple[Path | None, str]:
    """The checkpoint to resume, chosen by rank 0 for every rank (each verifies its own copy), and this worker
    group's attempt id, which marks the checkpoints it writes."""
    chosen, error = None, None
    if rank == 0:
        try:
            chosen = checkpoints.latest()
        except TrainingError as e:  # say it on every rank, not only on rank 0
            error = e
    # [step of the choice (-1: none, -2: rank 0 refused), attempt id]; secrets leaves the training RNGs alone
    msg = torch.tensor([-2 if error else -1 if chosen is None else int(chosen.name.removeprefix("step_")),
                        secrets.randbits(62)], dtype=torch.int64, device=device)
    torch.distributed.broadcast(msg, src=0)
    step, attempt = int(msg[0]), f"{int(msg[1]):016x}"
    if error is not None:
        raise error
    if step == -2:
        raise TrainingError(f"train: rank 0 found no checkpoint under {checkpoints.root} that verifies; refusing to "
                            "restart from scratch")
    if step == -1 or rank == 0:
        return chosen, attempt
    return checkpoints.at(step), attempt


def _resume(engine: Any, checkpoints: Checkpoints, cfg: WorkerConfig, rank: int, device: torch.device,
            hw: dict[str, str], memories: TrainMemories | None) -> tuple[int, str, dict[str, float]]:
    """(the step to start from, this attempt's id, the metrics of the checkpoint resumed from): step 0 and no
    metrics without a checkpoint. The rank's RNG states (and segment memories) come back with its DeepSpeed states."""
    latest, attempt = _choose(checkpoints, rank, device)
    if latest is None:
        return 0, attempt, {}
    try:
        state = json.loads((latest / STATE).read_text())
        _check_compatible(state, cfg, checkpoints.where(latest.name), hw)
        load_path, _ = engine.load_checkpoint(str(latest), tag=DS_TAG)
        # DeepSpeed treats a missing checkpoint as "start from scratch"; a run that has one must never do that.
        assert load_path is not None, f"DeepSpeed found no checkpoint in {latest}/{DS_TAG}: refusing to restart from scratch"
        restore_rng(load_rng(latest, rank=rank), device)
        if memories is not None:
            memories.load(latest, rank=rank, device=device)
    finally:
        checkpoints.close()
    print(f"[rank {rank}] resumed from {checkpoints.where(latest.name)} at step {state['step']}", flush=True)
    return int(state["step"]), attempt, state.get("metrics", {})


def _one_step(engine: Any, data: TokenWindows, idx: np.ndarray, *, micro: int, gas: int, device: torch.device,
              step: int, objective: Objective | None, memories: TrainMemories | None) -> torch.Tensor:
    """Forward/backward over the accumulation micro-batches; returns this rank's summed loss."""
    loss_sum = torch.zeros((), device=device)
    draw = objective.draw_for(step) if objective is not None else 0
    memory = memories.for_step(step) if memories is not None else [None] * gas
    for m in range(gas):
        loss = forward_loss(engine, data, idx[m * micro : (m + 1) * micro], device, objective=objective, draw=draw,
                            memory=memory[m])
        if faults.triggered("train.nan", step + 1):
            loss = loss * float("nan")
        engine.backward(loss)
        engine.step()
        loss_sum += loss.detach().float()
    return loss_sum


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, float]:
    t_begin = time.perf_counter()
    cfg = WorkerConfig(**config)
    per_source: list[int] = []  # a mixture's train shards, source after source: how many each source has
    if cfg.prepare:
        folder = StageRef(**cfg.prepare).local()
        groups = [shard_paths(folder, source=name) for name in cfg.mixture] or [shard_paths(folder)]
        cfg.train_shards, cfg.val_shards = [p for g in groups for p in g], shard_paths(folder, split="val")
        per_source = [len(g) for g in groups] if cfg.mixture else []
    device, under_ray = _device_and_group()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    t = cfg.train
    hw = _hardware(t, device)
    engine, optimizer, ds_config = _build(cfg, device, world, hw["precision"])
    seed_rank(t["seed"], rank)  # dropout masks differ across ranks; restored from the checkpoint on resume
    micro, gas = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
    checkpoints = Checkpoints.for_worker(under_ray, cfg.local_checkpoint_dir, rank)
    documents = t.get("packing", "stream") == "documents"
    data = _dataset(cfg, cfg.train_shards, documents)
    memories = memories_for(cfg.model.get("memory_len", 0), windows=len(data), global_batch=t["global_batch_size"],
                            micro_batches=gas, seq_len=cfg.seq_len)
    start_step, attempt, resumed = _resume(engine, checkpoints, cfg, rank, device, hw, memories)
    draw = _sampler(cfg, data, per_source, rank=rank, world=world)
    val = _dataset(cfg, cfg.val_shards, documents) if t.get("eval_every") and cfg.val_shards else None
    # masked LM, span corruption: the corruption of each window, from the train options and the driver's ids
    objective = objective_from_ids(cfg.objective, t, cfg.model["vocab_size"])
    logger = step_logger(cfg.tracking_uri, cfg.run_id, rank)
    rates = Rates(cfg.train, cfg.model, cfg.seq_len, device, world)
    steps, last = t["steps"], resumed  # the resumed checkpoint's metrics, until this run logs its own
    t_start = time.perf_counter()
    costs = Costs(startup_s=t_start - t_begin)  # what the run spent outside optimizer steps, in the final metrics
    for step in range(start_step, steps):
        t0 = time.perf_counter()
        lr = lr_at(step, lr=t["lr"], min_lr=t["min_lr"], warmup_steps=t["warmup_steps"], total_steps=steps,
                   schedule=t.get("lr_schedule", "cosine"), decay_fraction=t.get("decay_fraction", 0.2))
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = draw(step)
        loss_sum = _one_step(engine, data, idx, micro=micro, gas=gas, device=device, step=step, objective=objective,
                             memories=memories)
        torch.distributed.all_reduce(loss_sum)
        loss_avg = loss_sum.item() / (gas * world)
        done = step + 1
        if not math.isfinite(loss_avg) and not (engine.fp16_enabled() and not engine.was_step_applied()):
            raise NonFiniteLoss(f"train: loss is {loss_avg} at step {done}; stopping (checkpoints up to step "
                                f"{done - done % t['checkpoint_every']} are kept)")
        dt = time.perf_counter() - t0
        costs.steps_s += dt
        last = rates.metrics(loss_avg, lr, dt, done, first=step == start_step, grad_norm=engine.get_global_grad_norm())
        if done == steps:  # once, with the final step's point and in the final checkpoint's metrics
            last |= costs.metrics()
        if val is not None and (done % t["eval_every"] == 0 or done == steps):
            last["train/val_loss"] = validation_loss(engine, val, rank=rank, world=world, max_tokens=t["eval_tokens"],
                                                     micro=micro, device=device, objective=objective)
        if done % t["log_every"] == 0 or done == steps or step == start_step:
            logger.log_metrics(last, step=done)
            report_progress(cfg.progress, rank, done, steps, last, time.perf_counter() - t_start, start_step)
        if done % t["checkpoint_every"] == 0 or done == steps:
            t_save = time.perf_counter()
            _save(engine, checkpoints, cfg, done, final=done == steps, rank=rank, metrics=last, attempt=attempt, hw=hw,
                  device=device, memories=memories)
            costs.saved(time.perf_counter() - t_save)
            faults.maybe_fail("train.step", done)
    if start_step >= steps:  # resumed from the final checkpoint: re-report it (with its metrics) for the driver
        _save(engine, checkpoints, cfg, steps, final=True, rank=rank, metrics=last, attempt=attempt, hw=hw, device=device,
              memories=memories)
    logger.close()  # step points queued during a tracking outage: sent now, or reported as lost
    return {**last, **rates.summary()}


def _dataset(cfg: WorkerConfig, shards: list[str], documents: bool) -> TokenWindows | TaskPairs:
    """Windows of the token stream, or (seq2seq) one source/target pair per record, both up to seq_len tokens."""
    if cfg.objective and cfg.objective["kind"] == "seq2seq":
        return TaskPairs(shards, max_source=cfg.seq_len, max_target=cfg.seq_len, eos_id=cfg.objective["eos_id"],
                         start_id=cfg.objective["start_id"])
    return TokenWindows(shards, cfg.seq_len, documents=documents)


def _sampler(cfg: WorkerConfig, data: TokenWindows | TaskPairs, per_source: list[int], *, rank: int, world: int):
    """step -> this rank's window indices: the seeded order over all windows, a segment memory's streams of
    consecutive windows, or a mixture's weighted draw over its sources' windows (`tokenization.mixture`); a pure
    function of the step each."""
    t = cfg.train
    if cfg.model.get("memory_len", 0):
        return lambda step: segment_indices(step, rank=rank, world_size=world, global_batch=t["global_batch_size"],
                                            num_windows=len(data), seed=t["seed"])
    if not cfg.mixture:
        return lambda step: sample_indices(step, rank=rank, world_size=world, global_batch=t["global_batch_size"],
                                           num_windows=len(data), seed=t["seed"])
    bounds = np.concatenate([[0], np.cumsum(per_source)])
    ranges = [(int(data.starts[a]), int(data.starts[b])) for a, b in zip(bounds[:-1], bounds[1:])]
    for name, (lo, hi) in zip(cfg.mixture, ranges):
        if hi <= lo:
            raise TrainingError(f"train: data source {name!r} has no training window of {cfg.seq_len + 1} tokens; "
                                "give it more text or train on a shorter train.seq_len")
    weights = list(cfg.mixture.values())
    return lambda step: mixture_indices(step, rank=rank, world_size=world, global_batch=t["global_batch_size"],
                                        ranges=ranges, weights=weights, seed=t["seed"])[0]


def _save(engine: Any, checkpoints: Checkpoints, cfg: WorkerConfig, step: int, *, final: bool, rank: int,
          metrics: dict[str, float], attempt: str, hw: dict[str, str], device: torch.device,
          memories: TrainMemories | None) -> None:
    """Every rank writes its DeepSpeed shards and RNG states; rank 0 adds the step state (and, at the end, the
    consolidated model); each rank's marker vouches for its files; the report merges them into one folder."""
    tmp = Path(tempfile.mkdtemp(prefix=f"llmpipe-ckpt-r{rank}-"))
    world = torch.distributed.get_world_size()
    try:
        (tmp / DS_TAG).mkdir()
        engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
        save_rng(tmp, rank=rank, device=device)
        if memories is not None:
            memories.save(tmp, rank=rank)
        state_dict, adapter = _consolidated_state_dict(engine, rank, cfg.train) if final else (None, None)
        if rank == 0:
            if state_dict is not None:
                save_model(tmp, state_dict, engine.module.config, step=step, **cfg.meta)
            if adapter is not None:  # LoRA: the model above is merged; the adapter goes beside it
                write_adapter(tmp, *adapter)
            (tmp / STATE).write_text(json.dumps({"step": step, "final": final, "metrics": metrics, "model": cfg.model,
                                                 "world_size": world, **hw,
                                                 "global_batch_size": cfg.train["global_batch_size"]}))
        checkpoints.report({**metrics, "step": step}, tmp, step_name(step), world_size=world, attempt=attempt)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_compatible(state: dict[str, Any], cfg: WorkerConfig, where: str, hw: dict[str, str]) -> None:
    """Refuse to resume from a checkpoint of another model, data-parallel layout, precision or device kind,
    naming both values."""
    world = torch.distributed.get_world_size()
    # through ModelConfig: a checkpoint written before a field existed holds it at its default
    ours = ModelConfig(**cfg.model).to_dict()
    theirs = ModelConfig(**state["model"]).to_dict() if "model" in state else ours
    if theirs != ours:
        diff = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
        raise TrainingError(f"train: checkpoint {where} is for another model: " + ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items()))
    check_same_layout(state, world, where)
    check_same_hardware(state, hw["precision"], hw["device"], where)


def _consolidated_state_dict(engine: Any, rank: int, train: dict[str, Any]) -> tuple[dict[str, torch.Tensor] | None, Any]:
    """Full fp32-or-training-precision weights on rank 0, from any ZeRO stage, and with LoRA the adapter's
    (tensors, adapter.json); the weights are then the base with the adapters merged in."""
    import contextlib

    import deepspeed

    module = engine.module
    gathered = (deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
                if engine.zero_optimization_stage() == 3 else contextlib.nullcontext())  # ZeRO-3: all ranks enter
    with gathered:
        if rank != 0:
            return None, None
        if is_adapted(module):
            merged, adapter, meta = final_weights(module, train)
            return merged, (adapter, meta)
        return state_dict_for_save(module), None
