"""Hugging Face interchange for the encoder family: `BertForMaskedLM` and `RobertaForMaskedLM` folders.

Both are our post-norm encoder (learned positions, LayerNorm, exact GELU, biases,
one KV head per query head) with BERT's masked-LM head; they differ in two
details, which this module translates. RoBERTa numbers the positions of real
tokens from `pad_token_id + 1` (its table has `pad_token_id + 1` extra rows in
front), BERT from 0. Both add a token-type embedding; with the single segment
that masked-LM pretraining and our pipeline use it is type 0 everywhere, a
constant added to every position, so import folds row 0 into the position
table (exact for token_type_ids = 0) and export writes zeros. Our fused q|k|v
matrix splits into `query`, `key`, `value`. Import reads `config.json` and
safetensors only and refuses what it cannot reproduce, naming the field.
"""

from __future__ import annotations

from typing import Any

import torch

from model.config import ModelConfig

ENCODER_TYPES = ("bert", "roberta")
_ACT_OUT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
_ACT_IN = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def check_exportable(cfg: ModelConfig) -> None:
    """A ValueError naming the first field that BERT's architecture cannot hold."""
    wanted = {"norm_position": ("post",), "pos_encoding": ("learned",), "norm": ("layernorm",), "mlp": ("gelu", "gelu_tanh"),
              "bias": (True,), "n_kv_head": (cfg.n_head,)}
    for field, values in wanted.items():
        if getattr(cfg, field) not in values:
            raise ValueError(f"Hugging Face BERT/RoBERTa export needs ModelConfig.{field} in {values}, got {getattr(cfg, field)!r}")


def position_offset(hf_type: str, pad_token_id: int | None) -> int:
    """Rows of the Hugging Face position table before the first real token's (RoBERTa: pad_token_id + 1)."""
    if hf_type != "roberta":
        return 0
    if pad_token_id is None:
        raise ValueError("RoBERTa export/import needs a pad_token_id (its positions count from pad_token_id + 1)")
    return pad_token_id + 1


def encoder_config(cfg: ModelConfig, hf_type: str, *, pad_token_id: int | None) -> dict[str, Any]:
    """The keyword arguments of `BertConfig` / `RobertaConfig` for `cfg`."""
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
                num_attention_heads=cfg.n_head, intermediate_size=cfg.d_ff, hidden_act=_ACT_OUT[cfg.mlp],
                hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
                max_position_embeddings=cfg.max_seq_len + position_offset(hf_type, pad_token_id),
                type_vocab_size=2 if hf_type == "bert" else 1, layer_norm_eps=cfg.norm_eps,
                initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings)


def config_from_encoder(hf: dict[str, Any]) -> ModelConfig:
    """Our config of a BERT or RoBERTa `config.json`."""
    kind = hf["model_type"]
    act = hf.get("hidden_act", "gelu")
    if act not in _ACT_IN:
        raise ValueError(f"{kind} config: hidden_act {act!r} is not one of {sorted(_ACT_IN)}")
    for key, ok in (("is_decoder", False), ("add_cross_attention", False), ("position_embedding_type", "absolute")):
        if hf.get(key, ok) != ok:
            raise ValueError(f"{kind} config: {key} = {hf[key]!r} is not supported (needs {ok!r})")
    offset = position_offset(kind, hf.get("pad_token_id", 1 if kind == "roberta" else 0))
    return ModelConfig(vocab_size=hf["vocab_size"], family="encoder", norm_position="post", n_layer=hf["num_hidden_layers"],
                       n_head=hf["num_attention_heads"], d_model=hf["hidden_size"], d_ff=hf["intermediate_size"],
                       max_seq_len=hf.get("max_position_embeddings", 512) - offset, pos_encoding="learned",
                       norm="layernorm", mlp=_ACT_IN[act], bias=True, dropout=hf.get("hidden_dropout_prob", 0.1),
                       norm_eps=hf.get("layer_norm_eps", 1e-12), init_std=hf.get("initializer_range", 0.02),
                       tie_embeddings=hf.get("tie_word_embeddings", True))


