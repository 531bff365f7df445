"""Hugging Face interchange for the encoder–decoder family: `T5ForConditionalGeneration` folders.

T5 is our encoder-decoder with `pos_encoding: t5`, RMSNorm without biases,
pre-norm, unscaled attention, one KV head per query head, ReLU (T5) or GEGLU
(T5 v1.1's `gated-gelu`) MLPs and the unembedding tied to the shared embedding
(transformers 5 always ties it and scales the decoder's output by d_model^-0.5,
as we do when tied). Our fused q|k|v (self-attention), k|v (cross-attention) and
gate|up (GEGLU) matrices split into T5's `q`, `k`, `v`, `wi_0`, `wi_1`; each
stack's relative-bias table sits in its first block, as T5 keeps it. The decoder
starts from the padding token, T5's `decoder_start_token_id`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from model.config import ModelConfig

_FF_OUT = {"relu": "relu", "geglu": "gated-gelu"}
_FF_IN = {"relu": "relu", "gated-gelu": "geglu"}


def check_t5_exportable(cfg: ModelConfig) -> None:
    """A ValueError naming the first field that T5's architecture cannot hold."""
    wanted = {"norm_position": ("pre",), "norm": ("rmsnorm",), "mlp": ("relu", "geglu"), "bias": (False,),
              "scale_attention": (False,), "tie_embeddings": (True,), "n_kv_head": (cfg.n_head,)}
    for field, values in wanted.items():
        if getattr(cfg, field) not in values:
            raise ValueError(f"Hugging Face T5 export needs ModelConfig.{field} in {values}, got {getattr(cfg, field)!r}")


def t5_config(cfg: ModelConfig) -> dict[str, Any]:
    """The keyword arguments of `T5Config` for `cfg`."""
    return dict(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.head_dim, d_ff=cfg.d_ff, num_layers=cfg.n_layer,
                num_decoder_layers=cfg.n_decoder_layer, num_heads=cfg.n_head,
                relative_attention_num_buckets=cfg.rel_buckets, relative_attention_max_distance=cfg.rel_max_distance,
                dropout_rate=cfg.dropout, layer_norm_epsilon=cfg.norm_eps, feed_forward_proj=_FF_OUT[cfg.mlp],
                initializer_factor=1.0, is_encoder_decoder=True, n_positions=cfg.max_seq_len)


