"""LoRA (Hu et al. 2021): low-rank adapters on chosen linear layers of a frozen GPT, through PEFT.

An adapted layer computes `W x + (alpha / r) * B (A dropout(x))`, with `A` (r, in) and `B` (out, r); `B`
starts at zero, so training starts from the base model's function. PEFT's `inject_adapter_in_model` does
the wrapping on our own `GPT` (it needs only `nn.Linear` children): it replaces each target by a
`peft.tuners.lora.Linear` holding the original as `base_layer`, and freezes everything but the adapters.
The model stays a `GPT`, so DeepSpeed (any ZeRO stage) wraps it as before and its checkpoints carry the
adapters with the rest.

Three views of an adapted model leave this module, in our own names, so nothing downstream needs PEFT:
- `merged_state_dict`: a plain GPT state dict with `W + (alpha / r) B A` in every adapted weight (computed
  in fp32), what evaluate, decode, generate and serving load unchanged;
- `adapter_state_dict`: only the adapters, `blocks.{i}.{target}.lora_A` / `.lora_B`;
- `base_state_dict`: the frozen base, and `weights_digest` of it, which names the base an adapter belongs to.
`model.hf.export_peft_adapter` turns the adapter into PEFT's own format on a Hugging Face export.

Targets are the names of a block's linear layers (`attn.qkv`, `attn.proj`, `mlp.fc`, `mlp.proj`), found on
the model itself (`linear_targets`), so a target that names no layer is refused with the list of those that
exist. The unembedding is not offered: when tied to the token embedding, merging into it would change the
embedding too. Pure PyTorch + PEFT: no Ray, DeepSpeed or MLflow here.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from model.gpt import GPT

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
ADAPTER = "default"  # PEFT's name for the one adapter a model holds


@dataclass(frozen=True, kw_only=True)
class LoraOptions:
    """The `train.lora` section: low-rank adapters on chosen linear layers, the base model frozen."""

    r: int = 8
    """Rank of each adapter (A is r x in, B is out x r)."""
    alpha: float = 16.0
    """Scale: an adapter adds (alpha / r) B A to its layer's weight."""
    dropout: float = 0.0
    """Dropout on an adapter's input (the base layer's input is left alone)."""
    targets: list[str] = field(default_factory=lambda: ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"])
    """A block's linear layers that get adapters, in every block: attn.qkv, attn.proj, mlp.fc, mlp.proj."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoraOptions.r: must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"LoraOptions.alpha: must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraOptions.dropout: must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("LoraOptions.targets: give at least one linear layer")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def linear_targets(model: nn.Module) -> list[str]:
    """The names a target may take: each linear layer inside a block, without its `blocks.{i}.` prefix."""
    names = {m.group(2) for name, mod in model.named_modules()
             if isinstance(mod, nn.Linear) and (m := _BLOCK.match(name)) and ".lora_" not in name}
    return sorted(names)


def unknown_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """The targets that name no linear layer of `model` (works on a model built on the meta device)."""
    available = set(linear_targets(model))
    return [t for t in targets if t not in available]


def add_adapters(model: GPT, opts: LoraOptions) -> GPT:
    """Wrap the target layers of every block with LoRA adapters (PEFT) and freeze everything else, in place.
    `A` is drawn from torch's global generator (Kaiming-uniform, PEFT's default), `B` is zero."""
    from peft import LoraConfig, inject_adapter_in_model

    if bad := unknown_targets(model, opts.targets):
        raise ValueError(f"LoRA targets {bad} name no linear layer; available: {', '.join(linear_targets(model))}")
    config = LoraConfig(r=opts.r, lora_alpha=opts.alpha, lora_dropout=opts.dropout, bias="none",
                        target_modules=_target_regex(opts.targets))
    return inject_adapter_in_model(config, model, adapter_name=ADAPTER)


def _target_regex(targets: list[str]) -> str:
    # a full-match regex: "attn.proj" must adapt blocks.{i}.attn.proj only, never blocks.{i}.mlp.proj
    return r"blocks\.\d+\.(" + "|".join(re.escape(t) for t in targets) + ")"


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Our module name (`blocks.0.attn.qkv`) -> its PEFT LoRA layer."""
    from peft.tuners.lora import LoraLayer

    return {name: mod for name, mod in model.named_modules() if isinstance(mod, LoraLayer)}


def is_adapted(model: nn.Module) -> bool:
    return bool(_lora_layers(model))


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters alone: `{name}.lora_A` (r, in) and `{name}.lora_B` (out, r) per adapted layer."""
    out = {}
    for name, layer in _lora_layers(model).items():
        out[f"{name}.lora_A"] = layer.lora_A[ADAPTER].weight.detach().cpu().contiguous()
        out[f"{name}.lora_B"] = layer.lora_B[ADAPTER].weight.detach().cpu().contiguous()
    return out


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base in plain GPT names (`...qkv.base_layer.weight` -> `...qkv.weight`), adapters left out."""
    sd = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        sd[key.replace(".base_layer.", ".")] = value.detach().cpu().contiguous()
    if getattr(model, "config", None) is not None and model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def merged_state_dict(model: nn.Module, scale: float) -> dict[str, torch.Tensor]:
    """A plain GPT state dict with every adapter folded in: W + scale * B A, computed in fp32, stored in W's dtype."""
    sd = base_state_dict(model)
    for name, delta in adapter_deltas(adapter_state_dict(model), scale).items():
        w = sd[f"{name}.weight"]
        sd[f"{name}.weight"] = (w.float() + delta).to(w.dtype).contiguous()
    return sd


def adapter_deltas(adapter: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Layer name -> the fp32 weight update scale * B A of each adapter in an `adapter_state_dict`."""
    names = sorted(k.removesuffix(".lora_A") for k in adapter if k.endswith(".lora_A"))
    return {n: scale * (adapter[f"{n}.lora_B"].float() @ adapter[f"{n}.lora_A"].float()) for n in names}


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes (sorted by name): the identity of a base."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
