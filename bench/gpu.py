"""GPU readiness in one table: GPT-2 small (124M) at 1024 tokens, bf16, ZeRO-2, eager and compiled.

Rows: training tokens/s, MFU and peak memory through our per-worker DeepSpeed loop
(`train_loop_per_worker` called directly, world size 1, no Ray: the Ray wheel is too big to carry to a
lent GPU machine), eager and with `train.compile` (inductor); then greedy decoding tokens/s of our
`generate_batch` over `transformers.generate` on the same weights at batch 1 and 8 (when `transformers`
is installed there). Each training side runs in a fresh child process (`--one`), so compile caches and
peak-memory counters start clean; MFU counts 6N + attention FLOPs per token over the GPU's datasheet
bf16 peak (`pipeline.stages.train.metrics.PEAK_BF16_TFLOPS`). The goal on an H100-class GPU is MFU >= 45%
(llm.c and nanochat reach about 41% at this size).

    python -m bench.gpu --dry-run     # any machine: builds the model (meta device) and the DeepSpeed config, prints the plan
    python -m bench.gpu               # on the GPU machine, after installing the carried wheels:
    #   here: bash ../shared/gpu/fetch-wheels.sh   (EXTRA="transformers==... huggingface-hub==..." for the decode row)
    #   there: python3 -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl \
    #          && export PYTHONPATH=$PWD/.site:$PWD && python3 -m bench.gpu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

from bench._measure import print_table, report, run_one

VOCAB, SEQ = 50304, 1024  # GPT-2's vocabulary padded to a multiple of 128, as nanoGPT does


def model_fields() -> dict[str, Any]:
    from model.presets import preset

    return dataclasses.asdict(preset("gpt2-small", vocab_size=VOCAB, max_seq_len=SEQ))


def train_fields(*, steps: int, micro: int, accumulation: int, compiled: bool, precision: str) -> dict[str, Any]:
    from pipeline.schema import TrainConfig

    t = TrainConfig(steps=steps, global_batch_size=micro * accumulation, micro_batch_size=micro, num_workers=1,
                    warmup_steps=2, lr=6e-4, min_lr=6e-5, zero_stage=2, precision=precision, seed=0,
                    compile=compiled, checkpoint_every=10**9, log_every=10**9, log_model=False)
    return t.model_dump(mode="json")


def plan(args: argparse.Namespace) -> dict[str, Any]:
    """The model's size and FLOPs per token and the DeepSpeed config, built without a GPU (meta device)."""
    import torch

    from model import GPT, ModelConfig
    from pipeline.stages.train.optim import deepspeed_config

    with torch.device("meta"):
        model = GPT(ModelConfig(**model_fields()))
    t = train_fields(steps=args.steps, micro=args.micro, accumulation=args.accumulation, compiled=False, precision="bf16")
    return {"params": model.num_params, "flops_per_token": model.flops_per_token(SEQ),
            "deepspeed": deepspeed_config(t, world_size=1, precision="bf16"), "tokens_per_step": args.micro * args.accumulation * SEQ}


def make_shard(folder: Path, tokens: int) -> str:
    import numpy as np

    from tokenization.shards import write_shard

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, VOCAB, size=4096, dtype=np.uint16) for _ in range(tokens // 4096 + 1)]
    path = folder / "train-00000.arrow"
    write_shard(path, docs, np.dtype(np.uint16))
    return str(path)


def one_training(config_path: str) -> None:
    """The child: one run of the per-worker loop; reports steady tokens/s, MFU and peak memory."""
    import torch

    from pipeline.stages.train.worker import train_loop_per_worker

    out = train_loop_per_worker(json.loads(Path(config_path).read_text()))
    report(tokens_per_s=out["train/steady_tokens_per_s"], mfu=out.get("train/steady_mfu", float("nan")),
           mem_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0)


def training_rows(args: argparse.Namespace, tmp: Path) -> list[list[str]]:
    shard = make_shard(tmp, tokens=args.steps * args.micro * args.accumulation * (SEQ + 1) * 2)
    rows = []
    for compiled in (False, True):
        config = {"model": model_fields(), "seq_len": SEQ, "train_shards": [shard],
                  "train": train_fields(steps=args.steps, micro=args.micro, accumulation=args.accumulation,
                                        compiled=compiled, precision="bf16"),
                  "local_checkpoint_dir": tempfile.mkdtemp(dir=tmp)}
        path = tmp / f"train-{compiled}.json"
        path.write_text(json.dumps(config))
        r = run_one("bench.gpu", "train", str(path))
        rows.append([f"train, {'compiled' if compiled else 'eager'}", f"{r['tokens_per_s']:,.0f} tok/s",
                     f"MFU {r['mfu']:.1%}", f"{r['mem_gib']:.1f} GiB"])
        print(rows[-1], flush=True)
    return rows


def decoding_rows(args: argparse.Namespace) -> list[list[str]]:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return [["decode", "transformers is not installed: no comparison", "", ""]]
    import torch

    from bench._measure import interleaved_medians, seconds
    from bench.decode import ours, theirs
    from model import GPT, ModelConfig, export_hf

    torch.manual_seed(0)
    model = GPT(ModelConfig(**model_fields())).cuda().eval()
    with tempfile.TemporaryDirectory() as folder:
        export_hf(model, folder)
        hf = AutoModelForCausalLM.from_pretrained(folder).cuda().eval()
    rows = []
    for B in (1, 8):
        prompts = torch.randint(0, VOCAB, (B, 32), generator=torch.Generator().manual_seed(B)).tolist()
        ours(model, prompts, 8), theirs(hf, prompts, 8)  # warm-up
        med = interleaved_medians({"ours": lambda: seconds(ours, model, prompts, args.new_tokens),
                                   "theirs": lambda: seconds(theirs, hf, prompts, args.new_tokens)}, args.repeats)
        rows.append([f"decode, batch {B}", f"{B * args.new_tokens / med['ours']:,.0f} tok/s",
                     f"{med['theirs'] / med['ours']:.2f}x transformers", ""])
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="build the model on the meta device and the DeepSpeed config; print the plan")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--micro", type=int, default=16, help="sequences per forward pass")
    ap.add_argument("--accumulation", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--one", nargs=2, metavar=("KIND", "CONFIG"))
    args = ap.parse_args()
    if args.one:
        return one_training(args.one[1])
    import torch

    p = plan(args)
    ds = p["deepspeed"]
    print(f"# GPT-2 small: {p['params'] / 1e6:.1f}M parameters, seq {SEQ}, {p['tokens_per_step']:,} tokens per step "
          f"(micro {ds['train_micro_batch_size_per_gpu']} x accumulation {ds['gradient_accumulation_steps']}), "
          f"ZeRO-{ds['zero_optimization']['stage']}, bf16 {ds.get('bf16', {}).get('enabled', False)}, {args.steps} steps, "
          f"{p['flops_per_token'] / 1e9:.2f} GFLOP per token")
    if args.dry_run:
        print(json.dumps(ds, indent=1, sort_keys=True))
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench.gpu: no GPU here (use --dry-run to check the plan)")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as d:
        rows = training_rows(args, Path(d)) + decoding_rows(args)
    print_table(["what", "throughput", "vs", "peak memory"], rows)


if __name__ == "__main__":
    main()
