"""LoRA vs full fine-tuning: step time and peak memory of our per-worker DeepSpeed loop on the same model.

Both sides are `train_loop_per_worker` called directly in one process (no Ray), DeepSpeed ZeRO-2, the same
model, data, batch and steps; the LoRA side adds `train.lora` (r=8 on every linear layer of each block). Each
measurement is a fresh subprocess of `bench.train`'s shape; sides are interleaved and the median of
`--repeats` is kept. Step time is the steady one (first step excluded). Memory on the CPU is the process's
peak resident set minus its resident set just before training (after imports): what the model, its gradients,
the optimizer states and the activations added. On a GPU it is `torch.cuda.max_memory_allocated`.

    python -m bench.lora --repeats 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
from functools import partial
from pathlib import Path

from bench._measure import (
    describe_device,
    interleaved_medians,
    print_table,
    report,
    run_one,
)
from bench.train import SIZES, make_shard, worker_config

LORA = {"r": 8, "alpha": 16.0, "dropout": 0.0, "targets": ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"]}


def _rss_mib() -> float:
    """This process's current resident set, MiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def one(kind: str, cfg_path: str) -> None:
    import torch

    from pipeline.stages.train.worker import train_loop_per_worker

    cfg = json.loads(Path(cfg_path).read_text())
    if kind == "lora":
        cfg["train"]["lora"] = LORA
        import peft  # noqa: F401 - imported before the baseline: its import (transformers) is not training memory
    before = _rss_mib()
    out = train_loop_per_worker(cfg)
    if torch.cuda.is_available():
        mem = torch.cuda.max_memory_allocated() / 2**20
    else:
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before  # ru_maxrss: KiB on Linux
    tokens = cfg["train"]["global_batch_size"] * cfg["seq_len"]
    report(step_s=tokens / out["train/steady_tokens_per_s"], mem_mib=mem)


def side(kind: str, size: dict, shard: str, steps: int, tmp: Path, memory: dict[str, list[float]]) -> float:
    """Step seconds of one side ("full" or "lora") in a fresh subprocess; its peak memory goes into `memory`."""
    ckpt = tempfile.mkdtemp(dir=tmp, prefix=f"ckpt-{kind}-")  # fresh: never resume another run
    p = tmp / f"{kind}.json"
    p.write_text(json.dumps(worker_config(size, shard, steps, 2, ckpt)))
    r = run_one("bench.lora", kind, str(p))
    memory.setdefault(kind, []).append(r["mem_mib"])
    return r["step_s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--size", action="append", choices=list(SIZES), help="only these model sizes (default: all)")
    ap.add_argument("--one", nargs=2, metavar=("KIND", "CONFIG"))
    args = ap.parse_args()
    if args.one:
        return one(*args.one)
    import torch

    print(f"# LoRA vs full fine-tuning, {describe_device()}, torch {torch.__version__}, ZeRO-2, r={LORA['r']} on "
          f"{', '.join(LORA['targets'])}, median of {args.repeats}, {args.steps} steps each")
    table = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        shard = make_shard(tmp)
        for name, size in SIZES.items():
            if args.size and name not in args.size:
                continue
            memory: dict[str, list[float]] = {}
            med = interleaved_medians({k: partial(side, k, size, shard, args.steps, tmp, memory) for k in ("full", "lora")},
                                      args.repeats)
            mem = {k: statistics.median(v) for k, v in memory.items()}
            table.append([name, f"{med['full'] * 1000:.0f}", f"{med['lora'] * 1000:.0f}", f"{med['lora'] / med['full']:.2f}x",
                          f"{mem['full']:.0f}", f"{mem['lora']:.0f}", f"{mem['lora'] / mem['full']:.2f}x"])
    print_table(["model", "full step ms", "LoRA step ms", "LoRA ÷ full time", "full peak MiB", "LoRA peak MiB",
                 "LoRA ÷ full memory"], table)


if __name__ == "__main__":
    main()
