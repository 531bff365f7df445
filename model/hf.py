"""Hugging Face interchange: export a model to a local `GPT2LMHeadModel`, `LlamaForCausalLM`, `BertForMaskedLM`,
`RobertaForMaskedLM`, `T5ForConditionalGeneration` or `XLNetLMHeadModel` folder, and import one back.

The family follows from the architecture: a decoder with learned positions +
LayerNorm + GELU (+ biases, one KV head per query head) is GPT-2; RoPE + RMSNorm
+ SwiGLU (any number of KV heads) is LLaMA; a post-norm encoder is BERT, or
RoBERTa when asked (`model.hf_encoder` holds their tensor names); an
encoder-decoder is T5 (`model.hf_t5`); XLNet is XLNet (`model.hf_xlnet`). A folder holds `model.safetensors`, `config.json`,
`generation_config.json` and, when given, `tokenizer.json`. GPT-2's `Conv1D`
stores weights as (in, out), the transpose of `nn.Linear`; our fused q|k|v and
gate|up matrices split into LLaMA's separate projections. Our RoPE already uses
the rotate-half convention, so no permutation is needed. GELU is exported as the
exact function we compute (`gelu` or `gelu_pytorch_tanh`); NTK-aware RoPE scaling
becomes plain RoPE with the equivalent larger base. Import reads `config.json`
and safetensors only (never a pickle) and refuses what it cannot reproduce,
naming the field, so a local checkpoint becomes a fine-tuning starting point.
`export_peft_adapter` writes a LoRA adapter (`model.lora`) in PEFT's format for
the exported base: an adapter on a fused matrix becomes one adapter per part,
sharing `A` and splitting `B`'s rows, which is exact (B A split by rows).
`transformers` is only needed for export (its config classes write the JSON),
and is imported there, never at module import.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.gpt import GPT
from model.hf_encoder import (
    ENCODER_TYPES,
    check_exportable,
    config_from_encoder,
    encoder_config,
    from_encoder,
    to_encoder,
)
from model.hf_t5 import check_t5_exportable, config_from_t5, from_t5, write_t5
from model.hf_xlnet import (
    check_xlnet_exportable,
    config_from_xlnet,
    from_xlnet,
    write_xlnet,
)
from model.seq2seq import EncoderDecoder
from model.weights import build_model

_GELU_OUT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
_GELU_IN = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}  # same function up to float error


def hf_family(cfg: ModelConfig) -> str:
    """`gpt2`, `llama`, (an encoder) `bert` or `t5`, or a ValueError naming the field that fits none."""
    if cfg.family == "encoder":
        check_exportable(cfg)
        return "bert"
    if cfg.family == "encoder-decoder":
        check_t5_exportable(cfg)
        return "t5"
    if cfg.family == "xlnet":
        check_xlnet_exportable(cfg)
        return "xlnet"
    if cfg.norm_position != "pre":
        raise ValueError("Hugging Face GPT-2/LLaMA export needs ModelConfig.norm_position = 'pre', got 'post'")
    if cfg.pos_encoding == "learned":
        wanted = {"norm": "layernorm", "mlp": ("gelu", "gelu_tanh"), "bias": True, "n_kv_head": cfg.n_head}
        family = "gpt2"
    elif cfg.pos_encoding == "rope":
        wanted, family = {"norm": "rmsnorm", "mlp": ("swiglu",)}, "llama"
    else:
        raise ValueError(f"Hugging Face export needs pos_encoding 'learned' (GPT-2) or 'rope' (LLaMA), not {cfg.pos_encoding!r}")
    for field, value in wanted.items():
        have = getattr(cfg, field)
        if have not in (value if isinstance(value, tuple) else (value,)):
            raise ValueError(f"Hugging Face {family} export needs ModelConfig.{field} = {value}, got {have!r}")
    return family


def export_hf(model: GPT, folder: str | Path, *, tokenizer: str | Path | None = None, bos_token_id: int | None = None,
              eos_token_id: int | None = None, pad_token_id: int | None = None, mask_token_id: int | None = None,
              encoder_type: str = "bert") -> Path:
    """Write `model` as a Hugging Face checkpoint folder; returns the folder. An encoder is written as
    `encoder_type` (bert or roberta; RoBERTa needs the pad_token_id its positions count from)."""
    from transformers import GenerationConfig, GPT2Config, LlamaConfig

    cfg, folder = model.config, Path(folder)
    family = hf_family(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if family == "t5":
        write_t5(sd, cfg, folder, dtype=next(model.parameters()).dtype,
                 ids=dict(eos_token_id=eos_token_id, pad_token_id=pad_token_id))
        if tokenizer is not None:
            _copy_tokenizer(Path(tokenizer), folder, max_len=cfg.max_seq_len,
                            specials={"eos_token": eos_token_id, "pad_token": pad_token_id})
        return folder
    if family == "xlnet":
        write_xlnet(sd, cfg, folder, dtype=next(model.parameters()).dtype,
                    ids=dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id))
        if tokenizer is not None:
            _copy_tokenizer(Path(tokenizer), folder, max_len=cfg.max_seq_len, specials={"eos_token": eos_token_id})
        return folder
    if family == "bert":
        return _export_encoder(sd, cfg, folder, encoder_type, tokenizer=tokenizer, dtype=next(model.parameters()).dtype,
                               ids=dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id),
                               mask_token_id=mask_token_id)
    tensors = _to_gpt2(sd, cfg) if family == "gpt2" else _to_llama(sd, cfg)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    ids = dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    hf_config = (GPT2Config(**_gpt2_config(cfg), **ids, dtype=dtype) if family == "gpt2"
                 else LlamaConfig(**_llama_config(cfg), **ids, dtype=dtype))
    hf_config.architectures = ["GPT2LMHeadModel" if family == "gpt2" else "LlamaForCausalLM"]
    hf_config.save_pretrained(folder)
    GenerationConfig(**ids).save_pretrained(folder)
    if tokenizer is not None:
        _copy_tokenizer(Path(tokenizer), folder, max_len=cfg.max_seq_len, specials={"eos_token": eos_token_id})
    return folder


def _export_encoder(sd: dict[str, torch.Tensor], cfg: ModelConfig, folder: Path, encoder_type: str, *,
                    tokenizer: str | Path | None, dtype: torch.dtype, ids: dict[str, int | None],
                    mask_token_id: int | None) -> Path:
    from transformers import BertConfig, RobertaConfig

    if encoder_type not in ENCODER_TYPES:
        raise ValueError(f"encoder_type must be one of {ENCODER_TYPES}, got {encoder_type!r}")
    tensors = to_encoder(sd, cfg, encoder_type, pad_token_id=ids["pad_token_id"])
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    kind = BertConfig if encoder_type == "bert" else RobertaConfig
    hf_config = kind(**encoder_config(cfg, encoder_type, pad_token_id=ids["pad_token_id"]),
                     **{k: v for k, v in ids.items() if v is not None}, dtype=str(dtype).removeprefix("torch."))
    hf_config.architectures = ["BertForMaskedLM" if encoder_type == "bert" else "RobertaForMaskedLM"]
    hf_config.save_pretrained(folder)
    if tokenizer is not None:
        _copy_tokenizer(Path(tokenizer), folder, max_len=cfg.max_seq_len,
                        specials={"eos_token": ids["eos_token_id"], "pad_token": ids["pad_token_id"], "mask_token": mask_token_id})
    return folder


# one adapter of ours -> (PEFT module suffix, rows of B) per part: None = all rows
_PEFT_GPT2 = {"attn.qkv": ["attn.c_attn"], "attn.proj": ["attn.c_proj"], "mlp.fc": ["mlp.c_fc"], "mlp.proj": ["mlp.c_proj"]}
_PEFT_LLAMA = {"attn.qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "attn.proj": ["self_attn.o_proj"],
               "mlp.fc": ["mlp.gate_proj", "mlp.up_proj"], "mlp.proj": ["mlp.down_proj"]}


def export_peft_adapter(adapter: dict[str, torch.Tensor], cfg: ModelConfig, folder: str | Path, *, r: int,
                        alpha: float, dropout: float, base: str) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` for `peft.PeftModel.from_pretrained(base, folder)`,
    from a `model.lora.adapter_state_dict` of a model whose Hugging Face export is `base`."""
    from peft import LoraConfig

    family, folder = hf_family(cfg), Path(folder)
    parts, prefix = (_PEFT_GPT2, "transformer.h") if family == "gpt2" else (_PEFT_LLAMA, "model.layers")
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for key in sorted(k for k in adapter if k.endswith(".lora_A")):
        layer, target = key.removesuffix(".lora_A").removeprefix("blocks.").split(".", 1)
        a, b = adapter[key], adapter[key.removesuffix("A") + "B"]
        names = parts[target]
        bs = [b] if len(names) == 1 else b.split([q, kv, kv]) if target == "attn.qkv" else b.chunk(2)
        for name, b_part in zip(names, bs):
            tensors[f"base_model.model.{prefix}.{layer}.{name}.lora_A.weight"] = a.clone()  # shared A: one copy per part
            tensors[f"base_model.model.{prefix}.{layer}.{name}.lora_B.weight"] = b_part.clone()
            targets.add(name)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    # GPT-2's Conv1D stores (in, out): PEFT must know to transpose when it merges
    LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=sorted(targets), bias="none",
               fan_in_fan_out=family == "gpt2", task_type="CAUSAL_LM", base_model_name_or_path=base).save_pretrained(folder)
    return folder


