"""LoRA in the train stage (`train.lora`): the plan-time target check, the adapter files, the base for export.

The adapters themselves are `model.lora` (PEFT on our GPT). Here: targets are checked against the model built
on the meta device when the plan fingerprints the stage, so a target that names no layer is one line before
any stage runs. The final checkpoint of a LoRA run holds the *merged* weights as `model.safetensors` (what
evaluate, decode, generate and serving load, unchanged) and the adapter beside them: `adapter.safetensors`
(our names, `blocks.{i}.{target}.lora_A|B`) and `adapter.json` (r, alpha, dropout, targets, and the base it
belongs to: `init_from` with its identity and, for one of our models, its train fingerprint, or the seed of a
from-scratch base; always the sha256 of the base's tensors in the training dtype). `export-hf` without
`--merge` rebuilds that base (`base_model`) and checks it against the digest before it writes base + adapter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from model import GPT, ModelConfig
from model.lora import (
    LoraOptions,
    adapter_state_dict,
    base_state_dict,
    linear_targets,
    merged_state_dict,
    unknown_targets,
    weights_digest,
)
from pipeline.errors import ConfigError, TargetError
from pipeline.schema import Config

ADAPTER_WEIGHTS, ADAPTER_META = "adapter.safetensors", "adapter.json"
ADAPTER_FILES = (ADAPTER_WEIGHTS, ADAPTER_META)


def check_lora_targets(cfg: Config) -> None:
    """Every `train.lora.targets` entry names a linear layer of the configured model (built on the meta device)."""
    assert cfg.train.lora is not None
    with torch.device("meta"):
        model = GPT(ModelConfig(**{**cfg.model.model_config_fields(), "vocab_size": cfg.tokenizer.vocab_size}))
    if bad := unknown_targets(model, cfg.train.lora.targets):
        raise ConfigError(f"train.lora.targets: {', '.join(map(repr, bad))} name no linear layer of the model; "
                          f"available: {', '.join(linear_targets(model))}")


def final_weights(module: torch.nn.Module, train: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """(merged model state dict, adapter state dict, adapter.json) of an adapted model whose parameters are whole
    on this rank (ZeRO-3: inside `GatheredParameters`)."""
    opts = LoraOptions(**train["lora"])
    base = base_state_dict(module)
    meta = {"r": opts.r, "alpha": opts.alpha, "dropout": opts.dropout, "targets": list(opts.targets),
            "base": _base_identity(train, base)}
    return merged_state_dict(module, opts.scale), adapter_state_dict(module), meta


def _base_identity(train: dict[str, Any], base: dict[str, torch.Tensor]) -> dict[str, Any]:
    from pipeline.stages.train.init_from import init_identity

    dtype = str(next(iter(base.values())).dtype).removeprefix("torch.")
    out: dict[str, Any] = {"weights_sha256": weights_digest(base), "dtype": dtype}
    if init_from := train.get("init_from"):
        out["init_from"] = init_identity(init_from)
        model_json = Path(init_from).expanduser() / "model.json"
        if model_json.is_file():  # one of ours: the train stage that made it
            fp = json.loads(model_json.read_text(encoding="utf-8")).get("train_fingerprint")
            if fp:
                out["train_fingerprint"] = fp
    else:
        out["seed"] = train["seed"]  # a from-scratch base: GPT(config) right after torch.manual_seed(seed)
    return out


def write_adapter(folder: Path, adapter: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    save_file(adapter, str(folder / ADAPTER_WEIGHTS))
    (folder / ADAPTER_META).write_text(json.dumps(meta, indent=2), encoding="utf-8")


def read_adapter(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The adapter of a train stage folder (tensors, adapter.json), or None for a fully fine-tuned model."""
    if not (folder / ADAPTER_META).is_file():
        return None
    return load_file(str(folder / ADAPTER_WEIGHTS)), json.loads((folder / ADAPTER_META).read_text(encoding="utf-8"))


def base_model(config: ModelConfig, meta: dict[str, Any], where: Path) -> GPT:
    """The base an adapter was trained on, rebuilt from its `init_from` (or seed) and checked against its digest."""
    from pipeline.stages.train.init_from import initial_weights

    base = meta["base"]
    torch.manual_seed(base.get("seed", 0))
    model = GPT(config)
    if "init_from" in base:
        path = base["init_from"]["path"]
        try:
            model.load_state_dict(initial_weights(path)[1], strict=False)  # strict=False only for a tied lm_head
        except FileNotFoundError as e:
            raise TargetError(f"{where / ADAPTER_META}: the adapter's base {path} is gone ({e}); use --merge") from None
    model.to(getattr(torch, base["dtype"]))
    digest = weights_digest(base_state_dict(model))
    if digest != base["weights_sha256"]:
        raise TargetError(f"{where / ADAPTER_META}: the base rebuilt from {base.get('init_from', {}).get('path', 'the seed')} "
                          f"has sha256 {digest[:12]}, the adapter was trained on {base['weights_sha256'][:12]}; use --merge")
    return model.eval()
