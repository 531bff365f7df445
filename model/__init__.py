"""Pure PyTorch: the decoder-only transformer, KV-cache generation and sampling options, scoring (loss, bits per byte, the length sweep), safetensors model folders and Hugging Face export/import."""

from model.config import ModelConfig, flops_per_token, param_count
from model.generate import beam_search, generate, generate_batch
from model.gpt import GPT
from model.hf import export_hf, import_hf
from model.kv_cache import KVCache
from model.presets import PRESETS, preset
from model.weights import load_model, save_model, state_dict_for_save

__all__ = ["GPT", "KVCache", "ModelConfig", "PRESETS", "beam_search", "export_hf", "flops_per_token", "generate",
           "generate_batch", "import_hf", "load_model", "param_count", "preset", "save_model", "state_dict_for_save"]
