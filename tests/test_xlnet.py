"""XLNet: two-stream attention over a factorisation order, its logits equal to transformers' XLNetLMHeadModel for the
same permutation mask and target mapping (with and without a segment memory), the permutation-LM draw, and the
family through the stages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from model import ModelConfig, XLNet, export_hf, import_hf, param_count
from tokenization.permutation import PermutationOptions, Permuter


def xlnet(**kw) -> ModelConfig:
    return ModelConfig(**{"vocab_size": 60, "family": "xlnet", "pos_encoding": "xl", "norm_position": "post",
                          "n_layer": 2, "n_head": 4, "d_model": 32, "d_ff": 64, "max_seq_len": 16, "dropout": 0.0, **kw})


def perturbed(cfg: ModelConfig) -> XLNet:
    torch.manual_seed(0)
    model = XLNet(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def hf_inputs(ranks: torch.Tensor, predict: torch.Tensor) -> dict[str, torch.Tensor]:
    """transformers' perm_mask ([b, i, j] = 1: i does not see j, here j ordered at or after i) and target_mapping."""
    B, T = ranks.shape
    target_mapping = torch.zeros(B, predict.shape[1], T)
    target_mapping.scatter_(2, predict[:, :, None], 1.0)
    return {"perm_mask": (ranks[:, None, :] >= ranks[:, :, None]).float(), "target_mapping": target_mapping}


