"""Pure PyTorch: the transformer (decoder, encoder, encoder-decoder, XLNet), KV-cache generation and sampling options, scoring (loss, bits per byte, the length sweep), safetensors model folders and Hugging Face export/import.

The names below are imported when first used (PEP 562), so a module of this package that needs no torch
(`model.retrieval` for BM25, `model.config`) is imported without it: a Ray task that only builds or searches a
BM25 index does not pay torch's import (about 2 s in a fresh worker).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ModelConfig": "model.config", "flops_per_token": "model.config", "param_count": "model.config",
    "beam_search": "model.generation", "generate": "model.generation", "generate_batch": "model.generation",
    "GPT": "model.gpt", "export_hf": "model.hf", "import_hf": "model.hf", "KVCache": "model.kv_cache",
    "PRESETS": "model.presets", "preset": "model.presets",
    "EncoderDecoder": "model.seq2seq", "build_model": "model.weights", "load_model": "model.weights",
    "save_model": "model.weights", "state_dict_for_save": "model.weights", "XLNet": "model.xlnet",
}
__all__ = ["EncoderDecoder", "GPT", "KVCache", "ModelConfig", "PRESETS", "XLNet", "beam_search", "build_model", "export_hf",
           "flops_per_token", "generate", "generate_batch", "import_hf", "load_model", "param_count", "preset",
           "save_model", "state_dict_for_save"]

if TYPE_CHECKING:
    from model.config import ModelConfig, flops_per_token, param_count
    from model.generation import beam_search, generate, generate_batch
    from model.gpt import GPT
    from model.hf import export_hf, import_hf
    from model.kv_cache import KVCache
    from model.presets import PRESETS, preset
    from model.seq2seq import EncoderDecoder
    from model.weights import build_model, load_model, save_model, state_dict_for_save
    from model.xlnet import XLNet


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once: later lookups skip this function
    return value
