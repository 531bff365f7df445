"""The architecture options of ModelConfig: counts, FLOPs, presets, positions, GQA, RoPE scaling, init, checkpointing."""

import math

import pytest
import torch

from model import (
    GPT,
    PRESETS,
    KVCache,
    ModelConfig,
    flops_per_token,
    param_count,
    preset,
)
from model.layers import alibi_slopes, sinusoidal_positions

POS = ["learned", "sinusoidal", "rope", "alibi", "none"]


def tiny(pos: str = "learned", **kw) -> GPT:
    torch.manual_seed(0)
    kw = {"vocab_size": 97, "n_layer": 2, "n_head": 4, "d_model": 32, "max_seq_len": 48, "pos_encoding": pos, **kw}
    return GPT(ModelConfig(**kw)).eval()


def sharpen(m: GPT) -> GPT:
    """Larger random weights than the init, so attention is far from uniform and positions matter."""
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    return m


@pytest.mark.parametrize("pos", POS)
@pytest.mark.parametrize("norm, mlp, bias, tie, kv", [("layernorm", "gelu", True, True, 4), ("rmsnorm", "swiglu", False, False, 2),
                                                      ("layernorm", "gelu_tanh", False, True, 1), ("rmsnorm", "gelu", True, False, 4)])
def test_param_count_from_the_config_equals_the_built_model(pos, norm, mlp, bias, tie, kv):
    cfg = ModelConfig(vocab_size=101, n_layer=3, n_head=4, n_kv_head=kv, d_model=32, max_seq_len=40, pos_encoding=pos,
                      norm=norm, mlp=mlp, bias=bias, tie_embeddings=tie)
    assert param_count(cfg) == GPT(cfg).num_params


def test_presets_have_the_published_sizes_and_accept_overrides():
    assert param_count(preset("gpt2-small")) == 124_439_808  # OpenAI GPT-2 small, as Hugging Face counts it
    assert param_count(preset("gpt2-medium")) == 354_823_168
    assert 55e6 < param_count(preset("llama-60m")) < 62e6 and 155e6 < param_count(preset("llama-160m")) < 170e6
    demo = preset("demo")
    assert (demo.n_layer, demo.n_head, demo.d_model, demo.max_seq_len, demo.pos_encoding, demo.norm, demo.mlp,
            demo.tie_embeddings) == (4, 4, 128, 128, "learned", "layernorm", "gelu", True)
    small = preset("llama-60m", vocab_size=300, n_layer=2)
    assert (small.vocab_size, small.n_layer, small.pos_encoding, small.mlp) == (300, 2, "rope", "swiglu")
    assert set(PRESETS) >= {"gpt2-small", "gpt2-medium", "llama-60m", "llama-160m", "demo"}
    with pytest.raises(KeyError, match="unknown model preset 'gpt5'"):
        preset("gpt5")
    with pytest.raises(TypeError, match="n_layers"):
        preset("demo", n_layers=3)


def test_flops_per_token_is_6n_plus_the_attention_term():
    cfg = ModelConfig(vocab_size=100, n_layer=2, n_head=2, d_model=16, max_seq_len=32)
    n_matmul = param_count(cfg) - 32 * 16  # the learned position table is a lookup, not a matmul
    assert flops_per_token(cfg) == 6 * n_matmul + 12 * 2 * 16 * 32
    assert flops_per_token(cfg, seq_len=64) - flops_per_token(cfg) == 12 * 2 * 16 * 32
    # Untying adds a lookup table, not work; the unembedding matmul is counted either way.
    assert flops_per_token(ModelConfig(**{**cfg.to_dict(), "tie_embeddings": False})) == flops_per_token(cfg)
    assert GPT(cfg).flops_per_token(64) == flops_per_token(cfg, seq_len=64)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="ModelConfig.n_kv_head: 3 must divide n_head 4"):
        ModelConfig(vocab_size=10, n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="ModelConfig.pos_encoding"):
        ModelConfig(vocab_size=10, pos_encoding="xpos")
    with pytest.raises(ValueError, match="ModelConfig.rope_scaling"):
        ModelConfig(vocab_size=10, pos_encoding="rope", rope_scaling="dynamic")
    assert ModelConfig(vocab_size=10, d_model=96, n_head=4, mlp="swiglu").d_ff == 256  # 8/3 * 96 = 256
    assert ModelConfig(vocab_size=10, d_model=128).n_kv_head == 4


