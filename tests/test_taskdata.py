"""Task data for fine-tuning: prompt/completion and chat records, the loss mask column, zero gradient on prompt
tokens, masked evaluation, bad task records (file:line, or one counted skip each), and one real short run."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from model import GPT, ModelConfig
from tokenization.bpe import SPECIAL_TOKENS, train_bpe
from tokenization.corpus import tokenize_shard
from tokenization.dataset import TokenWindows
from tokenization.documents import DocOptions, documents
from tokenization.inputs import InputError, Piece
from tokenization.readers import SkipLog
from tokenization.shards import read_documents, read_loss_mask, read_tokens, write_shard
from tokenization.taskdata import CHAT_MARKERS, END

PAIRS = [{"prompt": f"Q: who says line {i}?\nA:", "completion": f" the {'king' if i % 2 else 'fool'}"} for i in range(40)]
CHATS = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"line {i}"},
                       {"role": "assistant", "content": f"speaker {i % 3}"}]} for i in range(40)]


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> str:
    texts = [r["prompt"] + r["completion"] for r in PAIRS] + ["be brief line speaker king fool"] * 5
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(texts, vocab_size=300, special_tokens=[*SPECIAL_TOKENS, *CHAT_MARKERS]).save(str(path))
    return str(path)


def _prepare(tmp_path: Path, tokenizer_path: str, file: Path, opts: DocOptions) -> dict:
    size = file.stat().st_size
    return tokenize_shard(0, [Piece(str(file), 0, size, size)], np.zeros(0, dtype=np.int64), tokenizer_path=tokenizer_path,
                          eos_token=SPECIAL_TOKENS[0], opts=opts, val_fraction=0.2, append_eos=True, out_dir=str(tmp_path))


def test_prompt_completion_shards_mask_exactly_the_completion_and_its_eos(tmp_path, tokenizer_path):
    from tokenization.bpe import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    out = _prepare(tmp_path, tokenizer_path, _jsonl(tmp_path / "pc.jsonl", PAIRS), DocOptions(format="prompt_completion"))
    path = tmp_path / out["train"]["file"]
    docs, masks = read_documents(path), read_loss_mask(path)
    assert len(masks) == len(read_tokens(path)) == sum(len(d) for d in docs)
    expected = {}
    for r in PAIRS:  # prompt and completion tokenized apart, then EOS
        p, c = tok.encode(r["prompt"]).ids, tok.encode(r["completion"]).ids
        expected[tuple(p + c + [tok.token_to_id(SPECIAL_TOKENS[0])])] = [0] * len(p) + [1] * (len(c) + 1)
    at = 0
    for d in docs:
        assert masks[at : at + len(d)].tolist() == expected[tuple(d.tolist())]
        at += len(d)
    assert out["train"]["docs"] + out["val"]["docs"] == len(PAIRS)


def test_chat_shards_mask_the_assistant_content_and_end_marker_only(tmp_path, tokenizer_path):
    from tokenization.bpe import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    out = _prepare(tmp_path, tokenizer_path, _jsonl(tmp_path / "chat.jsonl", CHATS), DocOptions(format="chat"))
    path = tmp_path / out["train"]["file"]
    doc, mask = read_documents(path)[0], read_loss_mask(path)[: len(read_documents(path)[0])]
    ids = {m: tok.token_to_id(m) for m in CHAT_MARKERS}
    assert doc[0] == ids["<|system|>"] and list(doc).count(ids[END]) == 3
    start = list(doc).index(ids["<|assistant|>"])
    assert mask[: start + 1].tolist() == [0] * (start + 1)  # everything up to the assistant marker is prompt
    assert mask[start + 1 :].tolist() == [1] * (len(doc) - start - 1)  # its content, <|end|> and EOS are learnt
    assert tok.decode(doc[start + 1 : -2].tolist()).startswith("speaker")


def test_text_shards_have_no_mask_column(tmp_path, tokenizer_path):
    out = _prepare(tmp_path, tokenizer_path, _jsonl(tmp_path / "t.jsonl", [{"text": "the king"}] * 3), DocOptions())
    assert read_loss_mask(tmp_path / out["train"]["file"]) is None


@pytest.mark.parametrize("fmt, record, reason, words", [
    ("prompt_completion", {"prompt": "a"}, "missing_field", "field 'completion' is missing"),
    ("prompt_completion", {"completion": "b"}, "missing_field", "field 'prompt' is missing"),
    ("prompt_completion", {"prompt": "a", "completion": ""}, "empty_completion", "nothing to learn"),
    ("chat", {"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "unknown_role", "messages[0] has role 'narrator'"),
    ("chat", {"messages": [{"role": "user", "content": "x"}]}, "no_assistant_turn", "no assistant turn"),
    ("chat", {"messages": "hello"}, "bad_message", "must be a non-empty list"),
])
def test_a_bad_task_record_names_file_and_line_or_is_one_counted_skip(tmp_path, fmt, record, reason, words):
    good = PAIRS[0] if fmt == "prompt_completion" else CHATS[0]
    f = _jsonl(tmp_path / "d.jsonl", [good, record, good])
    piece = Piece(str(f), 0, f.stat().st_size, f.stat().st_size)
    with pytest.raises(InputError) as e:
        list(documents([piece], DocOptions(format=fmt), SkipLog(), Counter()))
    assert str(e.value).startswith(f"{f}:2: ") and words in str(e.value) and "\n" not in str(e.value)
    log = SkipLog()
    assert len(list(documents([piece], DocOptions(format=fmt, on_error="skip"), log, Counter()))) == 2
    assert log.counts == Counter({reason: 1}) and log.records == [{"where": f"{f}:2", "reason": reason}]


def test_task_formats_refuse_text_files(tmp_path):
    f = tmp_path / "a.md"
    f.write_text("plain prose\n")
    with pytest.raises(InputError, match=r"a.md: data.format=chat reads JSON records"):
        list(documents([Piece(str(f), 0, 12, 12)], DocOptions(format="chat"), SkipLog(), Counter()))


def _masked_shard(tmp_path: Path) -> str:
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 64, size=n) for n in (9, 14, 21, 17, 30)]
    path = tmp_path / "train-00000.arrow"
    from tokenization.shards import ShardWriter

    w = ShardWriter(path, np.uint16, loss_mask=True)
    for d in docs:
        w.add(d, (np.arange(len(d)) >= len(d) // 2).astype(np.uint8))  # second half of each document is the completion
    w.close()
    return str(path)


def test_prompt_tokens_get_exactly_zero_gradient_and_do_not_change_the_loss(tmp_path):
    from pipeline.stages.train.metrics import forward_loss

    windows = TokenWindows([_masked_shard(tmp_path)], 16)
    idx = np.arange(len(windows))
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=16))
    logits = {}

    def keep(module, inputs, out):  # the logits, with their gradient kept
        out.retain_grad()
        logits["out"] = out

    hook = model.lm_head.register_forward_hook(keep)
    loss = forward_loss(model, windows, idx, torch.device("cpu"))
    loss.backward()
    hook.remove()
    grad = logits["out"].grad  # (B, T, vocab): d loss / d logits at each position
    mask = torch.from_numpy(windows.loss_mask(idx))
    assert 0 < mask.sum() < mask.numel()
    assert torch.count_nonzero(grad[~mask]) == 0  # a prompt target: exactly zero gradient
    assert (grad[mask].abs().sum(-1) > 0).all()
    batch = torch.from_numpy(windows.batch(idx))
    with torch.no_grad():  # the masked mean: equal to the loss over the masked-in targets alone
        per_token = torch.nn.functional.cross_entropy(model(batch[:, :-1]).transpose(1, 2), batch[:, 1:], reduction="none")
        assert torch.allclose(loss, per_token[mask].mean())
    # A prompt target that is no input of the window (its last target): changing it leaves the loss as it was.
    last = [i for i in idx if windows.masks[0][16 * (i + 1)] == 0]
    assert last
    windows.buffers[0] = windows.buffers[0].copy()
    with torch.no_grad():
        for i in last:  # one window at a time: that token is the next window's first input
            before = forward_loss(model, windows, np.array([i]), torch.device("cpu"))
            windows.buffers[0][16 * (i + 1)] += 1
            assert torch.equal(forward_loss(model, windows, np.array([i]), torch.device("cpu")), before)


def test_evaluation_scores_only_the_masked_in_targets_at_the_training_context(tmp_path):
    from model.scoring import EvalOptions, sweep

    path = _masked_shard(tmp_path)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=16))
    buf, mask = read_tokens(path), read_loss_mask(path)
    opts = EvalOptions(max_tokens=1000, context_multipliers=(0.5, 1.0, 2.0))
    kw = {"train_seq_len": 16, "opts": opts, "byte_lengths": np.ones(64, dtype=np.int64),
          "unigram_logp": np.full(64, -np.log(64))}
    masked, plain = sweep(model, [buf], masks=[mask], **kw), sweep(model, [buf], **kw)
    assert [r["context"] for r in masked["lengths"]] == [16] and "length sweep" in masked["notes"][-1]
    n_windows = (len(buf) - 1) // 16
    assert masked["metrics"]["val_tokens"] == mask[1 : n_windows * 16 + 1].sum() < plain["metrics"]["val_tokens"]


def test_a_mixed_task_and_text_dataset_is_refused(tmp_path):
    text = tmp_path / "text.arrow"
    write_shard(text, [np.arange(40)], np.uint16)
    with pytest.raises(ValueError, match="some shards carry a loss mask and some do not"):
        TokenWindows([_masked_shard(tmp_path), str(text)], 8)


@pytest.mark.slow
def test_a_short_real_run_fine_tunes_on_prompt_completion_data(tmp_path, tracking_uri, ray_local, capsys):
    """tokenizer -> prepare -> train -> evaluate on task data, through the CLI (one worker, a few steps)."""
    from pipeline import cli
    from tests.conftest import tiny_raw

    data = _jsonl(tmp_path / "data" / "pairs.jsonl", PAIRS * 3) if (tmp_path / "data").mkdir() is None else None
    raw = tiny_raw(data.parent, tmp_path / "store", data={"format": "prompt_completion", "dedup": False},
                   train={"steps": 4, "global_batch_size": 4, "micro_batch_size": 4, "num_workers": 1, "zero_stage": 1,
                          "checkpoint_every": 4, "eval_every": 2, "eval_tokens": 256},
                   evaluate={"max_tokens": 500}, tracking={"enabled": False})
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    for stage in ("tokenizer", "prepare", "train", "evaluate"):
        assert cli.main(["run", str(cfg), "--only", stage]) == 0, capsys.readouterr().err
    root = tmp_path / "store"
    (prep,) = [p for p in (root / "prepare").iterdir() if (p / "_COMPLETE.json").exists()]
    assert all(read_loss_mask(p) is not None for p in prep.glob("*.arrow"))
    (ev,) = [p for p in (root / "evaluate").iterdir() if (p / "_COMPLETE.json").exists()]
    result = json.loads((ev / "eval.json").read_text())
    assert result["loss_mask"] is True and np.isfinite(result["metrics"]["val_loss"])


def test_a_chat_template_whose_markers_are_not_tokens_is_refused_before_work(tmp_path, tiny_config):
    """Without its markers as tokens the template could not mark the assistant turns: the mask would be lost."""
    from pipeline.stages.prepare import _check_template
    from pipeline.stages.tokenizer import special_tokens

    cfg = tiny_config(data={"format": "chat"})
    assert special_tokens(cfg)[-len(CHAT_MARKERS):] == CHAT_MARKERS  # the tokenizer stage adds them for chat data
    assert special_tokens(tiny_config()) == SPECIAL_TOKENS  # and only then
    plain = tmp_path / "tokenizer.json"
    train_bpe(["the king and the fool"] * 4, vocab_size=280).save(str(plain))
    with pytest.raises(InputError, match=r"^data.format=chat: the tokenizer has no token <\|system\|>, <\|user\|>, "
                                         r"<\|assistant\|>, <\|end\|>, so the chat template cannot mark"):
        _check_template(cfg, str(plain))
    _check_template(tiny_config(), str(plain))  # text data needs no markers


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHATML_MARKERS = ["<|im_start|>", "<|im_end|>"]


def test_a_jinja_chat_template_renders_as_transformers_does_and_masks_each_assistant_span(tmp_path):
    """data.chat_template (ChatML here): the shards hold exactly transformers' rendering, and the loss mask covers
    each assistant turn's content and closing marker (and the EOS after the last), nothing else."""
    from transformers import PreTrainedTokenizerFast

    from tokenization.bpe import load_tokenizer

    path = tmp_path / "tokenizer.json"
    train_bpe(["be brief line speaker king fool"] * 8, vocab_size=300, special_tokens=[*SPECIAL_TOKENS, *CHATML_MARKERS]
              ).save(str(path))
    tok = load_tokenizer(str(path))
    chats = [{"messages": [{"role": "user", "content": f"line {i}"}, {"role": "assistant", "content": f"speaker {i % 3}"},
                           {"role": "user", "content": "and?"}, {"role": "assistant", "content": "the fool"}]}
             for i in range(30)]
    out = _prepare(tmp_path, str(path), _jsonl(tmp_path / "chat.jsonl", chats), DocOptions(format="chat", chat_template=CHATML))
    shard = tmp_path / out["train"]["file"]
    doc, mask = read_documents(shard)[0], read_loss_mask(shard)[: len(read_documents(shard)[0])]
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path), chat_template=CHATML)
    eos = tok.token_to_id(SPECIAL_TOKENS[0])
    rendered = {hf.apply_chat_template(c["messages"], tokenize=False): c for c in chats}
    text = tok.decode(doc[:-1].tolist(), skip_special_tokens=False)
    assert text in rendered and doc[-1] == eos  # the same text transformers renders, then prepare's EOS
    learnt = [tok.decode(doc[a:b].tolist(), skip_special_tokens=False) for a, b in _runs(mask)]
    speaker = rendered[text]["messages"][1]["content"]
    assert learnt == [f"{speaker}<|im_end|>\n", "the fool<|im_end|>\n" + SPECIAL_TOKENS[0]]
    assert list(doc).count(tok.token_to_id("<|im_start|>")) == 4  # markers are single special tokens


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of ones."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return list(zip(edges[::2], edges[1::2]))


