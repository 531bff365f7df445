from pathlib import Path

import pytest
import torch

from model import (
    GPT,
    ModelConfig,
    generate,
    load_model,
    save_model,
    state_dict_for_save,
)
from model.kv_cache import KVCache


def tiny(pos: str = "learned", **kw) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=97, n_layer=2, n_head=4, d_model=32, max_seq_len=48, pos_encoding=pos, **kw)).eval()


@pytest.mark.parametrize("pos", ["learned", "sinusoidal"])
def test_forward_returns_logits_or_loss(pos):
    m = tiny(pos)
    idx = torch.randint(0, 97, (3, 10))
    assert m(idx).shape == (3, 10, 97)
    loss = m(idx, idx)
    assert loss.dim() == 0 and 3.0 < loss.item() < 6.0  # ~ln(97) = 4.57 at init


def test_unembedding_is_tied_and_counted_once():
    m = tiny()
    assert m.lm_head.weight is m.tok_emb.weight
    assert m.num_params == sum(p.numel() for p in set(m.parameters()))


def test_model_is_causal():
    m = tiny()
    a = torch.randint(0, 97, (1, 12))
    b = a.clone()
    b[0, 8:] = (b[0, 8:] + 1) % 97  # change only the future
    torch.testing.assert_close(m(a)[:, :8], m(b)[:, :8])


@pytest.mark.parametrize("pos", ["learned", "sinusoidal"])
def test_cached_logits_equal_full_forward(pos):
    m = tiny(pos)
    idx = torch.randint(0, 97, (2, 20))
    full = m(idx)
    cache = KVCache(n_layer=2, batch_size=2, n_head=4, head_dim=8, max_len=20)
    chunks = [m(idx[:, :7], kv_cache=cache), m(idx[:, 7:8], kv_cache=cache), m(idx[:, 8:20], kv_cache=cache)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos", ["learned", "sinusoidal"])
def test_kv_cache_decoding_equals_full_forward_decoding(pos):
    m = tiny(pos)
    prompt = [5, 17, 3, 42]
    greedy_cached = generate(m, prompt, max_new_tokens=20, temperature=0.0)
    greedy_full = generate(m, prompt, max_new_tokens=20, temperature=0.0, use_cache=False)
    assert greedy_cached == greedy_full and len(greedy_cached[0]) == 20
    sampled_cached = generate(m, prompt, max_new_tokens=20, temperature=1.0, top_k=10, seed=3, num_samples=3)
    sampled_full = generate(m, prompt, max_new_tokens=20, temperature=1.0, top_k=10, seed=3, num_samples=3, use_cache=False)
    assert sampled_cached == sampled_full


def test_sampling_is_seeded_and_top_k_restricts_the_support():
    m = tiny("sinusoidal")
    a = generate(m, [1, 2], max_new_tokens=15, temperature=1.0, top_k=1, seed=1)
    assert a == generate(m, [1, 2], max_new_tokens=15, temperature=0.0)  # top-1 sampling is greedy
    b = generate(m, [1, 2], max_new_tokens=15, temperature=2.0, seed=7, num_samples=4)
    assert b == generate(m, [1, 2], max_new_tokens=15, temperature=2.0, seed=7, num_samples=4)
    assert len({tuple(s) for s in b}) > 1  # samples of one prompt differ


def test_stop_token_ends_a_sample():
    m = tiny()
    first = generate(m, [1, 2], max_new_tokens=10, temperature=0.0)[0][0]
    out = generate(m, [1, 2], max_new_tokens=10, temperature=0.0, stop_token=first)
    assert out == [[first]]


def test_learned_positions_refuse_lengths_beyond_their_table_sinusoidal_do_not():
    with pytest.raises(AssertionError, match="beyond the learned table of 48"):
        tiny("learned")(torch.zeros(1, 49, dtype=torch.long))
    assert tiny("sinusoidal")(torch.zeros(1, 96, dtype=torch.long)).shape == (1, 96, 97)
    assert not tiny("learned").supports_length(49) and tiny("sinusoidal").supports_length(10_000)


def test_safetensors_round_trip(tmp_path):
    m = tiny("sinusoidal")
    save_model(tmp_path, state_dict_for_save(m), m.config, step=7)
    loaded, meta = load_model(tmp_path)
    assert meta["step"] == 7 and loaded.config == m.config
    idx = torch.randint(0, 97, (1, 9))
    torch.testing.assert_close(loaded(idx), m(idx))


def test_loading_checks_the_config_against_the_tensors(tmp_path):
    m = tiny()
    other = ModelConfig(vocab_size=97, n_layer=2, n_head=4, d_model=64, max_seq_len=48)
    save_model(tmp_path, state_dict_for_save(m), other)
    with pytest.raises(ValueError, match=r"tok_emb.weight has shape \(97, 32\), model.json implies \(97, 64\)"):
        load_model(tmp_path)


def test_loading_rejects_tensors_the_config_does_not_describe(tmp_path):
    m = tiny()
    sd = state_dict_for_save(m)
    sd["blocks.9.attn.qkv.weight"] = torch.zeros(3)
    save_model(tmp_path, sd, m.config)
    with pytest.raises(ValueError, match=r"blocks\.9\.attn\.qkv\.weight"):
        load_model(tmp_path)


def test_untied_unembedding_is_saved_and_loaded(tmp_path):
    m = tiny("rope", tie_embeddings=False, norm="rmsnorm", mlp="swiglu", n_kv_head=2)
    sd = state_dict_for_save(m)
    assert "lm_head.weight" in sd and "lm_head.weight" not in state_dict_for_save(tiny())  # tied: dropped
    save_model(tmp_path, sd, m.config)
    loaded, _ = load_model(tmp_path)
    assert loaded.config == m.config and loaded.lm_head.weight is not loaded.tok_emb.weight
    idx = torch.randint(0, 97, (2, 11))
    assert torch.equal(loaded(idx), m(idx))


def test_a_model_json_from_before_the_new_fields_loads_as_the_same_model(tmp_path):
    import json

    m = tiny("sinusoidal")
    save_model(tmp_path, state_dict_for_save(m), m.config)
    old_fields = ["vocab_size", "n_layer", "n_head", "d_model", "d_ff", "max_seq_len", "pos_encoding", "dropout", "bias",
                  "norm_eps", "init_std"]
    meta = json.loads((tmp_path / "model.json").read_text())
    meta["model_config"] = {k: meta["model_config"][k] for k in old_fields}
    (tmp_path / "model.json").write_text(json.dumps(meta))
    loaded, _ = load_model(tmp_path)
    cfg = loaded.config
    assert (cfg.norm, cfg.mlp, cfg.tie_embeddings, cfg.n_kv_head) == ("layernorm", "gelu", True, 4)
    idx = torch.randint(0, 97, (1, 9))
    assert torch.equal(loaded(idx), m(idx))


def test_the_model_package_exports_resolve_and_retrieval_imports_without_torch():
    """`model` imports its names on first use, so a BM25 index task never pays torch's import."""
    import importlib
    import subprocess
    import sys

    import model

    assert sorted(model._EXPORTS) == model.__all__
    for name in model.__all__:
        assert getattr(model, name) is getattr(importlib.import_module(model._EXPORTS[name]), name)
    code = "import sys, model.retrieval, bm25s; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"
