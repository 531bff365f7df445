"""Hugging Face interchange for XLNet: `XLNetLMHeadModel` folders.

Our XLNet (`model.xlnet`) is XLNet's architecture with post-norm, LayerNorm, exact
GELU, one KV head per query head and the unembedding tied to the token embedding.
XLNet keeps each attention matrix as (d_model, n_head, d_head) and applies it by
einsum; ours are `nn.Linear` weights (out, in) with q|k|v fused, so each is a
reshape and a transpose. Transformer-XL's u and v biases are XLNet's `r_w_bias`
and `r_r_bias`; its distance projection is `r`. XLNet's token-type parts
(`r_s_bias`, `seg_embed`) act only when `token_type_ids` are given: an export
writes zeros, an import drops them (exact for single-segment inputs, which is
all our model reads).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from model.config import ModelConfig


def check_xlnet_exportable(cfg: ModelConfig) -> None:
    """A ValueError naming the first field that XLNet's architecture cannot hold."""
    wanted = {"norm_position": ("post",), "norm": ("layernorm",), "mlp": ("gelu", "relu"), "bias": (True,),
              "tie_embeddings": (True,), "n_kv_head": (cfg.n_head,), "scale_attention": (True,)}
    for field, values in wanted.items():
        if getattr(cfg, field) not in values:
            raise ValueError(f"Hugging Face XLNet export needs ModelConfig.{field} in {values}, got {getattr(cfg, field)!r}")


def xlnet_config(cfg: ModelConfig) -> dict[str, Any]:
    """The keyword arguments of `XLNetConfig` for `cfg` (bidirectional attention, no clamping, no bi_data)."""
    return dict(vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head,
                d_inner=cfg.d_ff, ff_activation=cfg.mlp, untie_r=True, attn_type="bi", initializer_range=cfg.init_std,
                layer_norm_eps=cfg.norm_eps, dropout=cfg.dropout, mem_len=cfg.memory_len or None, reuse_len=None,
                bi_data=False, clamp_len=-1, same_length=False)


