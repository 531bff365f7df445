"""A consolidated model on disk: `model.safetensors` + `model.json`.

The JSON explains the tensors: the model config, the training step, and any
provenance the caller adds (tokenizer, data fingerprint). Loading reads tensors
only (safetensors, never a pickle) and checks the config against the tensors,
naming both values when they differ.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.gpt import GPT
from model.seq2seq import EncoderDecoder
from model.xlnet import XLNet

WEIGHTS, META = "model.safetensors", "model.json"


def build_model(cfg: ModelConfig) -> GPT | EncoderDecoder | XLNet:
    """The model a config describes: `EncoderDecoder` for the encoder-decoder family, `XLNet` for XLNet, else `GPT`."""
    if cfg.family == "encoder-decoder":
        return EncoderDecoder(cfg)
    return XLNet(cfg) if cfg.family == "xlnet" else GPT(cfg)


def state_dict_for_save(model: GPT | EncoderDecoder) -> dict[str, torch.Tensor]:
    """The state dict, less a tied unembedding (safetensors refuses shared storage; loading re-ties it)."""
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def save_model(folder: str | Path, state_dict: dict[str, torch.Tensor], config: ModelConfig, **meta: Any) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(folder / WEIGHTS))
    (folder / META).write_text(json.dumps({"model_config": config.to_dict(), **meta}, indent=2, default=str), encoding="utf-8")


def load_model(folder: str | Path, *, device: str | torch.device = "cpu") -> tuple[GPT | EncoderDecoder, dict[str, Any]]:
    folder = Path(folder)
    for name in (WEIGHTS, META):
        if not (folder / name).is_file():
            raise FileNotFoundError(str(folder / name))
    meta = json.loads((folder / META).read_text(encoding="utf-8"))
    config = ModelConfig(**meta["model_config"])
    model = build_model(config)
    try:
        tensors = load_file(str(folder / WEIGHTS), device=str(device))
    except SafetensorError as e:  # e.g. a pickle under this name: refused, never unpickled
        raise ValueError(f"{folder / WEIGHTS}: not a safetensors file ({e}); only safetensors weights are loaded") from None
    tied = {"lm_head.weight"} if config.tie_embeddings else set()
    expected = {k: v.shape for k, v in model.state_dict().items() if k not in tied}
    for k, shape in expected.items():
        if k not in tensors:
            raise ValueError(f"{folder / WEIGHTS}: missing tensor {k} required by {META}")
        if tensors[k].shape != shape:
            raise ValueError(f"{folder / WEIGHTS}: {k} has shape {tuple(tensors[k].shape)}, {META} implies {tuple(shape)}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ValueError(f"{folder / WEIGHTS}: tensors {unexpected[:3]} are not part of the model described by {META}")
    model.load_state_dict(tensors, strict=not tied)  # a tied lm_head.weight is the token embedding
    model.to(device)
    return model.eval(), meta
