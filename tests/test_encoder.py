"""The encoder family (BERT, RoBERTa): bidirectional attention, post-norm, the masked-LM head and objective,
Hugging Face interchange, fill-mask, and a masked-LM run through train, evaluate and decode."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from model import GPT, ModelConfig, export_hf, import_hf, param_count
from model.fill_mask import fill_mask
from model.gpt import AttentionInputs
from pipeline import cli
from tests.conftest import refused_before_any_work, tiny_raw
from tokenization.masking import Masker, MaskingOptions


def encoder(**kw) -> ModelConfig:
    base = dict(vocab_size=300, family="encoder", norm_position="post", n_layer=2, n_head=4, d_model=64,
                max_seq_len=32, norm_eps=1e-12)
    return ModelConfig(**{**base, **kw})


def perturbed(cfg: ModelConfig, seed: int = 0) -> GPT:
    """A model whose every parameter (norm gains and biases too) is off its initial value."""
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


# --- the model ------------------------------------------------------------------

@pytest.mark.parametrize("family", ["decoder", "encoder"])
def test_an_encoder_sees_later_tokens_and_a_decoder_does_not(family):
    model = perturbed(encoder(family=family, norm_position="pre"))
    x = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % 300  # only the last token differs
    with torch.no_grad():
        early = (model(x)[0, :-1] - model(y)[0, :-1]).abs().max()
    assert (early > 1e-4) if family == "encoder" else (early == 0)


@pytest.mark.parametrize("kw", [dict(), dict(norm_position="pre"), dict(bias=False, norm="rmsnorm", mlp="swiglu"),
                                dict(tie_embeddings=False), dict(family="decoder")])
def test_param_count_from_the_config_equals_the_built_models(kw):
    cfg = encoder(**kw)
    assert param_count(cfg) == GPT(cfg).num_params


def test_post_norm_normalises_after_each_residual_addition():
    cfg = encoder(n_layer=1, dropout=0.0)
    model = perturbed(cfg)
    x = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        block, h = model.blocks[0], model.drop(model.ln_emb(model.tok_emb(x) + model.pos_emb.weight[:10]))
        inputs = AttentionInputs(mask=None, is_causal=False, rope=None, kv_cache=None)  # learned positions, no padding
        a = block.ln_1(h + block.attn(h, inputs))
        expected = block.ln_2(a + block.mlp(a))
        assert torch.allclose(model.hidden_states(x), expected, atol=1e-6)
    assert model.ln_f is None and model.ln_emb is not None


@pytest.mark.parametrize("pos_encoding", ["learned", "rope", "alibi"])
def test_padding_anywhere_leaves_an_encoders_real_positions_unchanged(pos_encoding):
    model = perturbed(encoder(pos_encoding=pos_encoding))
    x = torch.randint(3, 300, (1, 9), generator=torch.Generator().manual_seed(2))
    padded = torch.cat([x, torch.ones(1, 5, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 5)], dim=1).long()
    with torch.no_grad():
        assert torch.allclose(model(x), model(padded, attention_mask=mask)[:, :9], atol=1e-5)


def test_an_encoder_refuses_a_kv_cache():
    from model import KVCache

    model = GPT(encoder())
    with pytest.raises(AssertionError, match="attends both ways"):
        model(torch.zeros(1, 3, dtype=torch.long), kv_cache=KVCache.for_model(model, batch_size=1, max_len=8))


# --- Hugging Face interchange ---------------------------------------------------------

@pytest.mark.parametrize("encoder_type", ["bert", "roberta"])
@pytest.mark.parametrize("tie", [True, False])
def test_exported_encoder_logits_equal_transformers(encoder_type, tie, tmp_path):
    from transformers import AutoModelForMaskedLM

    model = perturbed(encoder(tie_embeddings=tie))
    export_hf(model, tmp_path, encoder_type=encoder_type, pad_token_id=1)
    theirs = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert type(theirs).__name__ == ("BertForMaskedLM" if encoder_type == "bert" else "RobertaForMaskedLM")
    x = torch.randint(3, 300, (3, 20), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(x)
    mask[1, 14:] = 0
    x = x.masked_fill(mask == 0, 1)  # RoBERTa numbers positions by where the pad token is not
    with torch.no_grad():
        ours, hf = model(x, attention_mask=mask), theirs(input_ids=x, attention_mask=mask).logits
        real = mask.bool()
        assert (ours - hf)[real].abs().max() <= 1e-4
        back = import_hf(tmp_path)
        assert back.config == model.config
        assert (back(x, attention_mask=mask) - ours)[real].abs().max() <= 1e-5


def test_a_transformers_bert_with_token_type_embeddings_imports_with_equal_logits(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    theirs = BertForMaskedLM(BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, max_position_embeddings=40)).eval()
    with torch.no_grad():
        theirs.bert.embeddings.token_type_embeddings.weight.normal_()  # type 0 is not zero: folded into positions
    theirs.save_pretrained(tmp_path)
    ours = import_hf(tmp_path)
    x = torch.randint(0, 200, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (ours(x) - theirs(input_ids=x).logits).abs().max() <= 1e-4


def test_a_pre_norm_encoder_has_no_hugging_face_family():
    with pytest.raises(ValueError, match="norm_position"):
        export_hf(GPT(encoder(norm_position="pre")), "/nonexistent")


# --- masking ------------------------------------------------------------------------

def masker(**kw) -> Masker:
    return Masker(MaskingOptions(**kw), mask_id=2, special_ids=(0, 1, 2), vocab_size=300, seed=7)


def test_masks_are_a_pure_function_of_seed_draw_and_window_and_dynamic_ones_change_per_draw():
    tokens = np.random.default_rng(0).integers(3, 300, (4, 64))
    m = masker()
    a, b = m.apply(tokens, np.arange(4), draw=5), m.apply(tokens, np.arange(4), draw=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    c = m.apply(tokens, np.arange(4), draw=6)
    assert not np.array_equal(a[1], c[1])  # RoBERTa's dynamic masking: a fresh mask each draw
    rows = m.apply(tokens[2:3], np.array([2]), draw=5)  # a window's mask does not depend on its batch
    assert np.array_equal(rows[0][0], a[0][2]) and np.array_equal(rows[1][0], a[1][2])
    assert masker(dynamic=False).draw_for(10) == masker(dynamic=False).draw_for(0) == 0
    assert masker().draw_for(10) == 11


def test_masking_chooses_the_rate_splits_80_10_10_and_never_touches_special_tokens():
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, 300, (200, 128))
    tokens[:, ::16] = 0  # document separators
    inputs, targets = masker().apply(tokens, np.arange(200), draw=1)
    chosen = targets >= 0
    assert abs(chosen.mean() - 0.15 * 15 / 16) < 0.01
    assert not chosen[:, ::16].any() and (inputs[:, ::16] == 0).all()
    assert np.array_equal(targets[chosen], tokens[chosen]) and (targets[~chosen] == -1).all()
    assert np.array_equal(inputs[~chosen], tokens[~chosen])
    masked, kept = (inputs[chosen] == 2).mean(), (inputs[chosen] == tokens[chosen]).mean()
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.02  # the rest: a random token (rarely the same one)
    assert not np.isin(inputs[chosen & (inputs != 2)], [0, 1]).any()  # never a special token as the random one


def test_a_short_window_still_predicts_one_token():
    inputs, targets = masker(rate=0.01).apply(np.array([[0, 5, 6]]), np.array([0]), draw=0)
    assert (targets >= 0).sum() == 1 and targets[0, 0] == -1


@pytest.mark.parametrize("kw, key", [(dict(rate=0.0), "rate"), (dict(mask_fraction=0.9, random_fraction=0.2), "mask_fraction")])
def test_masking_options_are_checked(kw, key):
    with pytest.raises(ValueError, match=key):
        MaskingOptions(**kw)


def test_masked_lm_learns_what_the_context_says_beyond_the_unigram_baseline():
    """Windows of doubled tokens (a a b b ...): the unigram baseline is ln(97); the masked copy's twin tells it."""
    torch.manual_seed(0)
    model = GPT(encoder(vocab_size=100, pos_encoding="rope", n_layer=2, d_model=64, max_seq_len=32))
    m = Masker(MaskingOptions(), mask_id=2, special_ids=(0, 1, 2), vocab_size=100, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    rng = np.random.default_rng(0)
    for step in range(200):
        inputs, targets = m.apply(np.repeat(rng.integers(3, 100, (32, 16)), 2, axis=1), np.arange(32) + 32 * step,
                                  draw=step)
        loss = model(torch.from_numpy(inputs), torch.from_numpy(targets))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * np.log(97), loss.item()


# --- fill-mask --------------------------------------------------------------------

def test_fill_mask_gives_top_k_per_mask_in_order_with_probabilities_of_the_full_forward():
    model = perturbed(encoder())
    prompts = [[5, 2, 7, 8, 2], [9, 2]]
    out = fill_mask(model, prompts, mask_id=2, top_k=3)
    assert [len(p) for p in out] == [2, 1] and all(len(at) == 3 for p in out for at in p)
    with torch.no_grad():
        probs = model(torch.tensor([prompts[0]]))[0].softmax(-1)
    for at, pos in zip(out[0], (1, 4)):
        assert [c.token_id for c in at] == probs[pos].topk(3).indices.tolist()
        assert at[0].prob == pytest.approx(float(probs[pos].max()), abs=1e-5)


# --- config -------------------------------------------------------------------------

def raw_encoder(corpus_dir: Path, root: Path, **train) -> dict:
    raw = tiny_raw(corpus_dir, root, train={"max_failures": 0, **train})
    raw["tokenizer"]["special_tokens"] = ["<|endoftext|>", "<|pad|>", "<|mask|>"]
    raw["model"].update(family="encoder", norm_position="post")
    raw["decode"] = {"prompts": ["KING:\nThe <|mask|> and the queen."], "top_k": 3}
    return raw


@pytest.mark.parametrize("change, key", [
    (lambda r: r["train"].update(objective="causal_lm"), "train.objective causal_lm needs model.family decoder"),
    (lambda r: r["tokenizer"].update(special_tokens=["<|endoftext|>", "<|pad|>"]), "train.masking.mask_token"),
    (lambda r: r.update(tasks={"suite": [{"name": "t", "path": "t.jsonl", "kind": "cloze"}]}), "tasks needs a decoder"),
    (lambda r: r["train"].update(packing="documents"), "train.packing: documents needs a decoder"),
    (lambda r: (r["model"].update(family="decoder"), r["train"].update(objective="masked_lm")),
     "train.objective masked_lm needs model.family encoder"),
    (lambda r: r["decode"].update(num_beams=4), "decode.num_beams 4: an encoder fills masks in one forward pass"),
    (lambda r: r["decode"].update(prompts=["KING:\n"]), "decode.prompts[0] has no <|mask|>"),
])
def test_what_an_encoder_cannot_do_is_one_line_before_any_work(change, key, corpus_dir, tmp_path, capsys):
    raw = raw_encoder(corpus_dir, tmp_path / "store")
    change(raw)
    assert key in refused_before_any_work(raw, tmp_path, capsys)


def test_a_decoders_train_fingerprint_holds_no_family_objective_or_masking(tiny_config):
    from pipeline.stages.train.hardware import TrainHardware
    from pipeline.stages.train.stage import section_for

    hw = TrainHardware(device="cpu", precision="fp32")
    section = section_for(tiny_config(), hw)
    assert not {"family", "norm_position"} & set(section["model"])
    assert not {"objective", "masking"} & set(section["train"])
    assert section_for(tiny_config(train={"objective": "causal_lm"}), hw) == section


def test_an_encoders_train_fingerprint_holds_its_masking(corpus_dir, tmp_path):
    from pipeline.config import parse_config
    from pipeline.stages.train.hardware import TrainHardware
    from pipeline.stages.train.stage import section_for

    hw = TrainHardware(device="cpu", precision="fp32")
    a = section_for(parse_config(raw_encoder(corpus_dir, tmp_path)), hw)
    b = section_for(parse_config(raw_encoder(corpus_dir, tmp_path, masking={"rate": 0.3})), hw)
    assert a["model"]["family"] == "encoder" and a["train"]["masking"]["rate"] == 0.15 and a != b


# --- through the stages ----------------------------------------------------------------

@pytest.mark.slow
def test_masked_lm_trains_evaluates_fills_masks_and_exports_to_transformers(corpus_dir, tmp_path, tracking_uri, ray_local,
                                                                          capsys):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    raw = raw_encoder(corpus_dir, tmp_path / "store", steps=8, checkpoint_every=4, zero_stage=3, lr=3e-3)
    raw["evaluate"]["context_multipliers"] = [0.5, 1.0, 2.0]
    (tmp_path / "bert.yaml").write_text(yaml.safe_dump(raw))
    assert cli.main(["run", str(tmp_path / "bert.yaml")]) == 0
    out = capsys.readouterr().out
    assert "validation masked loss" in out and "masked-token accuracy" in out

    store = tmp_path / "store"
    (ev,) = [p for p in (store / "evaluate").iterdir() if (p / "_COMPLETE.json").exists()]
    result = json.loads((ev / "eval.json").read_text())
    m = result["metrics"]
    assert 0 < m["mlm_loss"] < np.log(300) and 0 <= m["mlm_accuracy"] <= 1 and m["mlm_tokens"] > 50
    assert 0 < m["mlm_unigram_loss"] < np.log(300)  # the baseline, on the same targets
    assert [r["supported"] for r in result["lengths"]] == [True, True, False]  # a learned table stops at 32
    assert (ev / "masked_lm.png").stat().st_size > 0

    (dec,) = [p for p in (store / "decode").iterdir() if (p / "_COMPLETE.json").exists()]
    (row,) = [json.loads(line) for line in (dec / "samples.jsonl").read_text().splitlines()]
    assert "<|mask|>" not in row["completion"] and len(row["predictions"]) == 1 and len(row["predictions"][0]) == 3
    probs = [c["prob"] for c in row["predictions"][0]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6

    (train,) = [p for p in (store / "train").iterdir() if (p / "_COMPLETE.json").exists()]
    assert cli.main(["export-hf", str(train), str(tmp_path / "hf"), "--encoder-type", "roberta"]) == 0
    theirs = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.mask_token == "<|mask|>" and hf_tok.pad_token == "<|pad|>"
    from model import load_model

    ours, _ = load_model(train)
    x = torch.tensor([hf_tok("The king and the <|mask|> of a castle")["input_ids"]])
    with torch.no_grad():
        assert (ours(x) - theirs(input_ids=x).logits).abs().max() <= 1e-4

    assert cli.main(["generate", str(train), "--prompt", "The <|mask|> and the queen.", "--top-k", "2"]) == 0
    printed = capsys.readouterr().out
    assert "mask 1: " in printed and printed.count(", ") >= 1


@pytest.mark.slow
def test_a_masked_lm_run_resumed_from_a_checkpoint_trains_exactly_as_an_uninterrupted_one(tmp_path):
    """The per-worker loop (DeepSpeed over gloo, one process): 4 steps uninterrupted, then resumed from step 2:
    steps 3 and 4 draw the same masks and give bit-identical losses and weights."""
    from pipeline.schema import ModelSection, TrainConfig
    from tests.test_packing import _shard
    from tests.test_training import resumed_equals_uninterrupted

    path = _shard(tmp_path, lengths=tuple(range(3, 40)))  # tokens 2..63, documents ending in EOS (1)
    config = {"model": {**ModelSection(family="encoder", norm_position="post", n_layer=2, n_head=2, d_model=32,
                                       max_seq_len=16).model_config_fields(), "vocab_size": 64},
              "train": TrainConfig(steps=4, global_batch_size=4, micro_batch_size=2, warmup_steps=1, checkpoint_every=2,
                                   log_every=1, zero_stage=1, lr=1e-2).model_dump(mode="json"),
              "seq_len": 16, "train_shards": [path], "objective": {"kind": "masked_lm", "mask_id": 0, "special_ids": [0, 1]}}
    assert "mlm_head.dense.weight" in resumed_equals_uninterrupted(config, tmp_path)
