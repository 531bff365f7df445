"""Decoding: prompts from the config or a file, every sampling option, batches equal single prompts, beam search,
learned tables that fit long prompts, and the completion's log-likelihood under the model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from model import (
    ModelConfig,
    build_model,
    load_model,
    save_model,
    state_dict_for_save,
)
from model.generation import SamplingOptions
from pipeline.completion import complete, completion_logprobs
from pipeline.config import parse_config
from pipeline.errors import ConfigError
from pipeline.stages.decode import _section, decode_samples, read_prompts, write_samples
from tests.conftest import WORDS, tiny_raw
from tokenization.bpe import load_tokenizer, train_bpe


def make_model_dir(root: Path, pos: str = "learned", *, special_tokens: list[str] | None = None, **kw) -> Path:
    """A train-stage-like folder: a tiny BPE (with <|endoftext|>) and a tiny random model (a GPT unless `kw` names
    another family) with sharp weights."""
    rng = random.Random(0)
    tok = train_bpe([" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(50)], vocab_size=300,
                    special_tokens=special_tokens)
    root.mkdir(parents=True, exist_ok=True)
    tok.save(str(root / "tokenizer.json"))
    torch.manual_seed(0)
    model = build_model(ModelConfig(**{"vocab_size": tok.get_vocab_size(), "n_layer": 2, "n_head": 2, "d_model": 32,
                                       "max_seq_len": 32, "pos_encoding": pos, **kw}))
    with torch.no_grad():  # sharper than the init, so greedy completions depend on the prompt
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    save_model(root, state_dict_for_save(model), model.config, step=0)
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model"), "alibi")


def _loaded(model_dir: Path):
    return load_model(model_dir)[0], load_tokenizer(model_dir / "tokenizer.json")


def test_one_row_per_prompt_and_sample_with_the_sampling_parameters(model_dir):
    opts = SamplingOptions(max_new_tokens=6, temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.2,
                           num_samples=3, seed=1, batch_size=4)
    rows = decode_samples(str(model_dir), prompts=["the king", "a fool"], opts=opts, eos_token="<|endoftext|>")
    assert [(r["prompt"], r["sample"]) for r in rows] == [("the king", 0), ("the king", 1), ("the king", 2),
                                                          ("a fool", 0), ("a fool", 1), ("a fool", 2)]
    assert all(r["top_k"] == 20 and r["top_p"] == 0.9 and r["repetition_penalty"] == 1.2 and r["num_beams"] == 1 for r in rows)
    assert all(1 <= r["new_tokens"] <= 6 and r["log_likelihood"] < 0 and r["tokens_per_s"] > 0 for r in rows)
    assert len({r["completion"] for r in rows}) > 1
    again = decode_samples(str(model_dir), prompts=["the king", "a fool"], opts=opts, eos_token="<|endoftext|>")
    assert [r["completion"] for r in again] == [r["completion"] for r in rows]  # seeded


def test_greedy_batch_equals_each_prompt_alone(model_dir):
    model, tok = _loaded(model_dir)
    opts = SamplingOptions(max_new_tokens=8, temperature=0.0, batch_size=8)
    prompts = ["the king and the queen of a castle", "night", "ladies read letters"]
    together = [r["completion"] for r in complete(model, tok, prompts, opts)]
    assert together == [complete(model, tok, [p], opts)[0]["completion"] for p in prompts]
    assert len(set(together)) == 3


def test_log_likelihood_is_the_teacher_forced_sum_of_log_probabilities(model_dir):
    model, _ = _loaded(model_dir)
    prompts, completions = [[5, 17, 3, 42], [7, 2]], [[8, 1, 9], [11, 12, 13, 14, 15]]
    batched = completion_logprobs(model, prompts, completions)
    for p, c, got in zip(prompts, completions, batched):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p + c])), dim=-1)[0]  # (T, vocab)
        want = sum(float(logp[len(p) - 1 + i, t]) for i, t in enumerate(c))
        assert got == pytest.approx(want, abs=1e-4)
    assert completion_logprobs(model, [[1, 2]], [[]]) == [0.0]


def test_beam_search_returns_the_best_beams_first(model_dir):
    model, tok = _loaded(model_dir)
    opts = SamplingOptions(max_new_tokens=5, num_beams=4, num_samples=3, length_penalty=0.0)
    rows = complete(model, tok, ["the king", "a"], opts, eos_token="<none>")  # no stop token: every beam is 5 long
    assert [(r["prompt"], r["sample"]) for r in rows][:3] == [("the king", 0), ("the king", 1), ("the king", 2)]
    lls = [r["log_likelihood"] for r in rows[:3]]
    assert lls == sorted(lls, reverse=True) and len(set(lls)) == 3  # length_penalty 0: score = log-likelihood
    greedy = complete(model, tok, ["the king"], SamplingOptions(max_new_tokens=5, temperature=0.0), eos_token="<none>")
    assert lls[0] >= greedy[0]["log_likelihood"] - 1e-4


def test_learned_table_keeps_the_end_of_a_long_prompt(tmp_path):
    model, tok = _loaded(make_model_dir(tmp_path / "m", "learned"))
    long_prompt = " ".join(WORDS * 3)  # far more than the table of 32 positions
    rows = complete(model, tok, [long_prompt, "a"], SamplingOptions(max_new_tokens=12, temperature=0.0), eos_token="<none>")
    assert [r["new_tokens"] for r in rows] == [12, 12]


def test_prompts_from_a_jsonl_or_text_file_and_their_content_in_the_fingerprint(corpus_dir, tmp_path):
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(json.dumps("KING:\n") + "\n" + json.dumps({"prompt": "FOOL:\nNay"}) + "\n\n")
    cfg = parse_config(tiny_raw(corpus_dir, tmp_path / "a", decode={"prompts_file": str(jsonl)}))
    assert read_prompts(cfg.decode) == ["KING:\n", "FOOL:\nNay"]
    before = _section(cfg)
    jsonl.write_text(json.dumps("QUEEN:\n") + "\n")
    assert _section(cfg) != before  # edited prompts rerun decode
    txt = tmp_path / "prompts.txt"
    txt.write_text("the king\n\na fool\n")
    assert read_prompts(parse_config(tiny_raw(corpus_dir, tmp_path / "a", decode={"prompts_file": str(txt)})).decode) == [
        "the king", "a fool"]


@pytest.mark.parametrize("content, message", [(None, "not found"), ('{"text": 1}\n', "prompts.jsonl:1: expected"),
                                              ("[1,\n", "invalid JSON"), ("\n\n", "holds no prompts")])
def test_bad_prompts_file_is_a_config_error_naming_it(corpus_dir, tmp_path, content, message):
    path = tmp_path / "prompts.jsonl"
    if content is not None:
        path.write_text(content)
    cfg = parse_config(tiny_raw(corpus_dir, tmp_path / "a", decode={"prompts_file": str(path)}))
    with pytest.raises(ConfigError, match=message):
        read_prompts(cfg.decode)


def test_more_samples_than_beams_is_a_config_error(corpus_dir, tmp_path):
    with pytest.raises(ConfigError, match="decode.num_samples"):
        parse_config(tiny_raw(corpus_dir, tmp_path / "a", decode={"num_beams": 2, "num_samples": 3}))


def test_samples_files(model_dir, tmp_path):
    rows = decode_samples(str(model_dir), prompts=["KING:\n"], opts=SamplingOptions(max_new_tokens=4, num_samples=2),
                          eos_token="<|endoftext|>")
    jsonl, md = write_samples(rows, tmp_path)
    assert [json.loads(line) for line in jsonl.read_text().splitlines()] == rows
    assert md.read_text().count("## prompt 'KING:\\n'") == 2


@pytest.mark.parametrize("eos", ["<|endoftext|>", "<none>"])  # rows that stop early, and rows that run to the budget
def test_sampled_completions_do_not_depend_on_the_batch_size(model_dir, eos):
    model, tok = _loaded(model_dir)
    prompts = ["the king and the queen of a castle", "night", "ladies read letters", "a fool"]

    def rows(batch_size: int) -> list[tuple]:
        opts = SamplingOptions(max_new_tokens=10, temperature=1.2, top_k=None, num_samples=3, seed=7,
                               batch_size=batch_size)
        return [(r["prompt"], r["sample"], r["completion"], r["new_tokens"], r["log_likelihood"])
                for r in complete(model, tok, prompts, opts, eos_token=eos)]

    one = rows(1)
    assert len({r[2] for r in one}) > 6  # really sampled: the 12 rows are mostly different completions
    for batch_size in (3, 16):
        other = rows(batch_size)
        assert [r[:4] for r in other] == [r[:4] for r in one]
        assert [r[4] for r in other] == pytest.approx([r[4] for r in one], rel=1e-6)  # float sums: padding differs
