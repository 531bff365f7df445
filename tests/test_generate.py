"""Generation: batched prompts with left padding, the sampler's options, stop tokens, beam search."""

import itertools

import pytest
import torch

from model import GPT, ModelConfig, beam_search, generate, generate_batch
from model.generation import apply_repetition_penalty, sample_next

PROMPTS = [[5, 17, 3, 42, 8, 1, 9], [7, 2], [11, 12, 13, 14]]


def tiny(pos: str = "learned", **kw) -> GPT:
    torch.manual_seed(0)
    m = GPT(ModelConfig(**{"vocab_size": 97, "n_layer": 2, "n_head": 4, "d_model": 32, "max_seq_len": 48,
                           "pos_encoding": pos, **kw})).eval()
    with torch.no_grad():  # sharper matrices than the init, so greedy paths depend on the earlier tokens
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    return m


@pytest.mark.parametrize("pos, kw", [("learned", {}), ("sinusoidal", {}), ("rope", {"n_kv_head": 2}), ("alibi", {}),
                                     ("none", {"n_kv_head": 1})])
def test_batched_left_padded_greedy_equals_each_prompt_alone(pos, kw):
    m = tiny(pos, **kw)
    alone = [generate(m, p, max_new_tokens=12, temperature=0.0)[0] for p in PROMPTS]
    assert generate_batch(m, PROMPTS, max_new_tokens=12, temperature=0.0) == alone
    assert generate_batch(m, PROMPTS, max_new_tokens=12, temperature=0.0, use_cache=False) == alone
    assert len({tuple(a) for a in alone}) == 3  # the rows really are different completions


def test_batched_sampling_with_cache_equals_the_full_forward_path():
    m = tiny("rope", n_kv_head=2)
    kw = dict(max_new_tokens=15, temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=4)
    assert generate_batch(m, PROMPTS, **kw) == generate_batch(m, PROMPTS, use_cache=False, **kw)


def test_sampling_is_seeded():
    m = tiny("alibi")
    a = generate_batch(m, PROMPTS, max_new_tokens=10, temperature=1.5, seed=1)
    assert a == generate_batch(m, PROMPTS, max_new_tokens=10, temperature=1.5, seed=1)
    assert a != generate_batch(m, PROMPTS, max_new_tokens=10, temperature=1.5, seed=2)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(400, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, temperature=1.0, top_k=None, top_p=0.7, generator=gen).tolist()) == {0, 1}
    assert set(sample_next(logits, temperature=1.0, top_k=None, top_p=0.85, generator=gen).tolist()) == {0, 1, 2}
    assert set(sample_next(logits, temperature=1.0, top_k=None, top_p=1e-6, generator=gen).tolist()) == {0}
    assert set(sample_next(logits, temperature=1.0, top_k=None, top_p=1.0, generator=gen).tolist()) == {0, 1, 2, 3}


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 2.0, -2.0]]


def test_a_strong_repetition_penalty_stops_greedy_repeats():
    m = tiny("learned")
    plain = generate(m, [1, 2, 3], max_new_tokens=30, temperature=0.0)[0]
    assert len(set(plain)) < len(plain)  # this model does repeat itself
    penalised = generate(m, [1, 2, 3], max_new_tokens=30, temperature=0.0, repetition_penalty=1e6)[0]
    assert len(set(penalised)) == 30 and not {1, 2, 3} & set(penalised)


def test_stop_tokens_cut_each_row_and_end_decoding_when_all_rows_stopped():
    m = tiny("rope")
    free = generate_batch(m, PROMPTS, max_new_tokens=10, temperature=0.0)
    stops = {free[0][3], free[1][0]}
    out = generate_batch(m, PROMPTS, max_new_tokens=10, temperature=0.0, stop_tokens=stops)
    for row, full in zip(out, free):
        end = next((i + 1 for i, t in enumerate(full) if t in stops), len(full))
        assert row == full[:end]
    calls = []
    m.lm_head.register_forward_hook(lambda *_: calls.append(1))
    firsts = {row[0] for row in free}
    assert generate_batch(m, PROMPTS, max_new_tokens=10, temperature=0.0, stop_tokens=firsts) == [[r[0]] for r in free]
    assert len(calls) == 1  # the prefill only: no decode step ran after every row stopped
    assert generate(m, PROMPTS[0], max_new_tokens=10, temperature=0.0, stop_token=free[0][0]) == [[free[0][0]]]


def test_learned_positions_refuse_a_batch_longer_than_the_table():
    with pytest.raises(AssertionError, match="prompt \\+ max_new_tokens = 50 exceeds max_seq_len 48"):
        generate_batch(tiny("learned"), [[1] * 10, [2] * 3], max_new_tokens=40)


def sequence_logprob(m: GPT, prompt: list[int], new: list[int]) -> float:
    idx = torch.tensor([prompt + new])
    with torch.no_grad():
        logp = torch.log_softmax(m(idx)[0, len(prompt) - 1 : -1].float(), dim=-1)
    return logp.gather(1, torch.tensor(new)[:, None]).sum().item()


def test_beam_search_with_one_beam_is_greedy():
    m = tiny("rope")
    assert beam_search(m, [4, 5, 6], num_beams=1, max_new_tokens=12) == generate(m, [4, 5, 6], max_new_tokens=12, temperature=0.0)


def test_beam_search_wide_enough_is_exhaustive():
    torch.manual_seed(1)
    m = GPT(ModelConfig(vocab_size=5, n_layer=2, n_head=2, d_model=16, pos_encoding="rope")).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.5)
    prompt = [1, 3]
    best = max(itertools.product(range(5), repeat=3), key=lambda s: sequence_logprob(m, prompt, list(s)))
    beams = beam_search(m, prompt, num_beams=25, max_new_tokens=3, num_return_sequences=3)
    assert beams[0] == list(best)
    scores = [sequence_logprob(m, prompt, b) for b in beams]
    assert scores == sorted(scores, reverse=True) and len({tuple(b) for b in beams}) == 3


def test_beam_search_finishes_hypotheses_at_stop_tokens():
    m = tiny("learned")
    greedy = generate(m, [1, 2], max_new_tokens=8, temperature=0.0)[0]
    stop = greedy[2]
    beams = beam_search(m, [1, 2], num_beams=4, max_new_tokens=8, stop_tokens={stop}, num_return_sequences=4)
    assert all(stop not in b[:-1] for b in beams)  # a stop token ends its hypothesis
    assert any(b[-1] == stop for b in beams)


def test_each_row_has_its_own_budget_and_seed_whatever_its_neighbours():
    m = tiny("learned")  # a table of 48: the rows fit their own budgets, not the padded batch's
    prompts, budgets, seeds = [[1] * 40, [2, 3, 4], [5, 6]], [8, 30, 12], [11, 12, 13]
    batched = generate_batch(m, prompts, max_new_tokens=budgets, temperature=1.3, seed=seeds)
    alone = [generate_batch(m, [p], max_new_tokens=[n], temperature=1.3, seed=[s])[0]
             for p, n, s in zip(prompts, budgets, seeds)]
    assert batched == alone and [len(r) for r in batched] == budgets
    reordered = generate_batch(m, prompts[::-1], max_new_tokens=budgets[::-1], temperature=1.3, seed=seeds[::-1])
    assert reordered == batched[::-1]
