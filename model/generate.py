"""Autoregressive generation as a few small functions: `prefill`, `decode_one_token`, `generate`.

The engine sees only token ids (the tokenizer lives elsewhere). Prompts of
different lengths decode together as one left-padded batch: the padding is never
attended and each row's positions start at its first real token, so a batched
prompt gets the same tokens as the prompt alone. The KV cache is preallocated and
written in place; only the last position is unembedded. The sampler applies, in
Hugging Face's order, repetition penalty, temperature, top-k and top-p;
`temperature == 0` is greedy. `beam_search` is separate: it keeps `num_beams`
hypotheses and reorders the cache rows after every token. `SamplingOptions`
gathers these settings in one validated value (the `decode` config section,
`llmpipe generate` and the served model all build one).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import torch

from model.gpt import GPT
from model.kv_cache import KVCache

Step = Callable[[torch.Tensor], torch.Tensor]  # next tokens (B,) -> logits (B, vocab)


@dataclass(frozen=True)
class SamplingOptions:
    """How to decode: sampling or beam search; also the sampling fields of the pipeline's `decode` section."""

    # Read by pydantic when the pipeline validates a config (a plain dict: this module does not import pydantic).
    __pydantic_config__ = {"extra": "forbid", "use_attribute_docstrings": True, "allow_inf_nan": False}

    max_new_tokens: int = 64
    """Tokens generated per sample."""
    temperature: float = 0.8
    """Softmax temperature; 0 means greedy."""
    top_k: int | None = 50
    """Sample from the k most likely tokens (null: all)."""
    top_p: float | None = None
    """Nucleus sampling: the smallest set of tokens holding this probability mass."""
    repetition_penalty: float = 1.0
    """CTRL's penalty on tokens already seen (1 = off)."""
    num_beams: int = 1
    """Beam search with this many beams when > 1 (temperature, top-k/p and repetition penalty are then unused)."""
    length_penalty: float = 1.0
    """Beam search: a finished beam scores log-prob / new_tokens ** length_penalty."""
    num_samples: int = 1
    """Samples per prompt (with beam search: the best num_samples beams)."""
    seed: int | None = 0
    """Sampling seed (null: unseeded)."""
    batch_size: int = field(default=16, metadata={"fingerprint": False})
    """Sequences decoded together (left-padded) per forward pass."""

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "num_beams", "num_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"SamplingOptions.{name}: must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"SamplingOptions.temperature: must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"SamplingOptions.top_k: must be >= 1 or null, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingOptions.top_p: must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"SamplingOptions.repetition_penalty: must be > 0, got {self.repetition_penalty}")
        if self.num_beams > 1 and self.num_samples > self.num_beams:
            raise ValueError(f"SamplingOptions.num_samples: {self.num_samples} exceeds num_beams ({self.num_beams}) "
                             "with beam search")

    def table_params(self) -> dict[str, Any]:
        """The sampling parameters as table columns (no None: MLflow tables want one type per column)."""
        return {"temperature": self.temperature, "top_k": self.top_k or 0, "top_p": self.top_p or 1.0,
                "repetition_penalty": self.repetition_penalty, "num_beams": self.num_beams}


# --- the sampler ---------------------------------------------------------------------

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019): divide a seen token's positive logit by `penalty`, multiply a negative one."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample_next(logits: torch.Tensor, *, temperature: float, top_k: int | None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: (B, vocab) -> next ids (B,)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Keep the smallest prefix of the sorted distribution whose mass reaches top_p (always the first token).
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, vocab)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop_sorted = probs.cumsum(dim=-1) - probs > top_p
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# --- model steps -----------------------------------------------------------------------

