"""What the training loop needs besides the loop: MFU's peak FLOP/s, the periodic
validation pass, starting weights for fine-tuning (`train.init_from`), and the
progress line rank 0 prints.

Plain PyTorch (DeepSpeed's engine is passed in, never imported), so each piece
can be tested alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenization.dataset import TokenWindows

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


@torch.no_grad()
def validation_loss(engine: Any, windows: TokenWindows, *, rank: int, world: int, max_tokens: int, micro: int,
                    device: torch.device) -> float:
    """Mean loss over the first windows holding `max_tokens` targets, split across ranks and all-reduced.
    Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively)."""
    n = min(len(windows), max(world, max_tokens // windows.seq_len))
    mine = np.arange(rank, n - n % world, world)
    totals = torch.zeros(2, device=device, dtype=torch.float64)
    engine.eval()
    for i in range(0, len(mine), micro):
        batch = torch.from_numpy(windows.batch(mine[i : i + micro])).to(device)
        loss = engine(batch[:, :-1], batch[:, 1:])
        totals += torch.tensor([loss.item() * batch.shape[0], batch.shape[0]], device=device, dtype=torch.float64)
    engine.train()
    torch.distributed.all_reduce(totals)
    return float(totals[0] / totals[1])


def _init_folder(path: str) -> tuple[Path, str]:
    folder = Path(path).expanduser()
    if (folder / "model.json").is_file():
        return folder, "ours"
    if (folder / "config.json").is_file():
        return folder, "hf"
    raise FileNotFoundError(f"train.init_from: {folder} holds neither model.json (a trained model) nor config.json (Hugging Face)")


def init_config(path: str) -> dict[str, Any]:
    """The model config of `train.init_from`, read without loading its weights (the driver's pre-launch check)."""
    from model.hf import read_hf_config

    folder, kind = _init_folder(path)
    if kind == "ours":
        return json.loads((folder / "model.json").read_text(encoding="utf-8"))["model_config"]
    return read_hf_config(folder)[0].to_dict()


def initial_weights(path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(model config, state dict) from a train stage folder, a model folder or a local Hugging Face folder."""
    from model import import_hf, load_model, state_dict_for_save

    folder, kind = _init_folder(path)
    model = load_model(folder)[0] if kind == "ours" else import_hf(folder)
    return model.config.to_dict(), state_dict_for_save(model)


def init_identity(path: str) -> dict[str, Any]:
    """What enters the train fingerprint for `init_from`: the path and its weight files' sizes and mtimes."""
    folder = Path(path).expanduser()
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.json"))
    return {"path": str(folder.resolve()), "files": {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}}


def check_init_compatible(init_config: dict[str, Any], wanted: dict[str, Any], where: str) -> None:
    """Fine-tuning needs the same architecture: name every field that differs (defaults resolved first)."""
    from model import ModelConfig

    init_config, wanted = ModelConfig(**init_config).to_dict(), ModelConfig(**wanted).to_dict()
    keys = [k for k in wanted if k not in ("dropout", "activation_checkpointing") and k in init_config]
    diff = [f"{k}: {init_config[k]!r} there, {wanted[k]!r} here" for k in keys if init_config[k] != wanted[k]]
    if diff:
        raise ValueError(f"train.init_from {where} has another architecture ({'; '.join(diff)}); "
                         "set the model section (and tokenizer.path) to match it")


def progress_line(step: int, total: int, metrics: dict[str, float], elapsed_s: float, done_before: int) -> str:
    """`step 120/500 (24%) loss 4.812 lr 1.9e-03 12.3k tok/s ETA 2m05s` from rank 0."""
    rate = (step - done_before) / max(elapsed_s, 1e-9)
    eta = (total - step) / rate if rate > 0 else float("nan")
    eta_s = f"{int(eta // 60)}m{int(eta % 60):02d}s" if eta == eta else "?"
    mfu = f" MFU {metrics['train/mfu']:.1%}" if "train/mfu" in metrics else ""
    return (f"step {step}/{total} ({step / total:.0%}) loss {metrics['train/loss']:.4f} lr {metrics['train/lr']:.2e} "
            f"{metrics['train/tokens_per_s'] / 1e3:.1f}k tok/s{mfu} ETA {eta_s}")
