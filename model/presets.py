"""Named model sizes: `preset("gpt2-small", vocab_size=4096)` is a `ModelConfig`.

Each entry of `PRESETS` holds the keyword arguments of a `ModelConfig`, so an
override such as `d_model=` composes with the preset's other choices rather than
editing a finished config. The GPT-2 entries match OpenAI's released shapes
(learned positions, LayerNorm, tanh GELU, biases, tied unembedding); the LLaMA
entries are the small research sizes used in the literature (RoPE, RMSNorm,
SwiGLU, no biases, a separate unembedding, the 32k LLaMA vocabulary); the
BERT and RoBERTa entries are the base encoders as released (post-norm, learned
positions, exact GELU, the masked-LM head tied to the embeddings; RoBERTa's
512 positions exclude the two its table keeps before the first token);
`t5-small` is T5's (Raffel et al.); `demo` is the model of `configs/demo.yaml`.
"""

from __future__ import annotations

from typing import Any

from model.config import ModelConfig

_GPT2: dict[str, Any] = dict(vocab_size=50257, max_seq_len=1024, pos_encoding="learned", norm="layernorm",
                             mlp="gelu_tanh", bias=True, tie_embeddings=True)
_LLAMA: dict[str, Any] = dict(vocab_size=32000, pos_encoding="rope", norm="rmsnorm", norm_eps=1e-6, mlp="swiglu",
                              bias=False, tie_embeddings=False, rope_theta=10000.0)

_BERT: dict[str, Any] = dict(family="encoder", norm_position="post", n_layer=12, n_head=12, d_model=768, max_seq_len=512,
                             pos_encoding="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True)

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-small": {**_GPT2, "n_layer": 12, "n_head": 12, "d_model": 768},  # 124M
    "gpt2-medium": {**_GPT2, "n_layer": 24, "n_head": 16, "d_model": 1024},  # 355M
    "llama-60m": {**_LLAMA, "n_layer": 8, "n_head": 8, "d_model": 512, "d_ff": 1376, "max_seq_len": 1024},  # GaLore's 60M
    "llama-160m": {**_LLAMA, "n_layer": 12, "n_head": 12, "d_model": 768, "d_ff": 3072, "max_seq_len": 2048},
    "bert-base": {**_BERT, "vocab_size": 30522, "norm_eps": 1e-12},  # 110M
    "roberta-base": {**_BERT, "vocab_size": 50265, "norm_eps": 1e-5},  # 125M
    # T5's own: relative position bias (32 buckets up to 128), RMSNorm, no biases, unscaled attention, ReLU, tied
    "t5-small": dict(vocab_size=32128, family="encoder-decoder", pos_encoding="t5", n_layer=6, n_head=8, d_model=512,
                     d_ff=2048, max_seq_len=512, norm="rmsnorm", norm_eps=1e-6, bias=False, mlp="relu",
                     scale_attention=False, tie_embeddings=True),  # 60M
    "demo": dict(vocab_size=4096, n_layer=4, n_head=4, d_model=128, max_seq_len=128, pos_encoding="learned",
                 norm="layernorm", mlp="gelu", tie_embeddings=True),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The config of a named preset, with any ModelConfig field overridden (e.g. `vocab_size=`)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    unknown = set(overrides) - set(ModelConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"preset({name!r}): {sorted(unknown)} are not ModelConfig fields")
    return ModelConfig(**{**PRESETS[name], **overrides})
