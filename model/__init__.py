"""Pure-PyTorch decoder-only transformer, KV-cache generation and safetensors checkpoints."""

from model.checkpoint import load_model, save_model, state_dict_for_save
from model.generate import generate
from model.gpt import GPT, ModelConfig
from model.kv_cache import KVCache

__all__ = ["GPT", "KVCache", "ModelConfig", "generate", "load_model", "save_model", "state_dict_for_save"]
