"""Hugging Face parity: our GPT-2- and LLaMA-style models against `transformers` on the same weights.

Every Hugging Face model here is built from a folder this test writes (export_hf or
save_pretrained of a local config object), never from the hub.
"""

import json

import pytest
import torch

from model import (
    GPT,
    ModelConfig,
    beam_search,
    export_hf,
    generate,
    generate_batch,
    import_hf,
)

GPT2 = dict(pos_encoding="learned", norm="layernorm", bias=True)
LLAMA = dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", norm_eps=1e-6)
VARIANTS = {
    "gpt2-tanh-tied": dict(GPT2, mlp="gelu_tanh"),
    "gpt2-exact-untied": dict(GPT2, mlp="gelu", tie_embeddings=False, norm_eps=1e-6),
    "llama-gqa": dict(LLAMA, n_kv_head=2, bias=False, tie_embeddings=False),
    "llama-mqa-bias-tied": dict(LLAMA, n_kv_head=1, bias=True, tie_embeddings=True, rope_theta=500.0),
    "llama-linear": dict(LLAMA, bias=False, tie_embeddings=False, rope_scaling="linear", rope_factor=2.5, max_seq_len=16),
    "llama-ntk": dict(LLAMA, bias=False, tie_embeddings=False, rope_scaling="ntk", rope_factor=3.0, max_seq_len=16),
    "llama-yarn": dict(LLAMA, n_kv_head=2, bias=False, tie_embeddings=False, rope_scaling="yarn", rope_factor=4.0,
                       max_seq_len=16),
    "llama-yarn-original-8": dict(LLAMA, bias=False, tie_embeddings=False, rope_scaling="yarn", rope_factor=2.0,
                                  max_seq_len=16, rope_original_max_seq_len=8),
}


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every tensor random, norm gains and biases included, so a mis-mapped or transposed one shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.15 if p.dim() >= 2 else 0.3) + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


def ours(name: str, **kw) -> GPT:
    cfg = {"vocab_size": 101, "n_layer": 2, "n_head": 4, "d_model": 32, "max_seq_len": 64, **VARIANTS[name], **kw}
    return randomized(GPT(ModelConfig(**cfg)))


def theirs(folder) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_match_transformers(name, tmp_path):
    m = ours(name)
    hf = theirs(export_hf(m, tmp_path))
    assert type(hf).__name__ == ("GPT2LMHeadModel" if name.startswith("gpt2") else "LlamaForCausalLM")
    idx = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(1))  # past the context of the scaled ones
    with torch.no_grad():
        a, b = m(idx), hf(idx).logits
    assert a.std() > 0.5  # the tolerance below is small against the logits' spread
    assert (a - b).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", VARIANTS)
def test_export_then_import_gives_identical_logits(name, tmp_path):
    m = ours(name)
    back = import_hf(export_hf(m, tmp_path))
    if name != "llama-ntk":  # NTK scaling travels as plain RoPE with the larger base
        assert back.config == m.config
    idx = torch.randint(0, 101, (1, 30))
    with torch.no_grad():
        assert torch.equal(back(idx), m(idx))


def test_a_transformers_gpt2_checkpoint_becomes_our_model(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = randomized(GPT2LMHeadModel(GPT2Config(vocab_size=120, n_positions=50, n_embd=48, n_layer=3, n_head=4)), seed=3)
    hf.save_pretrained(tmp_path)
    m = import_hf(tmp_path)
    assert (m.config.mlp, m.config.tie_embeddings, m.config.max_seq_len) == ("gelu_tanh", True, 50)  # gelu_new
    idx = torch.randint(0, 120, (2, 50))
    with torch.no_grad():
        assert (m(idx) - hf(idx).logits).abs().max().item() <= 1e-4


def test_a_transformers_llama_checkpoint_becomes_our_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=120, hidden_size=48, intermediate_size=100, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
    hf = randomized(LlamaForCausalLM(cfg), seed=4)
    hf.save_pretrained(tmp_path)
    m = import_hf(tmp_path)
    assert (m.config.n_kv_head, m.config.d_ff, m.config.rope_theta, m.config.tie_embeddings) == (2, 100, 1000.0, False)
    idx = torch.randint(0, 120, (2, 40))
    with torch.no_grad():
        assert (m(idx) - hf(idx).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["gpt2-tanh-tied", "llama-gqa"])
def test_greedy_and_beam_search_tokens_match_transformers(name, tmp_path):
    m = ours(name)
    hf = theirs(export_hf(m, tmp_path))
    prompt = [3, 14, 15, 92, 6]
    with torch.no_grad():
        hf_greedy = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
        hf_beam = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, num_beams=4, pad_token_id=0,
                              eos_token_id=None)
    assert generate(m, prompt, max_new_tokens=20, temperature=0.0) == [hf_greedy[0, 5:].tolist()]
    assert beam_search(m, prompt, num_beams=4, max_new_tokens=12) == [hf_beam[0, 5:].tolist()]


@pytest.mark.parametrize("name", ["gpt2-tanh-tied", "llama-gqa"])
def test_left_padded_batch_matches_transformers(name, tmp_path):
    m = ours(name)
    hf = theirs(export_hf(m, tmp_path))
    prompts = [[3, 14, 15, 92, 6, 5, 35], [8, 9], [26, 53, 58]]
    idx = torch.tensor([[0] * (7 - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (7 - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(idx, attention_mask=mask, max_new_tokens=15, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert generate_batch(m, prompts, max_new_tokens=15, temperature=0.0) == out[:, 7:].tolist()


def test_export_writes_the_tokenizer_and_generation_config(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer

    words = ["<eos>", "the", "king", "and", "queen", "fool"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="fool"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    m = ours("llama-gqa", vocab_size=6)
    folder = export_hf(m, tmp_path / "hf", tokenizer=tmp_path / "tokenizer.json", eos_token_id=0, pad_token_id=0)
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 0
    hf_tok = AutoTokenizer.from_pretrained(folder)
    assert hf_tok("the king and the fool")["input_ids"] == [1, 2, 3, 1, 5] and hf_tok.eos_token == "<eos>"


def test_unsupported_architectures_are_refused_naming_the_field(tmp_path):
    with pytest.raises(ValueError, match="pos_encoding 'learned' .* or 'rope' .* not 'alibi'"):
        export_hf(GPT(ModelConfig(vocab_size=10, pos_encoding="alibi")), tmp_path)
    with pytest.raises(ValueError, match="ModelConfig.bias = True, got False"):
        export_hf(GPT(ModelConfig(vocab_size=10, bias=False)), tmp_path)
    with pytest.raises(ValueError, match="ModelConfig.norm = rmsnorm"):
        export_hf(GPT(ModelConfig(vocab_size=10, pos_encoding="rope", mlp="swiglu")), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_act": "gelu", "hidden_size": 8,
                                                      "num_attention_heads": 2}))
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        import_hf(tmp_path)
    with pytest.raises(FileNotFoundError):
        import_hf(tmp_path / "nowhere")
