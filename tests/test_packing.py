"""Document-aware packing (`train.packing: documents`): a document inside a packed window gets the logits it gets
alone (every positional encoding, SDPA's mask and FlexAttention), nothing crosses a document boundary, the
dataset's segment ids start a new document right after each EOS, the packed batch of a step is a pure function of
the step, and a run resumed from a checkpoint with packing on trains exactly as one that was never interrupted."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from model import GPT, ModelConfig
from model.segments import segment_positions
from tokenization.dataset import TokenWindows, sample_indices
from tokenization.shards import read_document_starts, write_shard

LENGTHS = (7, 12, 5)  # three documents packed into one window of 24 tokens


def _packed(model: GPT, docs: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits of the documents packed into one window, and of each document run alone."""
    x = torch.cat(docs, dim=1)
    seg = torch.cat([torch.full_like(d, i) for i, d in enumerate(docs)], dim=1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FlexAttention run eagerly on CPU says it is slow
        return model(x, segment_ids=seg), [model(d) for d in docs]


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("pos_encoding", ["rope", "learned", "alibi", "sinusoidal", "none"])
def test_a_documents_logits_inside_a_packed_window_equal_its_logits_alone(pos_encoding, backend):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=32,
                            pos_encoding=pos_encoding)).eval()
    model.segment_attention = backend
    docs = [torch.randint(0, 50, (1, n)) for n in LENGTHS]
    packed, alone = _packed(model, docs)
    start = 0
    for d, logits in zip(docs, alone):
        n = d.shape[1]
        assert (packed[:, start : start + n] - logits).abs().max().item() <= 1e-5
        start += n


def test_changing_one_document_leaves_the_others_in_the_window_unchanged():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, n_layer=2, n_head=2, d_model=32, max_seq_len=32, pos_encoding="rope")).eval()
    docs = [torch.randint(0, 50, (1, n)) for n in LENGTHS]
    changed = [docs[0], (docs[1] + 1) % 50, docs[2]]
    (a, _), (b, _) = _packed(model, docs), _packed(model, changed)
    first, second = LENGTHS[0], LENGTHS[0] + LENGTHS[1]
    assert torch.equal(a[:, :first], b[:, :first]) and torch.equal(a[:, second:], b[:, second:])
    assert not torch.allclose(a[:, first:second], b[:, first:second])  # the changed document itself did change
    # without segment ids the last document does see the change: the mask is what keeps it out
    with torch.no_grad():
        assert not torch.allclose(model(torch.cat(docs, 1))[:, second:], model(torch.cat(changed, 1))[:, second:])


def test_the_default_keeps_the_train_fingerprint_and_documents_changes_it(tiny_config):
    """`stream` is what every model trained before the option did: its section is the one they were cached under."""
    from pipeline.stages.train.hardware import TrainHardware
    from pipeline.stages.train.stage import section_for

    hw = TrainHardware(device="cpu", precision="fp32")
    default, stream, documents = (section_for(tiny_config(**t), hw) for t in
                                  ({}, {"train": {"packing": "stream"}}, {"train": {"packing": "documents"}}))
    assert "packing" not in default["train"] and default == stream
    assert documents["train"] == {**default["train"], "packing": "documents"}


EOS = 1


def _shard(tmp_path, lengths=(5, 9, 3, 12, 20, 6, 30, 8), seed=0) -> str:
    """Documents of random tokens (>= 2) each ending in EOS, as `prepare` writes them."""
    rng = np.random.default_rng(seed)
    docs = [np.append(rng.integers(2, 64, n - 1), EOS) for n in lengths]
    path = tmp_path / "train-00000.arrow"
    write_shard(path, docs, np.dtype(np.uint16))
    return str(path)


