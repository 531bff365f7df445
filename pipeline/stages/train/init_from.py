"""Starting weights for fine-tuning (`train.init_from`): a train stage folder, a model folder or a Hugging Face folder.

`init_identity` is what enters the train fingerprint (the weights' content, not
their path); `check_init_compatible` refuses a mismatched architecture before
anything launches. Position settings alone may differ (context extension: a
base fine-tuned at a longer `max_seq_len`, with RoPE scaling or a larger
`rope_theta`): none of them shapes a weight, except the rows of a learned
position table, which are never grown or cut silently, so a learned table
keeps its length.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import ConfigError


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


# Context extension: what may change from the base. rope_original_max_seq_len too, as YaRN needs the base's context
# when max_seq_len grows (it defaults to max_seq_len).
POSITION_FIELDS = ("max_seq_len", "rope_scaling", "rope_factor", "rope_theta", "rope_original_max_seq_len")


def check_init_compatible(init_config: dict[str, Any], wanted: dict[str, Any], where: str) -> None:
    """Fine-tuning needs the same architecture, position settings aside: name every other field that differs
    (defaults resolved first), and refuse a learned position table of another length."""
    from model import ModelConfig

    init_config, wanted = ModelConfig(**init_config).to_dict(), ModelConfig(**wanted).to_dict()
    keys = [k for k in wanted if k not in ("dropout", "activation_checkpointing", *POSITION_FIELDS) and k in init_config]
    diff = [f"{k}: {init_config[k]!r} there, {wanted[k]!r} here" for k in keys if init_config[k] != wanted[k]]
    if diff:
        raise ConfigError(f"train.init_from {where} has another architecture ({'; '.join(diff)}); "
                         "set the model section (and tokenizer.path) to match it")
    if wanted["pos_encoding"] == "learned" and init_config["max_seq_len"] != wanted["max_seq_len"]:
        raise ConfigError(f"train.init_from {where} has a learned position table of {init_config['max_seq_len']} rows; "
                          f"model.max_seq_len {wanted['max_seq_len']} would need another table (learned positions are "
                          "not grown or cut): keep model.max_seq_len at the base's, or extend a rope model")