def write_t5(sd: dict[str, torch.Tensor], cfg: ModelConfig, folder: Path, *, dtype: torch.dtype,
             ids: dict[str, int | None]) -> None:
    """model.safetensors, config.json and generation_config.json of a T5ForConditionalGeneration folder
    (`model.hf.export_hf` adds the tokenizer)."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig, T5Config

    if ids["pad_token_id"] is None:
        raise ValueError("T5 export needs a pad_token_id (T5's decoder starts from it)")
    save_file({k: v.contiguous() for k, v in to_t5(sd, cfg).items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    hf_config = T5Config(**t5_config(cfg), **ids, decoder_start_token_id=ids["pad_token_id"], dtype=str(dtype).removeprefix("torch."))
    hf_config.architectures = ["T5ForConditionalGeneration"]
    hf_config.save_pretrained(folder)
    GenerationConfig(**ids, decoder_start_token_id=ids["pad_token_id"]).save_pretrained(folder)


def config_from_t5(hf: dict[str, Any]) -> ModelConfig:
    """Our config of a T5 `config.json`."""
    ff = hf.get("feed_forward_proj", "relu")
    if ff not in _FF_IN:
        raise ValueError(f"t5 config: feed_forward_proj {ff!r} is not one of {sorted(_FF_IN)}")
    d, heads = hf["d_model"], hf["num_heads"]
    if hf.get("d_kv", d // heads) * heads != d:
        raise ValueError(f"t5 config: d_kv {hf['d_kv']} x num_heads {heads} must equal d_model {d}")
    if hf.get("tie_word_embeddings", True) is False:
        raise ValueError("t5 config: tie_word_embeddings false (an untied lm_head) is not supported")
    return ModelConfig(vocab_size=hf["vocab_size"], family="encoder-decoder", n_layer=hf["num_layers"],
                       n_decoder_layer=hf.get("num_decoder_layers") or hf["num_layers"], n_head=heads, d_model=d,
                       d_ff=hf["d_ff"], max_seq_len=hf.get("n_positions", 512), pos_encoding="t5",
                       rel_buckets=hf.get("relative_attention_num_buckets", 32),
                       rel_max_distance=hf.get("relative_attention_max_distance", 128), scale_attention=False,
                       norm="rmsnorm", norm_eps=hf.get("layer_norm_epsilon", 1e-6), mlp=_FF_IN[ff], bias=False,
                       dropout=hf.get("dropout_rate", 0.1), tie_embeddings=True)


def _names(cfg: ModelConfig) -> list[tuple[str, str, tuple[int, int] | None]]:
    """(our name, T5 name, (part, parts) of our tensor's rows or None for all of it) for every tensor."""
    gated = cfg.mlp == "geglu"
    names: list[tuple[str, str, tuple[int, int] | None]] = [
        ("tok_emb.weight", "shared.weight", None),
        ("enc_bias.table.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", None),
        ("dec_bias.table.weight", "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", None),
        ("enc_norm.weight", "encoder.final_layer_norm.weight", None), ("dec_norm.weight", "decoder.final_layer_norm.weight", None)]

    def attention(ours: str, theirs: str) -> None:
        names.extend((f"{ours}.qkv.weight", f"{theirs}.{p}.weight", (i, 3)) for i, p in enumerate("qkv"))
        names.append((f"{ours}.proj.weight", f"{theirs}.o.weight", None))

    def mlp(ours: str, theirs: str) -> None:
        if gated:
            names.extend([(f"{ours}.fc.weight", f"{theirs}.wi_0.weight", (0, 2)), (f"{ours}.fc.weight", f"{theirs}.wi_1.weight", (1, 2))])
        else:
            names.append((f"{ours}.fc.weight", f"{theirs}.wi.weight", None))
        names.append((f"{ours}.proj.weight", f"{theirs}.wo.weight", None))

    for i in range(cfg.n_layer):
        ours, theirs = f"encoder.{i}", f"encoder.block.{i}.layer"
        names += [(f"{ours}.ln_1.weight", f"{theirs}.0.layer_norm.weight", None), (f"{ours}.ln_2.weight", f"{theirs}.1.layer_norm.weight", None)]
        attention(f"{ours}.attn", f"{theirs}.0.SelfAttention")
        mlp(f"{ours}.mlp", f"{theirs}.1.DenseReluDense")
    for i in range(cfg.n_decoder_layer):
        ours, theirs = f"decoder.{i}", f"decoder.block.{i}.layer"
        names += [(f"{ours}.ln_1.weight", f"{theirs}.0.layer_norm.weight", None),
                  (f"{ours}.ln_cross.weight", f"{theirs}.1.layer_norm.weight", None),
                  (f"{ours}.ln_2.weight", f"{theirs}.2.layer_norm.weight", None),
                  (f"{ours}.cross.q.weight", f"{theirs}.1.EncDecAttention.q.weight", None),
                  (f"{ours}.cross.kv.weight", f"{theirs}.1.EncDecAttention.k.weight", (0, 2)),
                  (f"{ours}.cross.kv.weight", f"{theirs}.1.EncDecAttention.v.weight", (1, 2)),
                  (f"{ours}.cross.proj.weight", f"{theirs}.1.EncDecAttention.o.weight", None)]
        attention(f"{ours}.attn", f"{theirs}.0.SelfAttention")
        mlp(f"{ours}.mlp", f"{theirs}.2.DenseReluDense")
    return names


def to_t5(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> T5 tensors (the shared embedding once: transformers ties the others to it)."""
    return {theirs: sd[ours] if part is None else sd[ours].chunk(part[1])[part[0]] for ours, theirs, part in _names(cfg)}


def from_t5(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """T5 tensors -> our state dict (split parts concatenated back in order)."""
    parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for ours, theirs, part in _names(cfg):
        parts.setdefault(ours, []).append((part[0] if part else 0, tensors[theirs]))
    return {ours: torch.cat([t for _, t in sorted(ps, key=lambda p: p[0])]) for ours, ps in parts.items()}
