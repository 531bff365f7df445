"""The encoder-decoder family (T5): relative position buckets, the model's shapes, logits and generated tokens
equal to transformers' T5, and decoding that runs the encoder and the cross-attention projections once."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from model import EncoderDecoder, ModelConfig, export_hf, import_hf, param_count
from model.generation import beam_search, generate_batch
from model.seq2seq import CrossAttention, conditioned, relative_buckets
from tokenization.spans import SpanCorrupter, SpanOptions


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


# --- span corruption ------------------------------------------------------------------

def corrupter(**kw) -> SpanCorrupter:
    return SpanCorrupter(SpanOptions(**kw), sentinel_ids=tuple(range(200, 232)), eos_id=0, start_id=1, seed=3)


def restore(src: np.ndarray, tgt: np.ndarray) -> list[int]:
    """The window back from a source and its target: each sentinel in the source replaced by its span."""
    spans, current = {}, None
    for t in tgt[:-1].tolist():  # the target: sentinel, span tokens, sentinel, ..., eos
        if t >= 200:
            current = spans.setdefault(t, [])
        else:
            current.append(t)
    return [x for t in src[:-1].tolist() for x in (spans[t] if t >= 200 else [t])]


@pytest.mark.parametrize("L", [2, 16, 128, 509])
def test_a_source_and_its_target_hold_the_window_exactly_with_lengths_from_the_window_length(L):
    c = corrupter()
    tokens = np.random.default_rng(L).integers(2, 190, (3, L))
    src, tgt_in, tgt = c.model_inputs(tokens, np.array([4, 9, 11]), draw=2)
    assert (src.shape[1], tgt.shape[1]) == c.opts.lengths(L)
    assert (src[:, -1] == 0).all() and (tgt[:, -1] == 0).all() and (tgt_in[:, 0] == 1).all()
    assert np.array_equal(tgt_in[:, 1:], tgt[:, :-1])
    for row in range(3):
        assert restore(src[row], tgt[row]) == tokens[row].tolist()
    noise, spans = c.opts.shape(L)
    assert (tgt >= 200).sum(axis=1).tolist() == [spans] * 3 and tgt.shape[1] - spans - 1 == noise


def test_span_corruption_drops_the_noise_density_in_spans_of_the_mean_length_and_redraws_per_draw():
    c = corrupter()
    masks = np.stack([c.noise_mask(128, w, 1) for w in range(300)])
    assert masks.sum(axis=1).tolist() == [19] * 300  # round(128 x 0.15)
    starts = (masks[:, 1:] & ~masks[:, :-1]).sum() + masks[:, 0].sum()
    assert starts == 300 * 6  # round(19 / 3) spans per window
    assert np.array_equal(c.noise_mask(128, 7, 1), masks[7])  # a pure function of (seed, draw, window)
    assert not np.array_equal(c.noise_mask(128, 7, 2), masks[7])
    assert corrupter(dynamic=False).draw_for(9) == 0 and c.draw_for(9) == 10


def test_a_window_with_more_spans_than_sentinels_is_refused_naming_the_key():
    c = SpanCorrupter(SpanOptions(), sentinel_ids=(200, 201), eos_id=0, start_id=1, seed=0)
    with pytest.raises(ValueError, match="tokenizer.sentinels"):
        c.model_inputs(np.zeros((1, 128), np.int64), np.array([0]), draw=0)


# --- the pipeline ------------------------------------------------------------------------

def raw_t5(corpus_dir, root, **train) -> dict:
    from tests.conftest import tiny_raw

    raw = tiny_raw(corpus_dir, root, train={"max_failures": 0, **train})
    raw["tokenizer"]["sentinels"] = 8
    raw["model"].update(family="encoder-decoder", pos_encoding="t5", norm="rmsnorm", bias=False, mlp="relu",
                        scale_attention=False, n_decoder_layer=2)
    raw["decode"] = {"prompts": ["KING:\nThe king<|sentinel_0|> the queen."], "max_new_tokens": 6, "temperature": 0.0,
                     "num_beams": 2}
    return raw


@pytest.mark.parametrize("change, key", [
    (lambda r: r["tokenizer"].update(sentinels=1), "tokenizer.sentinels"),  # 32 tokens: 2 spans
    (lambda r: r["train"].update(objective="masked_lm"), "train.objective masked_lm needs model.family encoder"),
    (lambda r: r["decode"].update(retrieve=2), "decode.retrieve needs a decoder"),
    (lambda r: r["model"].update(pos_encoding="rope"), "pos_encoding"),
    (lambda r: r["data"].update(format="prompt_completion") or r["train"].update(objective="span_corruption"),
     "an encoder-decoder trains seq2seq on prompt_completion records and span_corruption on text"),
    (lambda r: r["data"].update(format="chat"), "data.format chat"),
    (lambda r: r["train"].update(objective="seq2seq"), "train.objective seq2seq with data.format text"),
])
def test_what_an_encoder_decoder_cannot_do_is_one_line_before_any_work(change, key, corpus_dir, tmp_path, capsys):
    from tests.conftest import refused_before_any_work

    raw = raw_t5(corpus_dir, tmp_path / "store")
    change(raw)
    assert key in refused_before_any_work(raw, tmp_path, capsys)


def test_sentinels_enter_the_tokenizer_fingerprint_only_when_asked_for(tiny_config):
    from pipeline.stages.tokenizer import STAGE, special_tokens

    plain, with_sentinels = tiny_config(), tiny_config(tokenizer={"sentinels": 3})
    assert "sentinels" not in STAGE.section(plain)["tokenizer"]
    assert STAGE.section(with_sentinels)["tokenizer"]["sentinels"] == 3
    assert special_tokens(with_sentinels)[-3:] == ["<|sentinel_0|>", "<|sentinel_1|>", "<|sentinel_2|>"]


@pytest.mark.slow
def test_span_corruption_trains_evaluates_answers_and_exports_to_transformers(corpus_dir, tmp_path, tracking_uri,
                                                                               ray_local, capsys):
    from transformers import T5ForConditionalGeneration

    from model import load_model
    from pipeline import cli
    from tokenization.bpe import load_tokenizer

    raw = raw_t5(corpus_dir, tmp_path / "store", steps=8, checkpoint_every=4, zero_stage=2, lr=3e-3)
    (tmp_path / "t5.yaml").write_text(yaml.safe_dump(raw))
    assert cli.main(["run", str(tmp_path / "t5.yaml")]) == 0
    assert "validation span loss" in capsys.readouterr().out
    store = tmp_path / "store"
    committed = {stage: next(p for p in (store / stage).iterdir() if (p / "_COMPLETE.json").exists())
                 for stage in ("train", "evaluate", "decode")}
    result = json.loads((committed["evaluate"] / "eval.json").read_text())
    m = result["metrics"]
    assert 0 < m["span_loss"] < np.log(300) and m["span_tokens"] > 20
    assert [r["supported"] for r in result["lengths"]] == [True, True, True]  # relative positions: any length
    (row,) = [json.loads(line) for line in (committed["decode"] / "samples.jsonl").read_text().splitlines()]

    out = tmp_path / "hf"
    assert cli.main(["export-hf", str(committed["train"]), str(out)]) == 0
    theirs = T5ForConditionalGeneration.from_pretrained(out).eval()
    tok = load_tokenizer(committed["train"] / "tokenizer.json")
    src = torch.tensor([tok.encode(raw["decode"]["prompts"][0]).ids + [tok.token_to_id("<|endoftext|>")]])
    with torch.no_grad():
        beams = theirs.generate(input_ids=src, num_beams=2, max_new_tokens=6, do_sample=False, min_length=0)[0, 1:]
    shown = [t for t in beams.tolist() if t not in (tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|pad|>"))]
    assert tok.decode(shown, skip_special_tokens=False) == row["completion"]  # decode's beam search = transformers'
    ours, _ = load_model(committed["train"])
    assert type(ours).__name__ == "EncoderDecoder"


def test_a_record_becomes_a_pair_its_prompt_plus_eos_the_source_its_completion_the_target(tmp_path):
    from tokenization.pairs import TaskPairs
    from tokenization.shards import ShardWriter

    docs = [np.array([5, 6, 7, 8, 9, 0]), np.array([10, 11, 0]), np.array([12, 13])]
    masks = [np.array([0, 0, 0, 1, 1, 1]), np.array([0, 1, 1]), np.array([0, 0])]  # the last: no completion
    writer = ShardWriter(tmp_path / "train-00000.arrow", np.dtype(np.uint16), loss_mask=True)
    for doc, mask in zip(docs, masks):
        writer.add(doc, mask)
    writer.close()
    pairs = TaskPairs([tmp_path / "train-00000.arrow"], max_source=3, max_target=8, eos_id=0, start_id=1)
    assert len(pairs) == 2
    src, src_mask, tgt_in, tgt = pairs.batch(np.array([0, 1]))
    assert src.tolist() == [[5, 6, 0], [10, 0, 0]] and src_mask.tolist() == [[1, 1, 1], [1, 1, 0]]  # cut to 3 with EOS
    assert tgt.tolist() == [[8, 9, 0], [11, 0, -1]] and tgt_in.tolist() == [[1, 8, 9], [1, 11, 0]]


@pytest.mark.slow
def test_seq2seq_on_prompt_completion_records_trains_and_reports_exact_match(corpus_dir, tmp_path, tracking_uri,
                                                                             ray_local, capsys):
    from pipeline import cli

    records = tmp_path / "copy.jsonl"
    rng = np.random.default_rng(0)
    words = ["king", "queen", "fool", "lord", "lady"]
    records.write_text("".join(json.dumps({"prompt": "Repeat: " + " ".join(w) + "\n", "completion": " ".join(w)}) + "\n"
                               for w in (rng.choice(words, 3) for _ in range(200))))
    raw = raw_t5(corpus_dir, tmp_path / "store", steps=8, checkpoint_every=8)
    raw["data"] = {"inputs": [str(records)], "format": "prompt_completion", "val_fraction": 0.1, "shard_size_mb": 0.01}
    raw["tokenizer"]["sentinels"] = 0
    raw["decode"] = {"prompts": ["Repeat: king fool lady\n"], "max_new_tokens": 6, "temperature": 0.0}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    assert cli.main(["run", str(tmp_path / "s.yaml")]) == 0
    assert "exact match" in capsys.readouterr().out
    (ev,) = [p for p in (tmp_path / "store" / "evaluate").iterdir() if (p / "_COMPLETE.json").exists()]
    result = json.loads((ev / "eval.json").read_text())
    m = result["metrics"]
    assert m["pairs"] >= 5 and 0 <= m["exact_match"] <= 1 and 0 < m["seq2seq_loss"] < np.log(300)
    first = result["examples"][0]
    assert first["source"][-1] == first["target"][-1]  # both end in EOS
    (dec,) = [p for p in (tmp_path / "store" / "decode").iterdir() if (p / "_COMPLETE.json").exists()]
    assert "=> " in (dec / "samples.md").read_text()


@pytest.mark.slow
def test_a_small_encoder_decoder_learns_to_copy_its_source_to_99_percent_exact_match():
    """Six tokens in, the same six (then EOS) out: greedy answers on 200 unseen sources, a third of them with a
    token twice, which only positions tell apart. From GPT-2's
    N(0, 0.02) instead of T5's initialisation the unscaled attention stays at chance for hundreds of steps."""
    import math

    torch.manual_seed(0)
    model = EncoderDecoder(t5(vocab_size=20, n_layer=2, n_head=4, d_model=64, d_ff=128, rel_buckets=32,
                              rel_max_distance=32, max_seq_len=16))  # 32 buckets: every distance in 6 tokens exact
    steps = 1600
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    rng = np.random.default_rng(0)
    held_out = rng.integers(3, 20, (200, 6))
    for _ in range(steps):
        src = torch.from_numpy(rng.integers(3, 20, (64, 6)))
        tgt = torch.cat([src, torch.zeros(64, 1, dtype=torch.long)], 1)  # the source, then EOS (0)
        loss = model(src, torch.cat([torch.ones(64, 1, dtype=torch.long), tgt[:, :-1]], 1), tgt)  # start: 1
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    answers = generate_batch(conditioned(model.eval(), held_out.tolist()), [[1]] * 200, max_new_tokens=7,
                             temperature=0.0, stop_tokens={0})
    exact = np.mean([a == [*s.tolist(), 0] for a, s in zip(answers, held_out)])
    assert exact >= 0.99, exact


