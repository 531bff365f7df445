"""The encoder-decoder family (T5): relative position buckets, the model's shapes, logits and generated tokens
equal to transformers' T5, and decoding that runs the encoder and the cross-attention projections once."""

from __future__ import annotations

import pytest
import torch

from model import EncoderDecoder, ModelConfig, export_hf, import_hf, param_count
from model.generation import beam_search, generate_batch
from model.seq2seq import CrossAttention, conditioned, relative_buckets


def t5(**kw) -> ModelConfig:
    base = dict(vocab_size=120, family="encoder-decoder", pos_encoding="t5", n_layer=2, n_head=4, d_model=32, d_ff=64,
                norm="rmsnorm", norm_eps=1e-6, bias=False, mlp="relu", scale_attention=False, rel_buckets=8,
                rel_max_distance=20, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


def perturbed(cfg: ModelConfig, seed: int = 0, scale: float = 0.3) -> EncoderDecoder:
    torch.manual_seed(seed)
    model = EncoderDecoder(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def test_relative_buckets_are_exact_near_logarithmic_far_and_directional_where_bidirectional():
    rel = torch.arange(-40, 41)
    both = relative_buckets(rel, bidirectional=True, num_buckets=8, max_distance=20)
    assert both[40:42].tolist() == [0, 5] and both[39].tolist() == 1  # 0; one after (second half); one before
    assert both[0] == 3 and both[-1] == 7  # far before / far after: each half's last bucket
    back = relative_buckets(rel, bidirectional=False, num_buckets=8, max_distance=20)
    assert (back[41:] == 0).all() and back[40 - 3] == 3 and back[0] == 7  # later keys: bucket 0 (masked anyway)
    assert (back[:41].diff() <= 0).all()  # farther back never lands in a nearer bucket


@pytest.mark.parametrize("kw", [dict(), dict(mlp="geglu", n_decoder_layer=3), dict(norm_position="post"),
                                dict(tie_embeddings=False, bias=True)])
def test_param_count_from_the_config_equals_the_built_models(kw):
    cfg = t5(**kw)
    assert param_count(cfg) == EncoderDecoder(cfg).num_params


@pytest.mark.parametrize("kw, key", [(dict(pos_encoding="learned"), "pos_encoding"),
                                     (dict(family="decoder"), "pos_encoding"), (dict(n_decoder_layer=0), "n_decoder_layer")])
def test_what_the_family_cannot_take_is_named(kw, key):
    with pytest.raises(ValueError, match=key):
        t5(**kw)


@pytest.mark.parametrize("mlp", ["relu", "geglu"])
def test_exported_t5_logits_equal_transformers_with_a_padded_source(mlp, tmp_path):
    from transformers import T5ForConditionalGeneration

    model = perturbed(t5(mlp=mlp, n_decoder_layer=3), scale=0.1)
    export_hf(model, tmp_path, pad_token_id=1, eos_token_id=0)
    theirs = T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    g = torch.Generator().manual_seed(0)
    src, tgt = torch.randint(2, 120, (2, 30), generator=g), torch.randint(2, 120, (2, 12), generator=g)
    mask = torch.ones_like(src)
    mask[1, 22:] = 0
    with torch.no_grad():
        ours = model(src, tgt, src_mask=mask)
        assert (ours - theirs(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits).abs().max() <= 1e-4
        back = import_hf(tmp_path)
        assert back.config == model.config and torch.equal(back(src, tgt, src_mask=mask), ours)


def test_greedy_and_beam_search_generate_the_tokens_transformers_generates(tmp_path):
    from transformers import T5ForConditionalGeneration

    # equal stacks: transformers 5 sizes T5's decoding cache by num_layers, so it cannot decode a deeper decoder
    model = perturbed(t5(mlp="geglu"), seed=3)
    export_hf(model, tmp_path, pad_token_id=1, eos_token_id=0)
    theirs = T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    src = torch.randint(2, 120, (1, 25), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=20, do_sample=False, min_length=0)
    with torch.no_grad():
        greedy = theirs.generate(input_ids=src, num_beams=1, **kw)[0, 1:].tolist()
        beams = theirs.generate(input_ids=src, num_beams=4, **kw)[0, 1:].tolist()
    ours = conditioned(model, src.tolist())
    assert generate_batch(ours, [[1]], max_new_tokens=20, temperature=0.0, stop_tokens={0})[0] == greedy
    assert beam_search(ours, [1], num_beams=4, max_new_tokens=20, stop_tokens={0})[0] == beams
    assert len(set(greedy)) > 2  # a real sequence, not one token repeated


def test_batched_cached_decoding_equals_each_source_alone_without_a_cache(monkeypatch):
    model = perturbed(t5(n_decoder_layer=3), seed=5)
    sources = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    kw = dict(max_new_tokens=[9, 4, 12], temperature=0.9, top_k=20, seed=[11, 12, 13])
    calls = []
    original = CrossAttention.keys_values
    monkeypatch.setattr(CrossAttention, "keys_values", lambda self, m: calls.append(m.shape) or original(self, m))
    together = generate_batch(conditioned(model, sources), [[1]] * 3, **kw)
    assert len(calls) == 3  # one projection per decoder layer for the whole request, not one per token
    for i, src in enumerate(sources):
        alone = generate_batch(conditioned(model, [src]), [[1]], max_new_tokens=kw["max_new_tokens"][i], temperature=0.9,
                               top_k=20, seed=[kw["seed"][i]], use_cache=False)
        assert alone[0] == together[i]


def test_a_pipeline_config_with_an_encoder_decoder_is_refused_in_one_line(corpus_dir, tmp_path, capsys):
    import yaml

    from pipeline import cli
    from tests.conftest import tiny_raw

    raw = tiny_raw(corpus_dir, tmp_path / "store")
    raw["model"].update(family="encoder-decoder", pos_encoding="t5")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert cli.main(["run", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.family encoder-decoder" in err[0]