def read_hf_config(folder: str | Path) -> tuple[ModelConfig, str]:
    """Our config of a local GPT-2, LLaMA, BERT or RoBERTa folder, and its model_type, without reading any tensor."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(str(folder / "config.json"))
    hf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    kind = hf.get("model_type")
    if kind not in ("gpt2", "llama", "t5", "xlnet", *ENCODER_TYPES):
        raise ValueError(f"{folder / 'config.json'}: model_type {kind!r} is not gpt2, llama, bert, roberta, t5 or xlnet")
    if kind in ENCODER_TYPES:
        return config_from_encoder(hf), kind
    if kind == "t5":
        return config_from_t5(hf), kind
    if kind == "xlnet":
        return config_from_xlnet(hf), kind
    return (_config_from_gpt2(hf) if kind == "gpt2" else _config_from_llama(hf)), kind


def import_hf(folder: str | Path, *, device: str | torch.device = "cpu") -> GPT | EncoderDecoder:
    """A model with the weights of a local GPT-2, LLaMA, BERT or RoBERTa checkpoint folder (fp32 unless the
    tensors say otherwise)."""
    folder = Path(folder)
    cfg, kind = read_hf_config(folder)
    tensors = _read_tensors(folder)
    try:
        if kind in ENCODER_TYPES:
            pad = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("pad_token_id", 1)
            sd = from_encoder(tensors, cfg, kind, pad_token_id=pad)
        elif kind == "t5":
            sd = from_t5(tensors, cfg)
        elif kind == "xlnet":
            sd = from_xlnet(tensors, cfg)
        else:
            sd = _from_gpt2(tensors, cfg) if kind == "gpt2" else _from_llama(tensors, cfg)
    except KeyError as e:
        raise ValueError(f"{folder}: missing tensor {e}") from None
    model = build_model(cfg)
    model.to(next(iter(sd.values())).dtype)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    if missing := sorted(expected - set(sd)):
        raise ValueError(f"{folder}: missing tensors for {missing[:3]}")
    model.load_state_dict(sd, strict=not cfg.tie_embeddings)
    return model.to(device).eval()


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())):
        tensors.update(load_file(str(folder / shard)))
    return tensors


def _copy_tokenizer(path: Path, folder: Path, *, max_len: int, specials: dict[str, int | None]) -> None:
    """tokenizer.json (a file, or a folder holding one) plus the tokenizer_config.json that lets AutoTokenizer
    load it, naming the special tokens given by id ({"eos_token": 0, "mask_token": 2, ...})."""
    source = path / "tokenizer.json" if path.is_dir() else path
    if not source.is_file():
        raise FileNotFoundError(str(source))
    shutil.copyfile(source, folder / "tokenizer.json")
    meta: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len}
    if any(i is not None for i in specials.values()):
        tok = json.loads(source.read_text(encoding="utf-8"))
        vocab = tok.get("model", {}).get("vocab")
        names = {i: s for s, i in vocab.items()} if isinstance(vocab, dict) else {}
        names.update({t["id"]: t["content"] for t in tok.get("added_tokens", [])})
        meta.update({key: names[i] for key, i in specials.items() if i in names})
    (folder / "tokenizer_config.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")


# --- GPT-2 ------------------------------------------------------------------------------------

def _gpt2_config(cfg: ModelConfig) -> dict[str, Any]:
    return dict(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layer,
                n_head=cfg.n_head, n_inner=cfg.d_ff, activation_function=_GELU_OUT[cfg.mlp], resid_pdrop=cfg.dropout,
                embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, layer_norm_epsilon=cfg.norm_eps,
                initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings)


def _config_from_gpt2(hf: dict[str, Any]) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in _GELU_IN:
        raise ValueError(f"gpt2 config: activation_function {act!r} is not one of {sorted(_GELU_IN)}")
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False)):
        if hf.get(key, ok) != ok:
            raise ValueError(f"gpt2 config: {key} = {hf[key]} is not supported (needs {ok})")
    d = hf.get("n_embd", 768)
    return ModelConfig(vocab_size=hf.get("vocab_size", 50257), n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12),
                       d_model=d, d_ff=hf.get("n_inner") or 4 * d, max_seq_len=hf.get("n_positions", 1024),
                       pos_encoding="learned", norm="layernorm", mlp=_GELU_IN[act], bias=True,
                       dropout=hf.get("resid_pdrop", 0.1), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                       init_std=hf.get("initializer_range", 0.02), tie_embeddings=hf.get("tie_word_embeddings", True))


_GPT2_BLOCK = {"ln_1": "ln_1", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "ln_2": "ln_2",
               "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
_CONV1D = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")  # HF stores these (in, out)


def _gpt2_names(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    """(our name, HF name, transposed) for every tensor."""
    names = [("tok_emb.weight", "transformer.wte.weight", False), ("pos_emb.weight", "transformer.wpe.weight", False),
             ("ln_f.weight", "transformer.ln_f.weight", False), ("ln_f.bias", "transformer.ln_f.bias", False)]
    for i in range(cfg.n_layer):
        for ours, theirs in _GPT2_BLOCK.items():
            names.append((f"blocks.{i}.{ours}.weight", f"transformer.h.{i}.{theirs}.weight", ours in _CONV1D))
            names.append((f"blocks.{i}.{ours}.bias", f"transformer.h.{i}.{theirs}.bias", False))
    if not cfg.tie_embeddings:
        names.append(("lm_head.weight", "lm_head.weight", False))
    return names


def _to_gpt2(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return {theirs: sd[ours].t() if transposed else sd[ours] for ours, theirs, transposed in _gpt2_names(cfg)}


def _from_gpt2(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    # OpenAI's original checkpoints name tensors without the "transformer." prefix.
    tensors = {k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v for k, v in tensors.items()}
    return {ours: tensors[theirs].t() if transposed else tensors[theirs]
            for ours, theirs, transposed in _gpt2_names(cfg) if theirs in tensors}


# --- LLaMA ------------------------------------------------------------------------------------

def _llama_config(cfg: ModelConfig) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "linear":
        rope.update(rope_type="linear", factor=cfg.rope_factor)
    elif cfg.rope_scaling == "yarn":
        rope.update(rope_type="yarn", factor=cfg.rope_factor, original_max_position_embeddings=cfg.rope_original_len)
    elif cfg.rope_scaling == "ntk":  # static NTK-aware scaling is plain RoPE with a larger base
        rope["rope_theta"] = cfg.rope_theta * cfg.rope_factor ** (cfg.head_dim / (cfg.head_dim - 2))
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
                rms_norm_eps=cfg.norm_eps, initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings,
                attention_bias=cfg.bias, mlp_bias=cfg.bias, attention_dropout=cfg.dropout, rope_parameters=rope)


def _llama_rope(hf: dict[str, Any]) -> dict[str, Any]:
    """Our rope fields from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (4.x)."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    if kind == "default":
        return dict(rope_theta=theta)
    if kind == "linear":
        return dict(rope_theta=theta, rope_scaling="linear", rope_factor=rope["factor"])
    extras = {k: rope[k] for k in ("attention_factor", "mscale", "mscale_all_dim") if rope.get(k) is not None}
    if kind == "yarn" and not extras and rope.get("beta_fast", 32) == 32 and rope.get("beta_slow", 1) == 1 \
            and rope.get("truncate", True) and rope.get("factor") is not None:
        original = rope.get("original_max_position_embeddings")  # ours leaves "the training context" as None
        return dict(rope_theta=theta, rope_scaling="yarn", rope_factor=rope["factor"],
                    rope_original_max_seq_len=None if original == hf.get("max_position_embeddings") else original)
    raise ValueError(f"llama config: rope {rope} is not supported (default, linear, or yarn with default constants)")


