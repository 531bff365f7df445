"""Training step time: our per-worker DeepSpeed loop (ZeRO 0, 1, 2) vs a bare PyTorch loop, side by side.

The baseline is what a nanoGPT user writes: the same GPT, torch AdamW, gradient
accumulation, clipping and LR schedule, the same memory-mapped windows in the same
order, `loss.item()` every step. The pipeline side is `train_loop_per_worker`
called directly in one process (no Ray), with DeepSpeed at ZeRO stage 0, 1 and 2.
Each measurement is a fresh subprocess; runs are interleaved and the median of
`--repeats` is reported, since these machines are noisy. Throughput excludes the
first step (allocation / warm-up) and checkpointing is pushed past the step budget.

    python -m bench.train --repeats 3

The target on CPU is a step time of at most 1.10x the bare loop's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

from bench._measure import (
    describe_device,
    interleaved_medians,
    print_table,
    report,
    run_one,
)

SIZES = {
    "demo (4L/128d, T=128)": {"n_layer": 4, "n_head": 4, "d_model": 128, "max_seq_len": 128, "micro": 16, "gbs": 32},
    "small (6L/256d, T=256)": {"n_layer": 6, "n_head": 8, "d_model": 256, "max_seq_len": 256, "micro": 8, "gbs": 16},
}
VOCAB = 4096


def make_shard(folder: Path) -> str:
    from tokenization.shards import write_shard

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, VOCAB, size=int(n), dtype=np.uint16) for n in rng.integers(500, 5000, size=800)]
    path = folder / "train-00000.arrow"
    write_shard(path, docs, np.dtype(np.uint16))
    return str(path)


def worker_config(size: dict, shard: str, steps: int, zero: int, ckpt_dir: str) -> dict:
    return {
        "model": {"vocab_size": VOCAB, "n_layer": size["n_layer"], "n_head": size["n_head"], "d_model": size["d_model"],
                  "max_seq_len": size["max_seq_len"], "pos_encoding": "learned"},
        "train": {"steps": steps, "seq_len": None, "global_batch_size": size["gbs"], "micro_batch_size": size["micro"],
                  "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2, "weight_decay": 0.1, "betas": [0.9, 0.95],
                  "grad_clip": 1.0, "zero_stage": zero, "precision": "auto", "seed": 0, "deepspeed": {},
                  "checkpoint_every": 10**9, "log_every": 10**9},
        "seq_len": size["max_seq_len"], "train_shards": [shard], "local_checkpoint_dir": ckpt_dir,
    }


def run_pipeline(cfg: dict) -> float:
    from pipeline.stages.train.worker import train_loop_per_worker

    return train_loop_per_worker(cfg)["train/steady_tokens_per_s"]


def run_baseline(cfg: dict) -> float:
    import torch

    from model import GPT, ModelConfig
    from pipeline.stages.train.optim import lr_at
    from tokenization.dataset import TokenWindows, sample_indices

    t = cfg["train"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = GPT(ModelConfig(**cfg["model"])).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.95))
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    data = TokenWindows(cfg["train_shards"], cfg["seq_len"])
    micro, gbs = t["micro_batch_size"], t["global_batch_size"]
    gas = gbs // micro
    total, n = 0.0, 0
    for step in range(t["steps"]):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr=1e-3, min_lr=1e-4, warmup_steps=2, total_steps=t["steps"])
        idx = sample_indices(step, rank=0, world_size=1, global_batch=gbs, num_windows=len(data), seed=0)
        for m in range(gas):
            batch = torch.from_numpy(data.batch(idx[m * micro:(m + 1) * micro])).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = model(batch[:, :-1], batch[:, 1:])
            (loss / gas).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if step > 0:
            total, n = total + time.perf_counter() - t0, n + 1
    return gbs * cfg["seq_len"] * n / total


def one(kind: str, cfg_path: str) -> None:
    cfg = json.loads(Path(cfg_path).read_text())
    tps = run_baseline(cfg) if kind == "baseline" else run_pipeline(cfg)
    report(tokens_per_s=tps)


def measure(side: str, zero: int, size: dict, shard: str, steps: int, tmp: Path) -> float:
    """Tokens/s of one side ("baseline", "zero0", "zero1", "zero2") in a fresh subprocess."""
    kind = "baseline" if side == "baseline" else "pipeline"
    ckpt = tempfile.mkdtemp(dir=tmp, prefix=f"ckpt-{side}-")  # fresh: never resume another run
    p = tmp / f"{kind}.json"
    p.write_text(json.dumps(worker_config(size, shard, steps, zero, ckpt)))
    return run_one("bench.train", kind, str(p))["tokens_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--one", nargs=2, metavar=("KIND", "CONFIG"))
    args = ap.parse_args()
    if args.one:
        return one(*args.one)
    import torch

    print(f"# training throughput, {describe_device()}, torch {torch.__version__}, median of {args.repeats}, {args.steps} steps each")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        shard = make_shard(tmp)
        for name, size in SIZES.items():
            sides = {side: partial(measure, side, zero, size, shard, args.steps, tmp)
                     for side, zero in (("baseline", 0), ("zero0", 0), ("zero1", 1), ("zero2", 2))}
            rows.append((name, interleaved_medians(sides, args.repeats)))
    table = []
    for name, med in rows:
        b = med["baseline"]
        table.append([name, f"{b:,.0f}", *(f"{med[k]:,.0f} ({b / med[k]:.2f}x)" for k in ("zero0", "zero1", "zero2"))])
    print_table(["model", "bare PyTorch tok/s", "ZeRO-0 tok/s (step time)", "ZeRO-1 tok/s (step time)",
                 "ZeRO-2 tok/s (step time)"], table)


if __name__ == "__main__":
    main()
