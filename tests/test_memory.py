"""Transformer-XL segment memory and relative encoding: a model without a memory is today's model bit for bit, a
segment read with a memory sees exactly the positions before it, and the memory carries what a model needs from
the previous segment."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from model import GPT, KVCache, ModelConfig, param_count

RELATIVE = ["xl", "rope", "alibi", "none"]


def tiny(pos_encoding: str, **kw) -> ModelConfig:
    return ModelConfig(**{"vocab_size": 50, "n_layer": 2, "n_head": 4, "d_model": 32, "max_seq_len": 16,
                          "pos_encoding": pos_encoding, **kw})


def test_memory_len_0_is_todays_model_bit_for_bit():
    """The same seed builds the same weights with or without a memory, and a model reading an empty memory
    (the first segment) computes exactly the logits and gradients of a forward pass without one."""
    x = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    plain = GPT(tiny("rope"))
    torch.manual_seed(0)
    remembering = GPT(tiny("rope", memory_len=8))
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), remembering.state_dict().values()))
    assert plain.state_dict().keys() == remembering.state_dict().keys()  # a memory adds no weights
    plain(x, x).backward()
    remembering(x, x, memory=remembering.new_memory()).backward()
    assert torch.equal(plain(x), remembering(x, memory=remembering.new_memory()))
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(plain.parameters(), remembering.parameters()))


@pytest.mark.parametrize("pos_encoding", RELATIVE)
def test_a_segment_read_with_its_memory_equals_the_same_positions_of_one_long_pass(pos_encoding):
    """With a memory as long as what came before, segment after segment gives the logits of the whole stream at once:
    the memory holds each layer's states, positions continue across the boundary."""
    torch.manual_seed(0)
    model = GPT(tiny(pos_encoding, memory_len=16)).eval()
    x = torch.randint(0, 50, (3, 24))
    memory = model.new_memory()
    segments = [model(x[:, i : i + 8], memory=memory) for i in (0, 8, 16)]
    assert len(memory) == 16 and all(not s.requires_grad for s in memory.states)  # detached
    torch.testing.assert_close(torch.cat(segments, 1), model(x), rtol=0, atol=2e-6)


def test_a_memory_keeps_only_its_last_positions():
    torch.manual_seed(0)
    model = GPT(tiny("xl", memory_len=4)).eval()
    x = torch.randint(0, 50, (2, 16))
    memory = model.new_memory()
    model(x[:, :8], memory=memory)
    first = [s.clone() for s in memory.states]
    assert len(memory) == 4 and torch.equal(memory.states[0], model.tok_emb(x[:, 4:8]))  # layer 0 reads embeddings
    model(x[:, 8:16], memory=memory)
    assert len(memory) == 4 and not torch.equal(memory.states[1], first[1])


@pytest.mark.parametrize("pos_encoding", ["xl", "rope"])
def test_activation_checkpointing_with_a_memory_gives_the_same_gradients(pos_encoding):
    """A block recomputed in the backward pass reads the memory it read forward, not the one updated since."""
    x = torch.randint(0, 50, (2, 17), generator=torch.Generator().manual_seed(1))
    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = GPT(tiny(pos_encoding, memory_len=8, activation_checkpointing=recompute))
        memory = model.new_memory()
        model(x[:, :8], x[:, 1:9], memory=memory).backward()
        model(x[:, 8:16], x[:, 9:17], memory=memory).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_xl_decoding_with_a_kv_cache_and_left_padding_equals_the_full_pass():
    torch.manual_seed(0)
    model = GPT(tiny("xl", n_kv_head=2)).eval()
    x = torch.randint(0, 50, (2, 12))
    full = model(x)
    cache = KVCache.for_model(model, batch_size=2, max_len=12)
    steps = [model(x[:, :5], kv_cache=cache)] + [model(x[:, i : i + 1], kv_cache=cache) for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=2e-6)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x[:1, :9]], 1)  # row 0 left-padded by 3
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 9)], 1).long()
    torch.testing.assert_close(model(padded, attention_mask=mask)[:, 3:], full[:1, :9], rtol=0, atol=2e-6)


def test_xl_parameters_are_counted_from_the_config():
    cfg = tiny("xl", n_kv_head=2, memory_len=8)
    assert param_count(cfg) == GPT(cfg).num_params