def an_order(B: int, T: int, P: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ranks = torch.stack([torch.randperm(T, generator=g) for _ in range(B)])  # ranks[b, i]: i's step in the order
    return ranks, ranks.argsort(1)[:, -P:]  # the last P of each order are predicted, in order


def test_logits_equal_transformers_for_a_permutation_and_left_to_right_and_import_is_exact(tmp_path):
    from transformers import XLNetLMHeadModel

    ours = perturbed(xlnet())
    theirs = XLNetLMHeadModel.from_pretrained(export_hf(ours, tmp_path / "hf")).eval()
    idx = torch.randint(0, 60, (2, 10), generator=torch.Generator().manual_seed(2))
    ranks, predict = an_order(2, 10, 3)
    with torch.no_grad():
        permuted = ours(idx, ranks, predict)  # (B, P, vocab)
        torch.testing.assert_close(permuted, theirs(input_ids=idx, **hf_inputs(ranks, predict)).logits, rtol=0, atol=1e-4)
        # left to right: the query at p + 1 predicts the next token; transformers needs a slot for the last query
        natural = torch.arange(11)[None].expand(2, 11)
        their_next = theirs(input_ids=torch.cat([idx, torch.zeros(2, 1, dtype=torch.long)], 1),
                            **hf_inputs(natural, torch.arange(1, 11)[None].expand(2, 10))).logits
        torch.testing.assert_close(ours(idx), their_next, rtol=0, atol=1e-4)
        assert torch.equal(import_hf(tmp_path / "hf")(idx, ranks, predict), permuted)
    assert param_count(ours.config) == ours.num_params


def test_with_a_segment_memory_the_logits_and_the_memory_equal_transformers_mems(tmp_path):
    from transformers import XLNetLMHeadModel

    ours = perturbed(xlnet(memory_len=8))
    theirs = XLNetLMHeadModel.from_pretrained(export_hf(ours, tmp_path / "hf")).eval()
    assert theirs.config.mem_len == 8
    first = torch.randint(0, 60, (2, 12), generator=torch.Generator().manual_seed(3))
    idx = torch.randint(0, 60, (2, 10), generator=torch.Generator().manual_seed(4))
    ranks, predict = an_order(2, 10, 3)
    memory = ours.new_memory()
    with torch.no_grad():
        ours(first, memory=memory)  # the first segment read left to right: its content stream is causal
        causal = torch.arange(12)[None].expand(2, 12)
        mems = theirs(input_ids=first, perm_mask=(causal[:, None, :] > causal[:, :, None]).float(), use_mems=True).mems
        for theirs_mem, ours_mem in zip(mems, memory.states):
            torch.testing.assert_close(theirs_mem.transpose(0, 1), ours_mem, rtol=0, atol=1e-4)
        torch.testing.assert_close(ours(idx, ranks, predict, memory=memory),
                                   theirs(input_ids=idx, mems=mems, use_mems=True, **hf_inputs(ranks, predict)).logits,
                                   rtol=0, atol=1e-4)


def test_the_query_stream_never_sees_its_own_token_and_left_to_right_never_sees_the_future():
    model = perturbed(xlnet())
    idx = torch.randint(0, 60, (1, 10), generator=torch.Generator().manual_seed(5))
    ranks, predict = an_order(1, 10, 4)
    with torch.no_grad():
        before = model(idx, ranks, predict)  # (1, 4, vocab), the rows in order of rank
        for row, position in enumerate(predict[0].tolist()):
            changed = idx.clone()
            changed[0, position] = (idx[0, position] + 1) % 60
            after = model(changed, ranks, predict)
            assert torch.equal(after[:, : row + 1], before[:, : row + 1])  # itself and the ones ordered before it
            assert row == 3 or not torch.equal(after[:, 3], before[:, 3])  # the last in the order sees it
        later = idx.clone()
        later[0, 6:] = (idx[0, 6:] + 1) % 60
        assert torch.equal(model(idx)[:, :6], model(later)[:, :6])  # logits at p predict token p + 1 from tokens <= p
        assert not torch.equal(model(idx)[:, 6], model(later)[:, 6])


def test_xlnet_generates_left_to_right_without_a_kv_cache_and_refuses_beams():
    from model.generation import beam_search, generate_batch

    model = perturbed(xlnet())
    prompts = [[5, 6, 7], [8, 9]]  # the second left-padded
    new = generate_batch(model, prompts, max_new_tokens=6, temperature=0.0)
    for prompt, tokens in zip(prompts, new):
        text = prompt + tokens
        with torch.no_grad():
            logits = model(torch.tensor([text[:-1]]))[0]
        assert logits[len(prompt) - 1 :].argmax(-1).tolist() == tokens  # each the argmax after the text before it
    with pytest.raises(ValueError, match="beam search reorders a KV cache"):
        beam_search(model, [5, 6], num_beams=2, max_new_tokens=2)


def test_xlnets_attention_takes_no_biases_and_what_xlnet_is_not_is_named():
    model = XLNet(xlnet())
    assert model.blocks[0].attn.qkv.bias is None and model.blocks[0].mlp.fc.bias is not None
    with pytest.raises(ValueError, match="ModelConfig.pos_encoding"):
        xlnet(pos_encoding="rope")


def test_a_permutation_draw_is_a_pure_function_of_seed_draw_and_window_and_predicts_the_last_of_each_order():
    permuter = Permuter(PermutationOptions(predict_one_in=4), seed=7)
    tokens = np.arange(2 * 12).reshape(2, 12)
    _, ranks, predict, targets = permuter.model_inputs(tokens, np.array([5, 9]), draw=3)
    assert predict.shape == (2, 3) and (targets == np.take_along_axis(tokens, predict, 1)).all()
    for row in range(2):
        assert sorted(ranks[row]) == list(range(12))
        assert sorted(ranks[row, predict[row]]) == [9, 10, 11]  # the last 12 // 4 of the order
    again = permuter.model_inputs(tokens, np.array([5, 9]), draw=3)[1]
    assert (again == ranks).all()
    assert not (permuter.model_inputs(tokens, np.array([5, 9]), draw=4)[1] == ranks).all()
    assert (permuter.model_inputs(tokens[1:], np.array([9]), draw=3)[1] == ranks[1:]).all()  # batch-independent
    with pytest.raises(ValueError, match="predict_one_in"):
        PermutationOptions(predict_one_in=1)


def raw_xlnet(corpus_dir, root, **train) -> dict:
    from tests.conftest import tiny_raw

    raw = tiny_raw(corpus_dir, root, train={"max_failures": 0, **train})
    raw["model"].update(family="xlnet", pos_encoding="xl", norm_position="post")
    raw["decode"] = {"prompts": ["KING:\n"], "max_new_tokens": 6, "temperature": 0.0, "num_samples": 1}
    return raw


@pytest.mark.parametrize("change, key", [
    (lambda r: r["decode"].update(num_beams=2), "decode.num_beams needs a decoder"),
    (lambda r: r["train"].update(objective="causal_lm"), "train.objective causal_lm needs model.family decoder"),
    (lambda r: r["train"].update(packing="documents"), "train.packing: documents needs a decoder"),
])
def test_what_xlnet_cannot_do_is_one_line_before_any_work(change, key, corpus_dir, tmp_path, capsys):
    from tests.conftest import refused_before_any_work

    raw = raw_xlnet(corpus_dir, tmp_path / "store")
    change(raw)
    assert key in refused_before_any_work(raw, tmp_path, capsys)


@pytest.mark.slow
def test_xlnet_with_a_memory_trains_on_permuted_streams_is_read_left_to_right_decodes_and_exports(
        corpus_dir, tmp_path, tracking_uri, ray_local, capsys):
    """Through the stages on two DeepSpeed workers: train (each batch row a stream of windows, a fresh order per
    window, the memories checkpointed), evaluate (left to right at each length, with the memory and by sliding
    windows beside one window, tokens/s each; the permutation-LM loss), decode past the context, export."""
    from transformers import XLNetLMHeadModel

    from model import load_model
    from pipeline import cli

    raw = raw_xlnet(corpus_dir, tmp_path / "store", steps=6, checkpoint_every=3, zero_stage=2, lr=3e-3)
    raw["model"]["memory_len"] = 32
    raw["evaluate"] = {"context_multipliers": [1.0, 4.0], "max_tokens": 1024}
    raw["decode"]["max_new_tokens"] = 40  # past the 32-token context
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(raw))
    assert cli.main(["run", str(tmp_path / "x.yaml")]) == 0
    out = capsys.readouterr().out
    assert "validation loss" in out and "validation permutation-LM loss" in out, out[-2000:]
    assert "with its memory over 128 tokens: loss" in out and "tokens/s of sliding windows" in out, out[-2000:]
    store = tmp_path / "store"
    committed = {s: next(p for p in (store / s).iterdir() if (p / "_COMPLETE.json").exists())
                 for s in ("train", "evaluate", "decode")}
    from safetensors.torch import load_file

    for rank in (0, 1):  # each rank carried its rows' memory through training: (micro batch, memory_len, d_model)
        memory = load_file(str(committed["train"] / "ray_train" / "step_00000003" / f"memory.rank{rank}.safetensors"))
        assert memory["micro0.layer1"].shape == (2, 32, 32)
    result = json.loads((committed["evaluate"] / "eval.json").read_text())
    m = result["metrics"]
    assert 0 < m["val_loss"] < np.log(300) and 0 < m["plm_loss"] < np.log(300) and m["plm_tokens"] > 0
    assert [r["context"] for r in result["memory"]["memory"]] == [32, 128]
    assert m["loss_ctx_32_memory"] == pytest.approx(m["loss_ctx_32"], abs=1e-4)  # one segment: no memory yet
    assert m["tokens_per_s_ctx_128_memory"] > 0 and m["loss_ctx_128_sliding"] > 0
    (row,) = [json.loads(line) for line in (committed["decode"] / "samples.jsonl").read_text().splitlines()]
    assert row["completion"]
    assert cli.main(["export-hf", str(committed["train"]), str(tmp_path / "hf")]) == 0
    ours, _ = load_model(committed["train"])
    theirs = XLNetLMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 300, (1, 12))
    ranks, predict = an_order(1, 12, 2)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx, ranks, predict), theirs(input_ids=idx, **hf_inputs(ranks, predict)).logits,
                                   rtol=0, atol=1e-4)


@pytest.mark.slow
def test_a_permutation_lm_run_resumed_from_a_checkpoint_trains_exactly_as_an_uninterrupted_one(tmp_path):
    from pipeline.schema import TrainConfig
    from tests.test_packing import _shard
    from tests.test_training import resumed_equals_uninterrupted

    config = {"model": xlnet(vocab_size=64, memory_len=8).to_dict(),
              "train": TrainConfig(steps=4, global_batch_size=4, micro_batch_size=2, warmup_steps=1, checkpoint_every=2,
                                   log_every=1, zero_stage=1, lr=1e-2).model_dump(mode="json"),
              "seq_len": 16, "train_shards": [_shard(tmp_path, lengths=tuple(range(3, 40)))],
              "objective": {"kind": "permutation_lm"}}
    assert "mask_emb" in resumed_equals_uninterrupted(config, tmp_path)
    from safetensors.torch import load_file

    memory = load_file(str(tmp_path / "whole" / "ckpt-1" / "step_00000002" / "memory.rank0.safetensors"))
    assert memory["micro1.layer1"].shape == (2, 8, 32)  # the memory was carried (and resumed) in training
