"""LoRA (`train.lora`): only adapters train, resume is exact under ZeRO 1/2/3, the merged export equals
`transformers` and PEFT's unmerged model on the exported base + adapter, a bad target is one line, and a run
through the real train stage writes the adapter beside the merged model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from model import GPT, ModelConfig, export_hf, save_model, state_dict_for_save
from model.hf import export_peft_adapter
from model.lora import (
    LoraOptions,
    adapter_deltas,
    adapter_state_dict,
    add_adapters,
    base_state_dict,
    merged_state_dict,
    weights_digest,
)
from pipeline import cli
from tests.conftest import tiny_raw
from tests.test_hf_parity import ours, theirs

MODEL = {"vocab_size": 300, "n_layer": 2, "n_head": 2, "d_model": 32, "max_seq_len": 16}


def _adapted(name: str, targets: list[str]) -> tuple[GPT, LoraOptions]:
    """A randomized model with adapters whose B is random too (B = 0 would hide a mis-mapped adapter)."""
    model, opts = ours(name), LoraOptions(r=4, alpha=8.0, targets=targets)
    add_adapters(model, opts)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, value in model.named_parameters():
            if "lora_B" in key:
                value.copy_(torch.randn(value.shape, generator=gen) * 0.1)
    return model.eval(), opts


@pytest.mark.parametrize("name,targets", [("gpt2-tanh-tied", ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"]),
                                          ("llama-gqa", ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"]),
                                          ("llama-mqa-bias-tied", ["attn.qkv", "mlp.proj"])])
def test_merged_export_matches_transformers_and_peft_on_the_exported_base_and_adapter(name, targets, tmp_path):
    from peft import PeftModel

    model, opts = _adapted(name, targets)
    tied = model.config.tie_embeddings
    merged, base = GPT(model.config), GPT(model.config)
    merged.load_state_dict(merged_state_dict(model, opts.scale), strict=not tied)
    base.load_state_dict(base_state_dict(model), strict=not tied)
    export_hf(merged, tmp_path / "merged")
    export_hf(base, tmp_path / "base")
    export_peft_adapter(adapter_state_dict(model), model.config, tmp_path / "base" / "adapter", r=opts.r,
                        alpha=opts.alpha, dropout=opts.dropout, base=str(tmp_path / "base"))
    x = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
        hf_merged = theirs(tmp_path / "merged")(x).logits
        peft = PeftModel.from_pretrained(theirs(tmp_path / "base"), tmp_path / "base" / "adapter").eval()
        hf_unmerged = peft(x).logits
        hf_base = theirs(tmp_path / "base")(x).logits
    assert (hf_merged - ref).abs().max() <= 1e-4
    assert (hf_unmerged - hf_merged).abs().max() <= 1e-4
    assert (hf_base - ref).abs().max() > 1e-2  # the adapter is really there (and really applied by PEFT)


# --- the real worker loop, one process, DeepSpeed ZeRO 1/2/3 ---------------------------------------------------

def _shard(folder: Path) -> str:
    from tokenization.shards import write_shard

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, MODEL["vocab_size"], size=int(n), dtype=np.uint16) for n in rng.integers(40, 200, size=60)]
    write_shard(folder / "train-00000.arrow", docs, np.dtype(np.uint16))
    return str(folder / "train-00000.arrow")


def _worker(shard: str, ckpt: Path, init_from: Path, zero: int, steps: int) -> dict:
    return {"model": MODEL, "seq_len": 16, "train_shards": [shard], "local_checkpoint_dir": str(ckpt),
            "train": {"steps": steps, "global_batch_size": 4, "micro_batch_size": 2, "lr": 1e-2, "min_lr": 1e-2,
                      "warmup_steps": 0, "lr_schedule": "constant", "weight_decay": 0.1, "betas": [0.9, 0.95],
                      "grad_clip": 1.0, "zero_stage": zero, "precision": "fp32", "seed": 3, "deepspeed": {},
                      "init_from": str(init_from), "checkpoint_every": 2, "log_every": 100,
                      "lora": {"r": 2, "alpha": 4.0, "dropout": 0.1, "targets": ["attn.qkv", "mlp.proj"]}}}


def _final(ckpt: Path, steps: int) -> Path:
    (d,) = ckpt.glob(f"**/step_{steps:08d}")
    return d


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_lora_trains_only_the_adapters_and_resumes_exactly(zero, tmp_path, capsys):
    """The frozen base never changes (its digest and the merged weights minus the adapters), and a run stopped at
    step 2 and resumed to step 4 ends with the very adapter of an uninterrupted 4-step run (dropout included)."""
    from pipeline.stages.train.worker import train_loop_per_worker

    torch.manual_seed(0)
    base = GPT(ModelConfig(**MODEL))
    save_model(tmp_path / "base", state_dict_for_save(base), base.config)
    shard = _shard(tmp_path)
    train_loop_per_worker(_worker(shard, tmp_path / "straight", tmp_path / "base", zero, steps=4))
    train_loop_per_worker(_worker(shard, tmp_path / "resumed", tmp_path / "base", zero, steps=2))
    capsys.readouterr()
    train_loop_per_worker(_worker(shard, tmp_path / "resumed", tmp_path / "base", zero, steps=4))  # from step 2
    assert "at step 2" in capsys.readouterr().out  # it did resume (a fresh run would give the same adapter)

    straight, resumed = _final(tmp_path / "straight", 4), _final(tmp_path / "resumed", 4)
    meta = json.loads((straight / "adapter.json").read_text())
    assert meta["base"]["weights_sha256"] == weights_digest(state_dict_for_save(base))
    adapter, merged = load_file(str(straight / "adapter.safetensors")), load_file(str(straight / "model.safetensors"))
    assert sorted(adapter) == [f"blocks.{i}.{t}.lora_{ab}" for i in (0, 1) for t in ("attn.qkv", "mlp.proj") for ab in "AB"]
    assert all(adapter[k].abs().max() > 0 for k in adapter if k.endswith("lora_B"))  # the adapters did train
    deltas = adapter_deltas(adapter, scale=2.0)
    for key, w in state_dict_for_save(base).items():
        layer = key.removesuffix(".weight")
        expected = (w.float() + deltas[layer]) if layer in deltas else w
        assert torch.equal(merged[key], expected), key  # untouched tensors bit-identical, adapted ones W + sBA
    again = load_file(str(resumed / "adapter.safetensors"))
    assert all(torch.equal(adapter[k], again[k]) for k in adapter)


# --- the config and the real train stage --------------------------------------------------------------------------

def test_a_lora_target_that_names_no_layer_is_one_line_before_any_stage(corpus_dir, tmp_path, tracking_uri, capsys):
    cfg = tmp_path / "bad.yaml"
    raw = tiny_raw(corpus_dir, tmp_path / "store", train={"lora": {"targets": ["attn.qkv", "attn.q_proj"]}})
    cfg.write_text(yaml.safe_dump(raw))
    assert cli.main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.lora.targets" in err[0] and "'attn.q_proj'" in err[0]
    assert "available: attn.proj, attn.qkv, mlp.fc, mlp.proj" in err[0]
    assert not (Path(raw["store"]["root"]) / "tokenizer").exists()  # refused at plan time, before any work


@pytest.mark.slow
def test_a_lora_run_through_the_train_stage_writes_merged_weights_and_an_exportable_adapter(
        corpus_dir, tmp_path, tracking_uri, ray_local, monkeypatch):
    from peft import PeftModel

    def config(name: str, **train) -> str:
        raw = tiny_raw(corpus_dir, tmp_path / "store", train={"steps": 3, "max_failures": 0, "log_model": False, **train})
        raw["name"] = name
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(raw))
        return str(tmp_path / f"{name}.yaml")

    full = config("full", num_workers=1, steps=2, warmup_steps=1)
    for stage in ("tokenizer", "prepare"):
        assert cli.main(["run", full, "--only", stage]) == 0
    # the base: a model folder as a train stage writes it (its model.json names the train fingerprint it came from),
    # made here rather than trained, which would cost a Ray Train run the test is not about
    from pipeline.config import load_config
    from tokenization.bpe import load_tokenizer

    (tok_dir,) = [p for p in (tmp_path / "store" / "tokenizer").iterdir() if (p / "_COMPLETE.json").exists()]
    vocab = load_tokenizer(str(tok_dir / "tokenizer.json")).get_vocab_size()
    base_cfg = ModelConfig(**{**load_config(full).model.model_config_fields(), "vocab_size": vocab})
    torch.manual_seed(0)
    base_dir = tmp_path / "base"
    save_model(base_dir, state_dict_for_save(GPT(base_cfg)), base_cfg, train_fingerprint="b" * 64)
    monkeypatch.chdir(tmp_path)  # a relative init_from is the user's working directory's, also in the Ray workers
    lora = config("lora", init_from="base", lora={"r": 4, "alpha": 8.0, "targets": ["attn.qkv", "mlp.fc"]})
    assert cli.main(["run", lora, "--only", "train"]) == 0
    (out,) = [p for p in (tmp_path / "store" / "train").iterdir() if (p / "_COMPLETE.json").exists()]
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["targets"] == ["attn.qkv", "mlp.fc"] and meta["base"]["init_from"]["path"] == str(base_dir.resolve())
    assert meta["base"]["train_fingerprint"] == json.loads((base_dir / "model.json").read_text())["train_fingerprint"]
    assert (out / "adapter.safetensors").stat().st_size < (out / "model.safetensors").stat().st_size / 5

    assert cli.main(["export-hf", str(out), str(tmp_path / "merged"), "--merge"]) == 0
    assert cli.main(["export-hf", str(out), str(tmp_path / "unmerged")]) == 0
    assert not (tmp_path / "merged" / "adapter").exists()
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = theirs(tmp_path / "merged")(x).logits
        peft = PeftModel.from_pretrained(theirs(tmp_path / "unmerged"), tmp_path / "unmerged" / "adapter").eval()
        assert (peft(x).logits - merged).abs().max() <= 1e-4
        base_logits = theirs(tmp_path / "unmerged")(x).logits
    assert (base_logits - merged).abs().max() > 0  # the base alone is another model