@pytest.mark.parametrize("kw, key", [
    (dict(pos_encoding="learned", memory_len=8), "memory_len"),
    (dict(pos_encoding="sinusoidal", memory_len=8), "memory_len"),
    (dict(pos_encoding="rope", family="encoder", memory_len=8), "memory_len"),
    (dict(pos_encoding="xl", family="encoder"), "pos_encoding"),
    (dict(pos_encoding="rope", memory_len=-1), "memory_len"),
])
def test_what_a_memory_cannot_go_with_is_named(kw, key):
    with pytest.raises(ValueError, match=f"ModelConfig.{key}"):
        ModelConfig(vocab_size=50, **kw)


@pytest.mark.parametrize("pos_encoding", ["xl", "rope"])
def test_the_memory_carries_the_previous_segment_a_model_without_one_cannot_see(pos_encoding):
    """Copy across segments: a segment of random tokens, then the same tokens again. Only the memory holds the first
    segment when the second is read, so only a model with one learns to predict it (the floor: the last target,
    a fresh token, log(V) / L); without a memory the loss stays at chance, log V."""
    V, L = 16, 8
    losses = {}
    for memory_len in (0, L):
        torch.manual_seed(0)
        model = GPT(ModelConfig(vocab_size=V, n_layer=2, n_head=2, d_model=32, max_seq_len=L, pos_encoding=pos_encoding,
                                memory_len=memory_len))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(300):
            a = torch.randint(0, V, (32, L + 1), generator=g)
            memory = model.new_memory() if memory_len else None
            with torch.no_grad():
                model(a[:, :L], memory=memory)  # the first segment: only fills the memory
            loss = model(a[:, :L], a[:, 1:], memory=memory)  # the same tokens again, each predicting the next
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses[memory_len] = loss.item()
    assert losses[0] > 0.95 * math.log(V), losses
    assert losses[L] < 0.25 * math.log(V), losses


# --- training over streams -----------------------------------------------------------------

def test_each_batch_row_reads_consecutive_windows_a_pass_long_and_ranks_split_the_rows():
    from tokenization.dataset import segment_indices, stream_length

    kw = dict(global_batch=4, num_windows=43, seed=3)
    K = stream_length(global_batch=4, num_windows=43)
    assert K == 10
    rows = np.stack([segment_indices(s, rank=0, world_size=1, **kw) for s in range(2 * K)])  # (steps, rows)
    for first in (0, K):  # within a pass each row moves one window a step
        assert ((rows[first + 1 : first + K] - rows[first : first + K - 1]) % 43 == 1).all()
    assert len(np.unique(rows[:K])) == 4 * K  # the streams of a pass never overlap
    assert not ((rows[K] - rows[K - 1]) % 43 == 1).all()  # a new pass cuts the streams afresh
    two = [np.stack([segment_indices(s, rank=r, world_size=2, **kw) for s in range(2 * K)]) for r in (0, 1)]
    assert (two[0] == rows[:, 0::2]).all() and (two[1] == rows[:, 1::2]).all()


@pytest.mark.slow
def test_a_run_with_a_segment_memory_resumes_exactly_with_the_memory_of_its_checkpoint(tmp_path):
    """Resumed from its step-2 checkpoint in a fresh process, the run trains steps 3 and 4 as the uninterrupted run
    did (same windows, losses, weights): the memory of each micro-batch came back from the checkpoint (an empty one
    would change step 3's loss)."""
    from safetensors.torch import load_file

    from pipeline.schema import TrainConfig
    from tests.test_packing import _shard
    from tests.test_training import resumed_equals_uninterrupted

    config = {"model": tiny("xl", vocab_size=64, max_seq_len=8, memory_len=8).to_dict(),
              "train": TrainConfig(steps=4, global_batch_size=4, micro_batch_size=2, warmup_steps=1, checkpoint_every=2,
                                   log_every=1, zero_stage=1, lr=1e-2).model_dump(mode="json"),
              "seq_len": 8, "train_shards": [_shard(tmp_path, lengths=tuple(range(3, 30)))]}
    weights = resumed_equals_uninterrupted(config, tmp_path)
    assert "blocks.0.attn.content_bias" in weights
    memory = load_file(str(tmp_path / "whole" / "ckpt-1" / "step_00000002" / "memory.rank0.safetensors"))
    assert sorted(memory) == [f"micro{m}.layer{i}" for m in (0, 1) for i in (0, 1)]
    assert memory["micro1.layer1"].shape == (2, 8, 32) and memory["micro1.layer1"].abs().sum() > 0
    ids = [json.loads(line) for line in open(tmp_path / "whole" / "w1-r0.jsonl")]
    ids = np.array([r["ids"] for r in ids if "ids" in r])  # (steps, rows): each row reads the next window
    assert ((ids[1:] - ids[:-1]) == 1).all(), ids