def _head(hf_type: str) -> str:
    return "cls.predictions" if hf_type == "bert" else "lm_head"


def _names(cfg: ModelConfig, hf_type: str) -> list[tuple[str, str]]:
    """(our name, HF name) for every tensor but q|k|v, the position table and the token types."""
    p, head = ("bert" if hf_type == "bert" else "roberta"), _head(hf_type)
    transform = f"{head}.transform" if hf_type == "bert" else head
    norm = "LayerNorm" if hf_type == "bert" else "layer_norm"
    names = [("tok_emb.weight", f"{p}.embeddings.word_embeddings.weight"),
             ("mlm_head.dense.weight", f"{transform}.dense.weight"), ("mlm_head.dense.bias", f"{transform}.dense.bias"),
             ("mlm_head.norm.weight", f"{transform}.{norm}.weight"), ("mlm_head.norm.bias", f"{transform}.{norm}.bias"),
             ("lm_head.bias", f"{head}.bias")]
    names += [(f"ln_emb.{k}", f"{p}.embeddings.LayerNorm.{k}") for k in ("weight", "bias")]
    if not cfg.tie_embeddings:
        names.append(("lm_head.weight", f"{head}.decoder.weight"))
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"{p}.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            names += [(f"{ours}attn.proj.{kind}", f"{theirs}attention.output.dense.{kind}"),
                      (f"{ours}ln_1.{kind}", f"{theirs}attention.output.LayerNorm.{kind}"),
                      (f"{ours}mlp.fc.{kind}", f"{theirs}intermediate.dense.{kind}"),
                      (f"{ours}mlp.proj.{kind}", f"{theirs}output.dense.{kind}"),
                      (f"{ours}ln_2.{kind}", f"{theirs}output.LayerNorm.{kind}")]
    return names


def to_encoder(sd: dict[str, torch.Tensor], cfg: ModelConfig, hf_type: str, *, pad_token_id: int | None) -> dict[str, torch.Tensor]:
    """Our state dict -> BERT/RoBERTa tensors."""
    p = "bert" if hf_type == "bert" else "roberta"
    out = {theirs: sd[ours] for ours, theirs in _names(cfg, hf_type)}
    pos = sd["pos_emb.weight"]
    offset = position_offset(hf_type, pad_token_id)
    out[f"{p}.embeddings.position_embeddings.weight"] = torch.cat([pos.new_zeros(offset, cfg.d_model), pos])
    out[f"{p}.embeddings.token_type_embeddings.weight"] = pos.new_zeros(2 if hf_type == "bert" else 1, cfg.d_model)
    if not cfg.tie_embeddings:  # transformers shares {head}.bias with the decoder's bias only when it ties the decoder
        out[f"{_head(hf_type)}.decoder.bias"] = sd["lm_head.bias"].clone()
    for i in range(cfg.n_layer):
        for kind in ("weight", "bias"):
            q, k, v = sd[f"blocks.{i}.attn.qkv.{kind}"].chunk(3)
            for name, part in zip(("query", "key", "value"), (q, k, v)):
                out[f"{p}.encoder.layer.{i}.attention.self.{name}.{kind}"] = part
    return out


def from_encoder(tensors: dict[str, torch.Tensor], cfg: ModelConfig, hf_type: str, *,
                 pad_token_id: int | None) -> dict[str, torch.Tensor]:
    """BERT/RoBERTa tensors -> our state dict (token type 0 folded into the positions)."""
    p = "bert" if hf_type == "bert" else "roberta"
    sd = {ours: tensors[theirs] for ours, theirs in _names(cfg, hf_type)}
    offset = position_offset(hf_type, pad_token_id)
    positions = tensors[f"{p}.embeddings.position_embeddings.weight"][offset : offset + cfg.max_seq_len]
    types = tensors.get(f"{p}.embeddings.token_type_embeddings.weight")
    sd["pos_emb.weight"] = positions + (types[0] if types is not None else 0)
    for i in range(cfg.n_layer):
        for kind in ("weight", "bias"):
            sd[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                [tensors[f"{p}.encoder.layer.{i}.attention.self.{name}.{kind}"] for name in ("query", "key", "value")])
    return sd