@torch.inference_mode()
def prefill(model: GPT, prompt: torch.Tensor, cache: KVCache, *, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """prompt: (B, T), left-padded where attention_mask is 0 -> logits of the last position (B, vocab)."""
    return model.lm_head(model.hidden_states(prompt, kv_cache=cache, attention_mask=attention_mask)[:, -1])


@torch.inference_mode()
def decode_one_token(model: GPT, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """token: (B,) -> logits for the next position (B, vocab)."""
    return model.lm_head(model.hidden_states(token[:, None], kv_cache=cache)[:, -1])


def _cached_decoder(model: GPT, idx: torch.Tensor, mask: torch.Tensor | None, max_len: int) -> tuple[torch.Tensor, Step]:
    cache = KVCache.for_model(model, batch_size=idx.shape[0], max_len=max_len)
    return prefill(model, idx, cache, attention_mask=mask), lambda token: decode_one_token(model, token, cache)


def _full_forward_decoder(model: GPT, idx: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, Step]:
    """The reference path: a full forward over everything so far for every new token (no cache)."""
    state = {"idx": idx, "mask": mask}

    def logits() -> torch.Tensor:
        return model.lm_head(model.hidden_states(state["idx"], attention_mask=state["mask"])[:, -1])

    def step(token: torch.Tensor) -> torch.Tensor:
        state["idx"] = torch.cat([state["idx"], token[:, None]], dim=1)
        if state["mask"] is not None:
            state["mask"] = torch.cat([state["mask"], torch.ones_like(token)[:, None]], dim=1)
        return logits()

    return logits(), step


def left_pad(prompts: list[list[int]], device: torch.device, *, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids (B, T) right-aligned, and the attention mask (B, T) (None when all prompts have one length)."""
    assert prompts and all(prompts), "every prompt must contain at least one token"
    T = max(len(p) for p in prompts)
    idx = torch.tensor([[pad_id] * (T - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    if all(len(p) == T for p in prompts):
        return idx, None
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long, device=device)
    return idx, mask


def _check_length(model: GPT, total: int) -> None:
    cfg = model.config
    if cfg.pos_encoding == "learned":
        assert total <= cfg.max_seq_len, f"prompt + max_new_tokens = {total} exceeds max_seq_len {cfg.max_seq_len}"


# --- sampling and greedy decoding --------------------------------------------------------

def generate(
    model: GPT,
    prompt: list[int],
    *,
    max_new_tokens: int,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    stop_token: int | None = None,
    use_cache: bool = True,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_tokens: Collection[int] | None = None,
) -> list[list[int]]:
    """Complete one prompt `num_samples` times; returns the new tokens of each sample (each cut after a stop token)."""
    stops = set(stop_tokens or ()) | ({stop_token} if stop_token is not None else set())
    return generate_batch(model, [prompt] * num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed,
                          stop_tokens=stops or None, use_cache=use_cache)


@torch.inference_mode()
def generate_batch(
    model: GPT,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop_tokens: Collection[int] | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """Complete prompts of any lengths as one left-padded batch; returns the new tokens of each prompt,
    each cut after its first stop token. Decoding ends when every row has stopped or after max_new_tokens."""
    assert max_new_tokens > 0, f"max_new_tokens must be > 0, got {max_new_tokens}"
    model.eval()
    device = next(model.parameters()).device
    idx, mask = left_pad(prompts, device)  # (B, T), (B, T) | None
    B, T = idx.shape
    _check_length(model, T + max_new_tokens)
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stop = torch.tensor(sorted(stop_tokens), device=device) if stop_tokens else None
    seen = None
    if repetition_penalty != 1.0:  # which tokens each row has seen so far (its prompt, not the padding)
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, idx, True if mask is None else mask.bool())
    logits, step = _cached_decoder(model, idx, mask, T + max_new_tokens) if use_cache else _full_forward_decoder(model, idx, mask)
    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    n = 0
    for i in range(max_new_tokens):
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)  # (B,)
        out[:, i] = nxt
        n = i + 1
        if stop is not None:
            done |= torch.isin(nxt, stop)
            if bool(done.all()):
                break
        if n == max_new_tokens:
            break
        if seen is not None:
            seen.scatter_(1, nxt[:, None], True)
        logits = step(nxt)
    return _cut_at_stop(out[:, :n].tolist(), stop_tokens)


def _cut_at_stop(rows: list[list[int]], stop_tokens: Collection[int] | None) -> list[list[int]]:
    if not stop_tokens:
        return rows
    cut = []
    for row in rows:
        end = next((i + 1 for i, t in enumerate(row) if t in stop_tokens), len(row))
        cut.append(row[:end])
    return cut


# --- beam search -----------------------------------------------------------------------

@torch.inference_mode()
def beam_search(model: GPT, prompt: list[int], *, num_beams: int, max_new_tokens: int, length_penalty: float = 1.0,
                stop_tokens: Collection[int] | None = None, num_return_sequences: int = 1) -> list[list[int]]:
    """The `num_return_sequences` best continuations of one prompt by beam search, best first.

    A hypothesis ending in a stop token is finished and scored by its summed log-probability divided by
    (new tokens) ** length_penalty; the search stops when `num_beams` hypotheses are finished and no open
    beam scores better at its current length (Hugging Face's default, early_stopping=False), or at
    max_new_tokens, where the open beams are finished too."""
    assert 1 <= num_return_sequences <= num_beams, f"num_return_sequences {num_return_sequences} must be in [1, {num_beams}]"
    model.eval()
    device = next(model.parameters()).device
    _check_length(model, len(prompt) + max_new_tokens)
    K, stops = num_beams, set(stop_tokens or ())
    cache = KVCache.for_model(model, batch_size=K, max_len=len(prompt) + max_new_tokens)
    logits = prefill(model, torch.tensor([prompt] * K, device=device), cache)  # (K, vocab)
    scores = torch.full((K,), float("-inf"), device=device)
    scores[0] = 0.0  # the K beams start identical: only one may expand, or the first step picks K copies
    beams: list[list[int]] = [[] for _ in range(K)]
    finished: list[tuple[float, list[int]]] = []
    for i in range(max_new_tokens):
        candidates = (scores[:, None] + torch.log_softmax(logits.float(), dim=-1)).view(-1)  # (K * vocab,)
        top_scores, top_ids = candidates.topk(2 * K)  # 2K: K open beams survive even if K candidates stop
        kept: list[tuple[int, int, float]] = []  # (beam row, token, summed log-probability)
        for rank, (s, flat) in enumerate(zip(top_scores.tolist(), top_ids.tolist())):
            row, token = divmod(flat, logits.size(-1))
            if token in stops:
                if rank < K:  # as Hugging Face: a stopped candidate counts only among the top K
                    finished.append((s / (i + 1) ** length_penalty, beams[row] + [token]))
            elif len(kept) < K:
                kept.append((row, token, s))
        finished = sorted(finished, key=lambda f: -f[0])[:K]
        if not kept:  # every candidate stopped
            break
        beams = [beams[row] + [token] for row, token, _ in kept]
        best_open = kept[0][2] / (i + 1) ** length_penalty
        if i + 1 == max_new_tokens or (len(finished) == K and best_open <= finished[-1][0]):
            finished += [(s / (i + 1) ** length_penalty, b) for (_, _, s), b in zip(kept, beams)]
            break
        scores = torch.tensor([s for _, _, s in kept], device=device)
        cache.reorder(torch.tensor([row for row, _, _ in kept], device=device))
        logits = decode_one_token(model, torch.tensor([token for _, token, _ in kept], device=device), cache)
    return [b for _, b in sorted(finished, key=lambda f: -f[0])[:num_return_sequences]]