# --- evaluation and decoding ---------------------------------------------------------------

def test_the_sweep_reads_a_memory_model_with_its_memory_and_by_sliding_windows_beside_one_window():
    """With a memory as long as the context, reading 2x the context with the memory or by sliding windows gives each
    target exactly what one window gives it; at 4x the three differ, and each reports its tokens/s."""
    from model.scoring import EvalOptions, sweep

    torch.manual_seed(0)
    model = GPT(tiny("xl", memory_len=8, max_seq_len=8)).eval()
    val = [np.random.default_rng(0).integers(0, 50, 400)]
    result = sweep(model, val, train_seq_len=8, opts=EvalOptions(context_multipliers=(1.0, 2.0, 4.0), max_tokens=256),
                   byte_lengths=np.ones(50), unigram_logp=np.full(50, -math.log(50)))
    m = result["metrics"]
    assert [r["context"] for r in result["memory"]["memory"]] == [8, 16, 32]
    for L in (8, 16):
        assert m[f"loss_ctx_{L}_memory"] == pytest.approx(m[f"loss_ctx_{L}"], abs=1e-5)
        assert m[f"loss_ctx_{L}_sliding"] == pytest.approx(m[f"loss_ctx_{L}"], abs=1e-5)
    assert m["loss_ctx_32_memory"] != pytest.approx(m["loss_ctx_32"], abs=1e-5)
    assert m["loss_ctx_32_sliding"] != pytest.approx(m["loss_ctx_32_memory"], abs=1e-5)
    assert all(m[f"tokens_per_s_ctx_32_{kind}"] > 0 for kind in ("memory", "sliding"))
    assert "memory" not in sweep(GPT(tiny("xl")).eval(), val, train_seq_len=8, opts=EvalOptions(context_multipliers=(1.0,)),
                                 byte_lengths=np.ones(50), unigram_logp=np.full(50, -math.log(50)))


def test_a_memory_model_generates_past_its_training_context_as_one_pass_reads_it():
    """Decoding keeps every position in the KV cache (the memory as long as the text): greedy tokens past the
    context are those a full forward pass over the text predicts."""
    from model.generation import generate

    torch.manual_seed(0)
    model = GPT(tiny("xl", memory_len=8, max_seq_len=8)).eval()
    (new,) = generate(model, [1, 2, 3], max_new_tokens=20, temperature=0.0)
    text = [1, 2, 3, *new]
    assert len(text) == 23  # almost 3x the context
    with torch.no_grad():
        logits = model(torch.tensor([text[:-1]]))
    assert logits[0, 2:].argmax(-1).tolist() == new


# --- the pipeline ----------------------------------------------------------------------------

def test_memory_len_enters_the_train_fingerprint_only_when_set(tiny_config):
    from pipeline.stages.train.hardware import TrainHardware
    from pipeline.stages.train.stage import section_for

    hw = TrainHardware(device="cpu", precision="fp32")
    plain = section_for(tiny_config(model={"pos_encoding": "rope"}), hw)
    assert "memory_len" not in plain["model"]
    assert section_for(tiny_config(model={"pos_encoding": "rope", "memory_len": 0}), hw) == plain
    assert section_for(tiny_config(model={"pos_encoding": "rope", "memory_len": 16}), hw)["model"]["memory_len"] == 16


@pytest.mark.parametrize("change, key", [
    (lambda r: r["train"].update(packing="documents"), "model.memory_len 16 with train.packing: documents"),
    (lambda r: r["data"].update(inputs=[], sources=[{"name": "a", "inputs": r["data"]["inputs"]}]),
     "model.memory_len 16 with data.sources"),
    (lambda r: r["model"].update(pos_encoding="learned"), "model.memory_len"),
])
def test_what_a_segment_memory_cannot_train_with_is_one_line_before_any_work(change, key, corpus_dir, tmp_path, capsys):
    from tests.conftest import refused_before_any_work, tiny_raw

    raw = tiny_raw(corpus_dir, tmp_path / "store", model={"pos_encoding": "xl", "memory_len": 16})
    change(raw)
    assert key in refused_before_any_work(raw, tmp_path, capsys)
