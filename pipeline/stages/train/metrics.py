"""What training reports besides the loss: throughput and MFU (`Rates`, with the peak FLOP/s table), the time
spent outside steps (`Costs`), the periodic validation loss, the progress line (and the forward pass over a
batch of windows that training and validation share).

Plain PyTorch (DeepSpeed's engine is passed in, never imported), so each piece
can be tested alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from model.config import ModelConfig, flops_per_token
from tokenization.dataset import TokenWindows
from tokenization.pairs import TaskPairs

# Dense bf16 tensor-core peak per GPU, TFLOP/s (vendor datasheets; sparsity not counted).
PEAK_BF16_TFLOPS = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0,
    "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0, "V100": 125.0,
}


def peak_flops(device: torch.device, configured_tflops: float | None) -> float | None:
    """Peak FLOP/s of one worker: the configured value, else the GPU's datasheet value, else None (CPU)."""
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():  # the dict lists specific names before generic ones
        if key in name:
            return tflops * 1e12
    return None


def forward_loss(engine: Any, data: TokenWindows, idx: np.ndarray, device: torch.device, *,
                 objective: Any = None, draw: int = 0, memory: Any = None) -> torch.Tensor:
    """The mean loss over windows `idx` (training and validation alike); with document-aware packing each
    window's segment ids go with it. Task data (a loss mask): the mean over the masked-in targets only, the
    others set to -1, which the model's loss ignores, so prompt tokens get exactly zero gradient. Masked LM or
    span corruption (an `objective`, `pipeline.objectives`): the windows' first T tokens corrupted by its draw
    `draw` into the model's inputs and targets (an encoder's, an encoder-decoder's source, decoder input and
    target). A segment memory (`model.memory`), given, is read and advanced by these windows."""
    kw: dict[str, Any] = {"memory": memory} if memory is not None else {}  # (not `if memory`: an empty one has len 0)
    if objective is not None:
        arrays = objective.model_inputs(data.batch(idx)[:, :-1], idx, draw=draw)
        return engine(*(torch.from_numpy(a).to(device) for a in arrays), **kw)
    if isinstance(data, TaskPairs):  # seq2seq: records' sources and targets, right-padded
        src, src_mask, tgt_in, tgt = (torch.from_numpy(a).to(device) for a in data.batch(idx))
        return engine(src, tgt_in, tgt, src_mask=src_mask)
    batch = torch.from_numpy(data.batch(idx)).to(device)  # (micro, T+1)
    if data.documents:
        kw["segment_ids"] = torch.from_numpy(data.segments(idx)).to(device)  # (micro, T)
    targets = batch[:, 1:]
    if data.masked:
        mask = data.loss_mask(idx)
        if not mask.any():  # nothing to learn in these windows (all prompt): a zero loss, still one forward pass
            return engine(batch[:, :-1], targets, **kw) * 0.0  # (ZeRO-3 ranks gather in step)
        targets = targets.masked_fill(~torch.from_numpy(mask).to(device), -1)
    return engine(batch[:, :-1], targets, **kw)


@torch.no_grad()
def validation_loss(engine: Any, windows: TokenWindows, *, rank: int, world: int, max_tokens: int, micro: int,
                    device: torch.device, objective: Any = None) -> float:
    """Mean loss over the first windows holding `max_tokens` targets, split across ranks and all-reduced
    (with the windows' segment ids when they carry documents: validation in the mode training uses).
    Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively). Masked LM and
    span corruption: the fixed corruption of draw 0, the same at every evaluation."""
    per_item = windows.seq_len if isinstance(windows, TokenWindows) else max(1, windows.num_tokens // max(1, len(windows)))
    n = min(len(windows), max(world, max_tokens // per_item))
    mine = np.arange(rank, n - n % world, world)
    totals = torch.zeros(2, device=device, dtype=torch.float64)
    engine.eval()
    for i in range(0, len(mine), micro):
        idx = mine[i : i + micro]
        loss = forward_loss(engine, windows, idx, device, objective=objective)
        totals += torch.tensor([loss.item() * len(idx), len(idx)], device=device, dtype=torch.float64)
    engine.train()
    torch.distributed.all_reduce(totals)
    return float(totals[0] / totals[1])


@dataclass
class Costs:
    """Seconds of this worker outside optimizer steps: its start-up (data, process group, model, DeepSpeed,
    resume) and its checkpoints, beside the seconds in steps (this run's). Reported with the final step, whose
    metrics are written during the final checkpoint's save: `checkpoint_s` is the mean of the ones before it."""

    startup_s: float
    steps_s: float = 0.0
    checkpoints: int = 0
    checkpoint_total_s: float = 0.0

    def saved(self, seconds: float) -> None:
        self.checkpoints, self.checkpoint_total_s = self.checkpoints + 1, self.checkpoint_total_s + seconds

    def metrics(self) -> dict[str, float]:
        m = {"train/startup_s": self.startup_s, "train/steps_s": self.steps_s}
        if self.checkpoints:
            m["train/checkpoint_s"] = self.checkpoint_total_s / self.checkpoints
        return m


class Rates:
    """Throughput, MFU and memory for the step metrics (first step of a process excluded from the summary)."""

    def __init__(self, train: dict[str, Any], model: dict[str, Any], seq_len: int, device: torch.device, world: int):
        self.tokens_per_step = train["global_batch_size"] * seq_len
        self.samples_per_step = train["global_batch_size"]
        self.flops_per_token = flops_per_token(ModelConfig(**model), seq_len=seq_len)
        peak = peak_flops(device, train.get("peak_tflops"))
        self.peak_total = peak * world if peak else None
        self.device = device
        self.steady_time, self.steady_steps = 0.0, 0

    def metrics(self, loss: float, lr: float, dt: float, done: int, *, first: bool, grad_norm: Any) -> dict[str, float]:
        if not first:
            self.steady_time, self.steady_steps = self.steady_time + dt, self.steady_steps + 1
        tps = self.tokens_per_step / dt
        m = {"train/loss": loss, "train/lr": lr, "train/tokens_per_s": tps, "train/samples_per_s": self.samples_per_step / dt,
             "train/step_time_s": dt, "train/tokens": float(done * self.tokens_per_step)}
        if grad_norm is not None:
            m["train/grad_norm"] = float(grad_norm)
        if self.peak_total:
            m["train/mfu"] = tps * self.flops_per_token / self.peak_total
        if self.device.type == "cuda":
            m["train/gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return m

    def summary(self) -> dict[str, float]:
        if not self.steady_steps:
            return {}
        tps = self.tokens_per_step * self.steady_steps / self.steady_time
        out = {"train/steady_tokens_per_s": tps}
        if self.peak_total:
            out["train/steady_mfu"] = tps * self.flops_per_token / self.peak_total
        return out



def progress_line(step: int, total: int, metrics: dict[str, float], elapsed_s: float, done_before: int) -> str:
    """`step 120/500 (24%) loss 4.812 lr 1.9e-03 12.3k tok/s ETA 2m05s` from rank 0."""
    rate = (step - done_before) / max(elapsed_s, 1e-9)
    eta = (total - step) / rate if rate > 0 else float("nan")
    eta_s = f"{int(eta // 60)}m{int(eta % 60):02d}s" if eta == eta else "?"
    mfu = f" MFU {metrics['train/mfu']:.1%}" if "train/mfu" in metrics else ""
    return (f"step {step}/{total} ({step / total:.0%}) loss {metrics['train/loss']:.4f} lr {metrics['train/lr']:.2e} "
            f"{metrics['train/tokens_per_s'] / 1e3:.1f}k tok/s{mfu} ETA {eta_s}")