@pytest.mark.parametrize("template, words", [
    ("{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}",
     "does not render the assistant's content"),
    ("{% for m in messages|reverse %}{{ m['content'] }}|{% endfor %}", "does not render a conversation's turns in order"),
    ("{% for m in messages %}{{ m['content'] }", "does not parse"),
    ("{{ raise_exception('only user turns') }}", "the template refused a conversation: only user turns"),
])
def test_a_chat_template_that_cannot_place_the_mask_is_refused_before_work(tiny_config, tmp_path, template, words):
    from pipeline.stages.prepare import _check_template

    cfg = tiny_config(data={"format": "chat", "chat_template": template})
    with pytest.raises(InputError, match=r"^data.chat_template: ") as e:
        _check_template(cfg, str(tmp_path / "unused.json"))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_loaded_tokenizers_own_chat_template_is_used_and_fingerprinted_unless_the_config_gives_one(tiny_config, tmp_path):
    from pipeline.stages import prepare, tokenizer

    folder = tmp_path / "hf-tokenizer"
    folder.mkdir()
    train_bpe(["the king and the fool"] * 4, vocab_size=280, special_tokens=[*SPECIAL_TOKENS, *CHATML_MARKERS]
              ).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    own = tiny_config(data={"format": "chat"}, tokenizer={"path": str(folder)})
    assert prepare.chat_template(own) == CHATML
    assert prepare._section(own)["data"]["chat_template"] == CHATML
    given = tiny_config(data={"format": "chat", "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"},
                        tokenizer={"path": str(folder)})
    assert prepare.chat_template(given) != CHATML  # the config's wins
    assert prepare._section(given) != prepare._section(own)
    built_in = tiny_config(data={"format": "chat"})
    assert prepare.chat_template(built_in) is None and "chat_template" not in prepare._section(built_in)["data"]
    assert tokenizer.special_tokens(built_in)[-len(CHAT_MARKERS):] == CHAT_MARKERS  # only the built-in adds markers
    assert not set(CHAT_MARKERS) & set(tokenizer.special_tokens(tiny_config(data={"format": "chat", "chat_template": CHATML})))
