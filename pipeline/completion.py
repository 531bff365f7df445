"""Text in, text out: prompts through the tokenizer and the model's samplers, with each completion's log-likelihood.

Shared by the `decode` stage, `llmpipe generate` and the MLflow pyfunc model, so
it imports only torch, `model` and `tokenization` (a model server needs nothing
else); the options are `model.generation.SamplingOptions`. Sampling rows (prompts x samples) decode together as left-padded batches
of `batch_size` through `generate_batch`, each row with its own budget and its own random stream seeded by
(seed, prompt index, sample index), so `batch_size` changes the speed, never a completion; beam search runs one
prompt at a time.
A model with a learned position table keeps only the end of a long prompt, so
that prompt + new tokens fit in the table. The log-likelihood of a completion is
the sum of log p(token | prompt, earlier tokens) under the model itself (no
temperature, no top-k), scored in one teacher-forced batch.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from model import GPT, beam_search, generate_batch
from model.generation import SamplingOptions, left_pad, row_seed
from tokenization.bpe import EOS, PAD


def fit_prompt(model: GPT, ids: list[int], max_new_tokens: int) -> tuple[list[int], int]:
    """(prompt ids, new-token budget) that fit a learned position table; other encodings take any length."""
    n = model.config.max_seq_len
    if model.config.pos_encoding != "learned":
        return ids, max_new_tokens
    ids = ids[-(n - max_new_tokens):] if max_new_tokens < n else ids[-1:]
    return ids, min(max_new_tokens, n - len(ids))


@torch.inference_mode()
def completion_logprobs(model: GPT, prompts: list[list[int]], completions: list[list[int]]) -> list[float]:
    """Sum of log p(completion token | everything before it) per row, in one left-padded forward."""
    device = next(model.parameters()).device
    idx, mask = left_pad([p + c for p, c in zip(prompts, completions)], device)  # (B, T), (B, T) | None
    logp = torch.log_softmax(model(idx, attention_mask=mask).float(), dim=-1)  # (B, T, vocab)
    out = []
    T = idx.shape[1]
    for row, c in enumerate(completions):
        if not c:
            out.append(0.0)
            continue
        # the completion fills the last len(c) positions; position t predicts token t + 1
        pred = logp[row, T - len(c) - 1 : T - 1]  # (len(c), vocab)
        out.append(float(pred.gather(1, torch.tensor(c, device=device)[:, None]).sum()))
    return out


Out = tuple[int, int, list[int], float, float]  # (prompt index, sample, new tokens, log-likelihood, tokens/s)


def _beam_outs(model: GPT, ids: list[list[int]], opts: SamplingOptions, stops: set[int] | None) -> list[Out]:
    out: list[Out] = []
    for p, prompt in enumerate(ids):
        budget = fit_prompt(model, prompt, opts.max_new_tokens)[1]
        t0 = time.perf_counter()
        beams = beam_search(model, prompt, num_beams=opts.num_beams, max_new_tokens=budget, length_penalty=opts.length_penalty,
                            stop_tokens=stops, num_return_sequences=opts.num_samples)
        speed = sum(len(b) for b in beams) / (time.perf_counter() - t0)
        lls = completion_logprobs(model, [prompt] * len(beams), beams)
        out += [(p, s, b, ll, speed) for s, (b, ll) in enumerate(zip(beams, lls))]
    return out


def _sampled_outs(model: GPT, ids: list[list[int]], opts: SamplingOptions, stops: set[int] | None) -> list[Out]:
    """Every (prompt, sample) pair, `batch_size` rows per left-padded batch. Each pair has its own budget and its own
    random stream, seeded by (seed, prompt, sample), so its completion does not depend on the batch it lands in."""
    pairs = [(p, s) for p in range(len(ids)) for s in range(opts.num_samples)]
    out: list[Out] = []
    for i in range(0, len(pairs), opts.batch_size):
        chunk = pairs[i : i + opts.batch_size]
        batch = [ids[p] for p, _ in chunk]
        t0 = time.perf_counter()
        new = generate_batch(model, batch, max_new_tokens=[fit_prompt(model, x, opts.max_new_tokens)[1] for x in batch],
                             temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p,
                             repetition_penalty=opts.repetition_penalty, stop_tokens=stops,
                             seed=None if opts.seed is None else [row_seed(opts.seed, p, s) for p, s in chunk])
        speed = sum(len(n) for n in new) / (time.perf_counter() - t0)
        lls = completion_logprobs(model, batch, new)
        out += [(p, s, n, ll, speed) for (p, s), n, ll in zip(chunk, new, lls)]
    return out


def complete(model: GPT, tokenizer: Any, prompts: list[str], opts: SamplingOptions, *,
             eos_token: str = EOS, prefixes: list[list[int]] | None = None) -> list[dict[str, Any]]:
    """One row per (prompt, sample), in prompt order: the sampling parameters, the completion, its
    log-likelihood and the decoding speed (tokens/s of its batch, or of its prompt's beam search).
    `prefixes` (token ids per prompt, e.g. retrieved passages) go in front of the prompts; rows show the prompt alone."""
    eos = tokenizer.token_to_id(eos_token)  # None: the tokenizer has no such token, nothing stops early
    stops = {eos} if eos is not None else None
    prefixes = prefixes or [[] for _ in prompts]
    ids = [fit_prompt(model, pre + (tokenizer.encode(p, add_special_tokens=False).ids or [eos or 0]),
                      opts.max_new_tokens)[0] for pre, p in zip(prefixes, prompts)]
    outs = (_beam_outs if opts.num_beams > 1 else _sampled_outs)(model, ids, opts, stops)
    return [{"prompt": prompts[p], "sample": s, **opts.table_params(),
             "completion": tokenizer.decode(new, skip_special_tokens=True), "new_tokens": len(new),
             "log_likelihood": ll, "tokens_per_s": speed} for p, s, new, ll, speed in outs]


def fill_masks(model: GPT, tokenizer: Any, prompts: list[str], *, mask_token: str, top_k: int = 5) -> list[dict[str, Any]]:
    """An encoder's answer to each prompt, one row per prompt in `complete`'s shape: `completion` is the prompt
    with every mask replaced by its most likely token, `predictions` the top-k tokens with their probabilities
    at each mask, `log_likelihood` the sum of the log-probabilities of the tokens filled in. A space before the
    mask belongs to the masked word (RoBERTa's mask token strips it too): "not to <mask>" asks for " be"."""
    from model.fill_mask import fill_mask

    mask_id = tokenizer.token_to_id(mask_token)
    if mask_id is None:
        raise ValueError(f"the tokenizer has no mask token {mask_token!r}")
    ids = []
    for n, prompt in enumerate(prompts, 1):
        if mask_token not in prompt:
            raise ValueError(f"prompt {n} ({prompt[:40]!r}) has no {mask_token}: an encoder fills masks, it does not continue text")
        ids.append(tokenizer.encode(prompt.replace(f" {mask_token}", mask_token), add_special_tokens=False).ids)
    t0 = time.perf_counter()
    predictions = fill_mask(model, ids, mask_id=mask_id, top_k=top_k)
    speed = sum(len(p) for p in predictions) / max(time.perf_counter() - t0, 1e-9)
    rows = []
    for prompt, toks, preds in zip(prompts, ids, predictions):
        best = iter([p[0].token_id for p in preds])
        filled = [next(best) if t == mask_id else t for t in toks]
        rows.append({"prompt": prompt, "sample": 0, "top_k": top_k, "completion": tokenizer.decode(filled, skip_special_tokens=False),
                     "predictions": [[{"token": tokenizer.decode([c.token_id]), "prob": c.prob} for c in at] for at in preds],
                     "new_tokens": len(preds), "log_likelihood": sum(math.log(max(p[0].prob, 1e-45)) for p in preds),
                     "tokens_per_s": speed})
    return rows


@torch.inference_mode()
def target_logprobs(model: Any, sources: list[list[int]], targets: list[list[int]], *, start_id: int) -> list[float]:
    """An encoder-decoder's sum of log p(target token | source, earlier target tokens) per row."""
    device = next(model.parameters()).device
    out = []
    for src, tgt in zip(sources, targets):
        if not tgt:
            out.append(0.0)
            continue
        logits = model(torch.tensor([src], device=device), torch.tensor([[start_id, *tgt[:-1]]], device=device))
        logp = torch.log_softmax(logits[0].float(), dim=-1)  # (T, vocab)
        out.append(float(logp.gather(1, torch.tensor(tgt, device=device)[:, None]).sum()))
    return out


def transduce(model: Any, tokenizer: Any, prompts: list[str], opts: SamplingOptions, *, eos_token: str = EOS,
              start_token: str = PAD) -> list[dict[str, Any]]:
    """An encoder-decoder's answer to each prompt, in `complete`'s rows: the prompt (with the end token, as in
    training) is the source, encoded once; the decoder starts from `start_token` (T5: the padding token) and
    samples or beam-searches the target, which may hold sentinel tokens (span corruption's answers name them)."""
    from model.seq2seq import conditioned

    eos, start = tokenizer.token_to_id(eos_token), tokenizer.token_to_id(start_token)
    if start is None:
        raise ValueError(f"the tokenizer has no {start_token!r} to start the decoder from")
    stops = {eos} if eos is not None else None
    sources = [tokenizer.encode(p, add_special_tokens=False).ids + ([eos] if eos is not None else []) for p in prompts]
    outs: list[Out] = []
    if opts.num_beams > 1:
        for p, src in enumerate(sources):
            t0 = time.perf_counter()
            beams = beam_search(conditioned(model, [src]), [start], num_beams=opts.num_beams, max_new_tokens=opts.max_new_tokens,
                                length_penalty=opts.length_penalty, stop_tokens=stops, num_return_sequences=opts.num_samples)
            speed = sum(len(b) for b in beams) / (time.perf_counter() - t0)
            lls = target_logprobs(model, [src] * len(beams), beams, start_id=start)
            outs += [(p, s, b, ll, speed) for s, (b, ll) in enumerate(zip(beams, lls))]
    else:
        pairs = [(p, s) for p in range(len(sources)) for s in range(opts.num_samples)]
        for i in range(0, len(pairs), opts.batch_size):
            chunk = pairs[i : i + opts.batch_size]
            t0 = time.perf_counter()
            new = generate_batch(conditioned(model, [sources[p] for p, _ in chunk]), [[start]] * len(chunk),
                                 max_new_tokens=opts.max_new_tokens, temperature=opts.temperature, top_k=opts.top_k,
                                 top_p=opts.top_p, repetition_penalty=opts.repetition_penalty, stop_tokens=stops,
                                 seed=None if opts.seed is None else [row_seed(opts.seed, p, s) for p, s in chunk])
            speed = sum(len(n) for n in new) / (time.perf_counter() - t0)
            lls = target_logprobs(model, [sources[p] for p, _ in chunk], new, start_id=start)
            outs += [(p, s, n, ll, speed) for (p, s), n, ll in zip(chunk, new, lls)]
    return [{"prompt": prompts[p], "sample": s, **opts.table_params(),  # the end and start tokens are no text
             "completion": tokenizer.decode([t for t in new if t not in (eos, start)], skip_special_tokens=False),
             "new_tokens": len(new),
             "log_likelihood": ll, "tokens_per_s": speed} for p, s, new, ll, speed in outs]