def _config_from_llama(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"llama config: hidden_act {hf['hidden_act']!r} is not supported (needs 'silu')")
    attention_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
    if attention_bias != mlp_bias:
        raise ValueError(f"llama config: attention_bias {attention_bias} and mlp_bias {mlp_bias} must agree")
    d, n_head = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, d // n_head):
        raise ValueError(f"llama config: head_dim {hf['head_dim']} must be hidden_size / num_attention_heads = {d // n_head}")
    return ModelConfig(vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=n_head, d_model=d,
                       n_kv_head=hf.get("num_key_value_heads") or n_head, d_ff=hf["intermediate_size"],
                       max_seq_len=hf.get("max_position_embeddings", 2048), pos_encoding="rope", norm="rmsnorm",
                       norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu", bias=attention_bias,
                       dropout=hf.get("attention_dropout", 0.0), init_std=hf.get("initializer_range", 0.02),
                       tie_embeddings=hf.get("tie_word_embeddings", False), **_llama_rope(hf))


def _to_llama(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["ln_f.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        out[theirs + "input_layernorm.weight"] = sd[ours + "ln_1.weight"]
        out[theirs + "post_attention_layernorm.weight"] = sd[ours + "ln_2.weight"]
        for kind in ("weight", "bias") if cfg.bias else ("weight",):
            for name, part in zip(("q_proj", "k_proj", "v_proj"), sd[f"{ours}attn.qkv.{kind}"].split([q, kv, kv])):
                out[f"{theirs}self_attn.{name}.{kind}"] = part
            out[f"{theirs}self_attn.o_proj.{kind}"] = sd[f"{ours}attn.proj.{kind}"]
            gate, up = sd[f"{ours}mlp.fc.{kind}"].chunk(2)
            out[f"{theirs}mlp.gate_proj.{kind}"], out[f"{theirs}mlp.up_proj.{kind}"] = gate, up
            out[f"{theirs}mlp.down_proj.{kind}"] = sd[f"{ours}mlp.proj.{kind}"]
    return out


def _from_llama(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    sd = {"tok_emb.weight": tensors["model.embed_tokens.weight"], "ln_f.weight": tensors["model.norm.weight"]}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = tensors["lm_head.weight"]
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        sd[ours + "ln_1.weight"] = tensors[theirs + "input_layernorm.weight"]
        sd[ours + "ln_2.weight"] = tensors[theirs + "post_attention_layernorm.weight"]
        for kind in ("weight", "bias") if cfg.bias else ("weight",):
            attn, mlp = f"{theirs}self_attn.", f"{theirs}mlp."
            sd[f"{ours}attn.qkv.{kind}"] = torch.cat([tensors[f"{attn}{p}_proj.{kind}"] for p in "qkv"])
            sd[f"{ours}attn.proj.{kind}"] = tensors[f"{attn}o_proj.{kind}"]
            sd[f"{ours}mlp.fc.{kind}"] = torch.cat([tensors[f"{mlp}gate_proj.{kind}"], tensors[f"{mlp}up_proj.{kind}"]])
            sd[f"{ours}mlp.proj.{kind}"] = tensors[f"{mlp}down_proj.{kind}"]
    return sd