def write_xlnet(sd: dict[str, torch.Tensor], cfg: ModelConfig, folder: Path, *, dtype: torch.dtype,
                ids: dict[str, int | None]) -> None:
    """model.safetensors and config.json of an XLNetLMHeadModel folder (`model.hf.export_hf` adds the tokenizer)."""
    from safetensors.torch import save_file
    from transformers import XLNetConfig

    save_file({k: v.contiguous() for k, v in to_xlnet(sd, cfg).items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    hf_config = XLNetConfig(**xlnet_config(cfg), **{k: v for k, v in ids.items() if v is not None},
                            dtype=str(dtype).removeprefix("torch."))
    hf_config.architectures = ["XLNetLMHeadModel"]
    hf_config.save_pretrained(folder)


def config_from_xlnet(hf: dict[str, Any]) -> ModelConfig:
    """Our config of an XLNet `config.json`."""
    for key, ok in (("attn_type", "bi"), ("bi_data", False), ("same_length", False), ("untie_r", True)):
        if hf.get(key, ok) != ok:
            raise ValueError(f"xlnet config: {key} = {hf[key]!r} is not supported (needs {ok!r})")
    if hf.get("clamp_len", -1) > 0:
        raise ValueError(f"xlnet config: clamp_len {hf['clamp_len']} is not supported (needs -1: no clamping)")
    act = hf.get("ff_activation", "gelu")
    if act not in ("gelu", "relu"):
        raise ValueError(f"xlnet config: ff_activation {act!r} is not supported (gelu or relu)")
    return ModelConfig(vocab_size=hf["vocab_size"], family="xlnet", pos_encoding="xl", norm_position="post",
                       n_layer=hf["n_layer"], n_head=hf["n_head"], d_model=hf["d_model"], d_ff=hf["d_inner"],
                       mlp=act, norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-12), bias=True,
                       dropout=hf.get("dropout", 0.1), init_std=hf.get("initializer_range", 0.02),
                       memory_len=hf.get("mem_len") or 0, max_seq_len=512, tie_embeddings=True)


def to_xlnet(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> XLNetLMHeadModel tensor names."""
    d, H, hd = cfg.d_model, cfg.n_head, cfg.head_dim
    out = {"transformer.word_embedding.weight": sd["tok_emb.weight"], "transformer.mask_emb": sd["mask_emb"],
           "lm_loss.bias": sd["lm_head.bias"]}  # lm_loss.weight: tied to the word embedding
    for i in range(cfg.n_layer):
        ours, a, f = f"blocks.{i}.", f"transformer.layer.{i}.rel_attn.", f"transformer.layer.{i}.ff."
        q, k, v = sd[ours + "attn.qkv.weight"].split(H * hd)  # each (H * hd, d)
        for name, w in (("q", q), ("k", k), ("v", v), ("r", sd[ours + "attn.pos_key.weight"])):
            out[a + name] = w.t().reshape(d, H, hd)
        out[a + "o"] = sd[ours + "attn.proj.weight"].reshape(d, H, hd)
        out[a + "r_w_bias"], out[a + "r_r_bias"] = sd[ours + "attn.content_bias"], sd[ours + "attn.position_bias"]
        out[a + "r_s_bias"] = torch.zeros(H, hd, dtype=q.dtype)
        out[a + "seg_embed"] = torch.zeros(2, H, hd, dtype=q.dtype)
        out[a + "layer_norm.weight"], out[a + "layer_norm.bias"] = sd[ours + "ln_1.weight"], sd[ours + "ln_1.bias"]
        out[f + "layer_norm.weight"], out[f + "layer_norm.bias"] = sd[ours + "ln_2.weight"], sd[ours + "ln_2.bias"]
        for theirs, mine in (("layer_1", "fc"), ("layer_2", "proj")):
            out[f + theirs + ".weight"], out[f + theirs + ".bias"] = sd[ours + f"mlp.{mine}.weight"], sd[ours + f"mlp.{mine}.bias"]
    return out


def from_xlnet(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """XLNetLMHeadModel tensors -> our state dict (the token-type parts dropped)."""
    d, H, hd = cfg.d_model, cfg.n_head, cfg.head_dim
    sd = {"tok_emb.weight": tensors["transformer.word_embedding.weight"], "mask_emb": tensors["transformer.mask_emb"],
          "lm_head.bias": tensors["lm_loss.bias"]}
    for i in range(cfg.n_layer):
        ours, a, f = f"blocks.{i}.", f"transformer.layer.{i}.rel_attn.", f"transformer.layer.{i}.ff."
        sd[ours + "attn.qkv.weight"] = torch.cat([tensors[a + n].reshape(d, H * hd).t() for n in ("q", "k", "v")])
        sd[ours + "attn.pos_key.weight"] = tensors[a + "r"].reshape(d, H * hd).t()
        sd[ours + "attn.proj.weight"] = tensors[a + "o"].reshape(d, H * hd)
        sd[ours + "attn.content_bias"], sd[ours + "attn.position_bias"] = tensors[a + "r_w_bias"], tensors[a + "r_r_bias"]
        sd[ours + "ln_1.weight"], sd[ours + "ln_1.bias"] = tensors[a + "layer_norm.weight"], tensors[a + "layer_norm.bias"]
        sd[ours + "ln_2.weight"], sd[ours + "ln_2.bias"] = tensors[f + "layer_norm.weight"], tensors[f + "layer_norm.bias"]
        for theirs, mine in (("layer_1", "fc"), ("layer_2", "proj")):
            sd[ours + f"mlp.{mine}.weight"], sd[ours + f"mlp.{mine}.bias"] = tensors[f + theirs + ".weight"], tensors[f + theirs + ".bias"]
    return {k: v.contiguous() for k, v in sd.items()}