def test_a_new_segment_starts_right_after_each_eos_with_positions_from_zero(tmp_path):
    path = _shard(tmp_path)
    assert read_document_starts(path).tolist() == [0, 5, 14, 17, 29, 49, 55, 85, 93]
    windows = TokenWindows([path], seq_len=8, documents=True)
    tokens, segments = windows.batch(np.arange(len(windows))), windows.segments(np.arange(len(windows)))
    inputs = tokens[:, :-1]
    for w in range(len(windows)):
        eos = np.flatnonzero(inputs[w] == EOS)
        expected = np.searchsorted(eos, np.arange(8), side="left")  # a token after k EOS tokens is in segment k
        assert segments[w].tolist() == expected.tolist(), f"window {w}: {inputs[w]} -> {segments[w]}"
    # window 1 holds tokens 8..15: the end of document 1 (EOS at 13), then document 2 from token 14
    assert segments[1].tolist() == [0, 0, 0, 0, 0, 0, 1, 1] and inputs[1][5] == EOS
    assert segment_positions(torch.from_numpy(segments[1:2])).tolist() == [[0, 1, 2, 3, 4, 5, 0, 1]]
    with pytest.raises(AssertionError, match="documents=True"):
        TokenWindows([path], seq_len=8).segments(np.arange(1))


def test_the_packed_batch_of_a_step_is_a_pure_function_of_the_step(tmp_path):
    path = _shard(tmp_path, lengths=tuple(range(3, 40)))

    def batch(step: int) -> tuple[np.ndarray, np.ndarray]:
        windows = TokenWindows([path], seq_len=16, documents=True)  # a fresh process's view: nothing carried over
        idx = sample_indices(step, rank=0, world_size=1, global_batch=4, num_windows=len(windows), seed=7)
        return windows.batch(idx), windows.segments(idx)

    later = [batch(s) for s in (5, 3, 40)]
    again = [batch(s) for s in (40, 5, 3)]
    for (t1, s1), (t2, s2) in zip(later, [again[1], again[2], again[0]]):
        assert np.array_equal(t1, t2) and np.array_equal(s1, s2)
    assert max(s.max() for _, s in later) >= 1  # the windows do cross documents


@pytest.mark.slow
def test_a_run_resumed_with_packing_trains_exactly_as_an_uninterrupted_one(tmp_path):
    """The per-worker loop (DeepSpeed over gloo, one process): 4 steps uninterrupted, then the same run resumed
    from its step-2 checkpoint: steps 3 and 4 see the same samples and give bit-identical losses and weights."""
    from pipeline.schema import ModelSection, TrainConfig
    from tests.test_training import resumed_equals_uninterrupted

    path = _shard(tmp_path, lengths=tuple(range(3, 40)))
    config = {"model": {**ModelSection(n_layer=2, n_head=2, d_model=32, max_seq_len=16,
                                       pos_encoding="rope").model_config_fields(), "vocab_size": 64},
              "train": TrainConfig(steps=4, global_batch_size=4, micro_batch_size=2, warmup_steps=1, checkpoint_every=2,
                                   log_every=1, zero_stage=1, lr=1e-2, packing="documents").model_dump(mode="json"),
              "seq_len": 16, "train_shards": [path]}
    resumed_equals_uninterrupted(config, tmp_path)


def test_the_training_step_feeds_the_windows_segment_ids_to_the_model(tmp_path):
    """What the worker's forward pass computes with packing on: the loss of each window within its documents."""
    from pipeline.stages.train.metrics import forward_loss

    path = _shard(tmp_path, lengths=tuple(range(3, 40)))
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=16, pos_encoding="rope"))
    idx = np.array([3, 0, 7])
    packed, stream = TokenWindows([path], 16, documents=True), TokenWindows([path], 16)
    batch = torch.from_numpy(packed.batch(idx))
    with torch.no_grad():
        expected = model(batch[:, :-1], batch[:, 1:], segment_ids=torch.from_numpy(packed.segments(idx)))
        assert torch.equal(forward_loss(model, packed, idx, torch.device("cpu")), expected)
        assert not torch.equal(forward_loss(model, stream, idx, torch.device("cpu")), expected)