@pytest.mark.parametrize("pos", POS)
@pytest.mark.parametrize("kv", [4, 2, 1])
def test_every_variant_is_causal_and_its_cache_matches_the_full_forward(pos, kv):
    m = tiny(pos, n_kv_head=kv, norm="rmsnorm" if kv == 2 else "layernorm", mlp="swiglu" if kv == 1 else "gelu")
    a = torch.randint(0, 97, (2, 20))
    b = a.clone()
    b[:, 12:] = (b[:, 12:] + 1) % 97
    full = m(a)
    torch.testing.assert_close(full[:, :12], m(b)[:, :12])
    cache = KVCache.for_model(m, batch_size=2, max_len=20)
    assert cache.k.shape == (2, 2, kv, 20, 8)  # only the key/value heads are cached
    chunks = [m(a[:, :7], kv_cache=cache), m(a[:, 7:8], kv_cache=cache), m(a[:, 8:20], kv_cache=cache)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos", POS)
def test_left_padding_changes_nothing_for_the_real_tokens(pos):
    m = tiny(pos, n_kv_head=2)
    row = torch.randint(0, 97, (1, 9))
    padded = torch.cat([torch.full((1, 5), 3), row], dim=1)  # (1, 14): five pad tokens, then the row
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], dim=1)
    alone = m(row)
    torch.testing.assert_close(m(padded, attention_mask=mask)[:, 5:], alone, atol=1e-5, rtol=1e-5)
    cache = KVCache.for_model(m, batch_size=1, max_len=14)
    first = m(padded[:, :10], kv_cache=cache, attention_mask=mask[:, :10])
    rest = m(padded[:, 10:], kv_cache=cache)  # decoding continues the row's positions
    torch.testing.assert_close(torch.cat([first, rest], dim=1)[:, 5:], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(m(padded)[:, 5:], alone, atol=1e-3)  # without the mask the pads do leak in


def test_grouped_query_attention_equals_multi_head_with_shared_key_value_heads():
    gqa = tiny("rope", n_kv_head=2)
    mha = tiny("rope", n_kv_head=4)
    sd = gqa.state_dict()
    for i in range(2):
        q, k, v = sd[f"blocks.{i}.attn.qkv.weight"].split([32, 16, 16])
        k, v = (t.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32) for t in (k, v))  # head h uses kv head h // 2
        sd[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, k, v])
        sd[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(96)
    mha.load_state_dict(sd)
    idx = torch.randint(0, 97, (2, 15))
    torch.testing.assert_close(mha(idx), gqa(idx), atol=1e-5, rtol=1e-5)


def test_alibi_slopes_follow_press_et_al():
    assert alibi_slopes(8).tolist() == [2.0 ** -(i + 1) for i in range(8)]
    # 6 heads: the 4-head slopes, then every other slope of the 8-head sequence
    assert alibi_slopes(6).tolist() == [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]


def test_sinusoidal_positions_are_those_of_the_original_implementation():
    pos = torch.arange(0, 50)
    half = 16
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    expected = torch.zeros(50, 32)
    expected[:, 0::2], expected[:, 1::2] = torch.sin(pos[:, None] * freq), torch.cos(pos[:, None] * freq)
    torch.testing.assert_close(sinusoidal_positions(pos, 32), expected, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "ntk", "yarn"])
def test_rope_scaling_changes_long_context_logits_and_none_restores_them(kind):
    m = sharpen(tiny("rope", max_seq_len=16))
    idx = torch.randint(0, 97, (1, 48))  # three times the trained context
    base = m(idx)
    original_config = m.config
    m.set_rope_scaling(kind, 3.0)
    scaled = m(idx)
    assert (scaled[:, 16:] - base[:, 16:]).abs().max() > 1e-2  # far above float noise (~1e-6)
    assert m.config.rope_scaling == kind and original_config.rope_scaling == "none"  # replaced, not mutated
    m.set_rope_scaling("none")
    assert torch.equal(m(idx), base)
    m.set_rope_scaling("linear", 1.0)  # a factor of one is no scaling at all
    assert torch.equal(m(idx), base)
    with pytest.raises(AssertionError, match="needs pos_encoding='rope'"):
        tiny("alibi").set_rope_scaling("linear", 2.0)


def test_models_other_than_learned_run_past_their_training_context():
    for pos in ("sinusoidal", "rope", "alibi", "none"):
        m = tiny(pos)
        assert m.supports_length(10_000) and m(torch.zeros(1, 96, dtype=torch.long)).shape == (1, 96, 97)


def test_init_weights_scales_residual_projections_by_depth():
    m = GPT(ModelConfig(vocab_size=500, n_layer=8, n_head=4, d_model=64, tie_embeddings=False, bias=True))
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(3.0)
    m.init_weights()
    std = lambda t: t.float().std().item()  # noqa: E731
    assert std(m.blocks[3].attn.proj.weight) == pytest.approx(0.02 / 4, rel=0.1)  # 1 / sqrt(2 * 8) = 1/4
    assert std(m.blocks[3].mlp.proj.weight) == pytest.approx(0.02 / 4, rel=0.1)
    assert std(m.blocks[3].attn.qkv.weight) == pytest.approx(0.02, rel=0.1)
    assert std(m.lm_head.weight) == pytest.approx(0.02, rel=0.1) and m.lm_head.weight is not m.tok_emb.weight
    assert torch.all(m.blocks[0].mlp.fc.bias == 0) and torch.all(m.blocks[0].ln_1.weight == 1)


def test_activation_checkpointing_recomputes_blocks_and_keeps_the_gradients():
    idx = torch.randint(0, 97, (2, 16))
    grads, calls = {}, {}
    for flag in (False, True):
        m = tiny("rope", activation_checkpointing=flag, dropout=0.0).train()
        calls[flag] = 0

        def count(*_):
            calls[flag] += 1

        m.blocks[0].mlp.register_forward_pre_hook(count)  # a pre-hook: recomputation stops once the last saved tensor is back
        m(idx, idx).backward()
        grads[flag] = [p.grad.clone() for p in m.parameters()]
    assert calls == {False: 1, True: 2}  # the checkpointed block ran again in the backward pass
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b)
    m = tiny("rope", activation_checkpointing=True)  # eval mode: no recomputation machinery
    with torch.no_grad():
        assert m(idx).shape == (2, 16, 97)


def test_dropout_is_active_in_training_only():
    m = tiny("learned", dropout=0.3)
    idx = torch.randint(0, 97, (1, 10))
    assert torch.equal(m(idx), m(idx))
    m.train()
    assert not torch.equal(m(idx), m(idx))


def test_grouped_query_attention_without_native_sdpa_support_gives_the_same_logits(monkeypatch):
    import model.gpt

    m = sharpen(tiny("rope", n_kv_head=2))
    idx = torch.randint(0, 97, (2, 12))
    native = m(idx)
    monkeypatch.setattr(model.gpt, "_SDPA_HAS_GQA", False)  # torch < 2.5: heads are repeated instead
    torch.testing.assert_close(m(idx), native, atol=1e-5, rtol=1e-5)
