"""Parity: our task accuracy equals lm-evaluation-harness's on the exported Hugging Face folder, record by record.

A tiny random GPT-2-style model and its BPE are exported with `export_hf`; the same JSONL files are scored by
`model.tasks` and by `lm_eval.simple_evaluate(model="hf", ...)` with task YAMLs written here (HellaSwag-like and
ARC-like multiple choice, a LAMBADA-like cloze). Fully offline: the datasets are local JSON files, the model a
local folder. Some contexts are longer than the model's context, so lm_eval's left truncation is compared too;
half the cloze targets are the word the model writes greedily, so the cloze accuracy is neither 0 nor 1.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch

from model import GPT, ModelConfig, export_hf, generate
from model.tasks import read_questions, score_task
from tests.conftest import WORDS
from tokenization.bpe import train_bpe

pytestmark = pytest.mark.slow  # imports lm_eval and transformers (about 15 s)

N = 24


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def greedy_cloze(model: GPT, tok, rng: random.Random) -> str:
    """A cloze text whose last word is the model's greedy next token (a target it gets right): contexts are drawn
    until the greedy token after one is a space and a word."""
    for _ in range(200):
        context = _words(rng, rng.randint(2, 6))
        ids = tok.encode(context).ids
        (new,) = generate(model, ids, max_new_tokens=1, temperature=0.0)[0]
        piece = tok.decode([new])
        if re.fullmatch(r" [a-z]+", piece) and tok.encode(context + piece).ids == [*ids, new]:
            return context + piece
    raise AssertionError("no context makes the model write a word greedily")


def task_files(root: Path, model: GPT, tok) -> dict[str, Path]:
    rng = random.Random(3)
    mc, arc, cloze = [], [], []
    for i in range(N):
        ctx_len = 40 if i % 6 == 0 else rng.randint(3, 10)  # every sixth is past the model's 32 tokens
        k = rng.choice([2, 3, 4])
        mc.append({"ctx": _words(rng, ctx_len) + ("," if i % 4 == 1 else "") + (" " if i % 5 == 2 else ""),
                   "endings": [_words(rng, rng.randint(1, 4)) + rng.choice(["", ".", "!"]) for _ in range(k)],
                   "label": rng.randrange(k)})
        arc.append({"question": _words(rng, rng.randint(3, 8)) + "?",
                    "choices": {"text": [_words(rng, rng.randint(1, 3)) for _ in range(4)], "label": list("ABCD")},
                    "answerKey": rng.choice("ABCD")})
        cloze.append({"text": greedy_cloze(model, tok, rng) if i % 2 else _words(rng, 45 if i % 7 == 0 else rng.randint(2, 10))})
    out = {}
    for name, records in (("mc", mc), ("arc", arc), ("cloze", cloze)):
        out[name] = root / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return out


def lm_eval_yamls(root: Path, files: dict[str, Path], cache: Path) -> None:
    common = {"dataset_path": "json", "test_split": "train", "output_type": "multiple_choice"}
    specs = {
        "parity_mc": {**common, "doc_to_text": "{{ctx}}", "doc_to_choice": "{{endings}}", "doc_to_target": "{{label}}",
                      "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]},
        "parity_arc": {**common, "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_choice": "{{choices.text}}",
                       "doc_to_target": "{{choices.label.index(answerKey)}}",
                       "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]},
        "parity_cloze": {**common, "output_type": "loglikelihood", "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
                         "doc_to_target": "{{' '+text.split(' ')[-1]}}",
                         "metric_list": [{"metric": "acc"}, {"metric": "perplexity"}]},
    }
    for (task, spec), path in zip(specs.items(), files.values()):
        spec = {"task": task, **spec, "dataset_kwargs": {"data_files": str(path), "cache_dir": str(cache)}}
        (root / f"{task}.yaml").write_text(json.dumps(spec), encoding="utf-8")  # JSON is YAML


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[GPT, object, Path]:
    root = tmp_path_factory.mktemp("parity")
    rng = random.Random(0)
    texts = [_words(rng, 40) + rng.choice([".", ",", "!", "?"]) for _ in range(60)]
    tok = train_bpe(texts, vocab_size=300)
    tok.save(str(root / "tokenizer.json"))
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, d_model=32, max_seq_len=32,
                            pos_encoding="learned", norm="layernorm", mlp="gelu_tanh", bias=True))
    with torch.no_grad():  # sharper than the init, so the choices' log-likelihoods are far apart
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    model.eval()
    folder = export_hf(model, root / "hf", tokenizer=root / "tokenizer.json",
                       eos_token_id=tok.token_to_id("<|endoftext|>"))
    return model, tok, folder


def test_accuracy_equals_lm_eval_on_the_exported_model_record_by_record(exported, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model, tok, folder = exported
    files = task_files(tmp_path, model, tok)
    lm_eval_yamls(tmp_path, files, tmp_path / "hf-datasets")
    out = simple_evaluate(model="hf", model_args=f"pretrained={folder},tokenizer={folder},dtype=float32",
                          tasks=["parity_mc", "parity_arc", "parity_cloze"], device="cpu", batch_size=8,
                          task_manager=TaskManager(include_path=str(tmp_path)), bootstrap_iters=10, log_samples=True)

    def encode(text: str) -> list[int]:
        return tok.encode(text).ids

    for name, task in (("mc", "parity_mc"), ("arc", "parity_arc"), ("cloze", "parity_cloze")):
        kind = "cloze" if name == "cloze" else "multiple_choice"
        ours = score_task(model, encode, read_questions(files[name].read_text().splitlines(), kind, source=name), kind,
                          batch_size=5)
        theirs = out["results"][task]
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        assert len(samples) == N
        assert [r["acc"] for r in ours["records"]] == [float(s["acc"]) for s in samples]
        assert ours["metrics"]["acc"] == pytest.approx(theirs["acc,none"], abs=1e-12)
        assert ours["metrics"]["acc_stderr"] == pytest.approx(theirs["acc_stderr,none"], abs=1e-12)
        lls = [[ll for ll, _ in s["resps"][0]] if kind == "cloze" else [r[0][0] for r in s["resps"]] for s in samples]
        ours_lls = [[r["loglikelihood"]] if kind == "cloze" else r["loglikelihoods"] for r in ours["records"]]
        assert ours_lls == [pytest.approx(x, abs=1e-4) for x in lls]
        if kind == "multiple_choice":
            assert [r["acc_norm"] for r in ours["records"]] == [float(s["acc_norm"]) for s in samples]
            assert ours["metrics"]["acc_norm"] == pytest.approx(theirs["acc_norm,none"], abs=1e-12)
        else:
            assert ours["metrics"]["ppl"] == pytest.approx(theirs["perplexity,none"], rel=1e-4)
        assert 0 < ours["metrics"]["acc"] < 1  # neither all right nor all wrong: the comparison shows something