@pytest.mark.slow
def test_a_span_corruption_run_resumed_from_a_checkpoint_trains_exactly_as_an_uninterrupted_one(tmp_path):
    from pipeline.schema import TrainConfig
    from tests.test_packing import _shard
    from tests.test_training import resumed_equals_uninterrupted

    path = _shard(tmp_path, lengths=tuple(range(3, 40)))  # tokens 2..63, documents ending in EOS (1)
    config = {"model": t5(vocab_size=80, max_seq_len=16).to_dict(),
              "train": TrainConfig(steps=4, global_batch_size=4, micro_batch_size=2, warmup_steps=1, checkpoint_every=2,
                                   log_every=1, zero_stage=1, lr=1e-2).model_dump(mode="json"),
              "seq_len": 16, "train_shards": [path],
              "objective": {"kind": "span_corruption", "sentinel_ids": list(range(64, 80)), "eos_id": 1, "start_id": 0}}
    assert "dec_bias.table.weight" in resumed_equals_uninterrupted(config, tmp_path)


def test_a_given_tokenizer_with_too_few_sentinels_is_a_config_error_naming_the_key(corpus_dir, tmp_path):
    from pipeline.config import parse_config
    from pipeline.errors import ConfigError
    from pipeline.objectives import objective_ids
    from tokenization.bpe import train_bpe

    tok = train_bpe(["the king and the queen"] * 20, vocab_size=270,
                    special_tokens=["<|endoftext|>", "<|pad|>", "<|sentinel_0|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    raw = raw_t5(corpus_dir, tmp_path / "store")
    raw["tokenizer"] = {"path": str(tmp_path / "tokenizer.json")}
    with pytest.raises(ConfigError, match=r"2 spans but the tokenizer .* has 1 sentinel tokens \(tokenizer.sentinels\)"):
        objective_ids(parse_config(raw), tmp_path / "tokenizer.json")
