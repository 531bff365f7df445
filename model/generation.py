"""Autoregressive generation as a few small functions: `prefill`, `decode_one_token`, `generate`.

The engine sees only token ids (the tokenizer lives elsewhere). Prompts of
different lengths decode together as one left-padded batch: the padding is never
attended and each row's positions start at its first real token, so a batched
prompt gets the same tokens as the prompt alone. Sampled rows too: each row has
its own budget and its own seeded random stream, and leaves the batch when it
stops, so what a row samples never depends on its neighbours. The KV cache is
preallocated and written in place; only the last position is unembedded. The sampler applies, in
Hugging Face's order, repetition penalty, temperature, top-k and top-p;
`temperature == 0` is greedy. `beam_search` is separate: it keeps `num_beams`
hypotheses and reorders the cache rows after every token. `SamplingOptions`
gathers these settings in one validated value (the `decode` config section,
`llmpipe generate` and the served model all build one).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from model.gpt import GPT
from model.kv_cache import KVCache


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
    """Sampling seed (null: unseeded); each (prompt, sample) draws from its own stream derived from it."""
    batch_size: int = field(default=16, metadata={"fingerprint": False})
    """Sequences decoded together (left-padded) per forward pass; changes the speed, never a completion."""

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
    return model.unembed(model.hidden_states(prompt, kv_cache=cache, attention_mask=attention_mask)[:, -1])


@torch.inference_mode()
def decode_one_token(model: GPT, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """token: (B,) -> logits for the next position (B, vocab)."""
    return model.unembed(model.hidden_states(token[:, None], kv_cache=cache)[:, -1])


class _Decoder:
    """The model stepped one token at a time over the rows still decoding; `keep` drops the rows that are done."""

    def __init__(self, model: GPT, idx: torch.Tensor, mask: torch.Tensor | None, max_len: int, *, use_cache: bool):
        use_cache = use_cache and getattr(model, "supports_kv_cache", True)  # XLNet recomputes its query stream
        self.model, self.use_cache = model, use_cache
        if use_cache:
            self.cache = KVCache.for_model(model, batch_size=idx.shape[0], max_len=max_len)
            self.logits = prefill(model, idx, self.cache, attention_mask=mask)  # (B, vocab)
        else:  # the reference path: a full forward over everything so far for every new token
            self.idx, self.mask = idx, mask
            self.logits = self._full_forward()

    def _full_forward(self) -> torch.Tensor:
        return self.model.unembed(self.model.hidden_states(self.idx, attention_mask=self.mask)[:, -1])

    def keep(self, rows: torch.Tensor) -> None:
        """Keep the rows `rows` (B',) of the batch, in that order."""
        if self.use_cache:
            self.cache.reorder(rows)
        else:
            self.idx = self.idx.index_select(0, rows)
            self.mask = self.mask.index_select(0, rows) if self.mask is not None else None

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """token: (B,) -> logits for the next position (B, vocab)."""
        if self.use_cache:
            return decode_one_token(self.model, token, self.cache)
        self.idx = torch.cat([self.idx, token[:, None]], dim=1)
        if self.mask is not None:
            self.mask = torch.cat([self.mask, torch.ones_like(token)[:, None]], dim=1)
        return self._full_forward()


def left_pad(prompts: list[list[int]], device: torch.device, *, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids (B, T) right-aligned, and the attention mask (B, T) (None when all prompts have one length)."""
    assert prompts and all(prompts), "every prompt must contain at least one token"
    T = max(len(p) for p in prompts)
    idx = torch.tensor([[pad_id] * (T - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    if all(len(p) == T for p in prompts):
        return idx, None
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long, device=device)
    return idx, mask


def right_pad(seqs: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, T) left-aligned and padded with 0, and the mask (B, T), 0 at padding (an encoder's inputs)."""
    T = max(len(s) for s in seqs)
    idx = torch.zeros(len(seqs), T, dtype=torch.long, device=device)
    mask = torch.zeros(len(seqs), T, dtype=torch.long, device=device)
    for row, s in enumerate(seqs):
        idx[row, : len(s)] = torch.tensor(s, device=device)
        mask[row, : len(s)] = 1
    return idx, mask


def _check_length(model: GPT, total: int) -> None:
    cfg = model.config
    if cfg.pos_encoding == "learned":
        assert total <= cfg.max_seq_len, f"prompt + max_new_tokens = {total} exceeds max_seq_len {cfg.max_seq_len}"


def row_seed(seed: int, *key: int) -> int:
    """The seed of one row's random stream, a pure function of (seed, *key): e.g. (seed, prompt, sample)."""
    digest = hashlib.sha256(repr((seed, *key)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: any value torch's manual_seed takes


def _row_generators(seed: int | Sequence[int] | None, B: int, device: torch.device) -> list[torch.Generator] | None:
    if seed is None:
        return None
    seeds = list(seed) if isinstance(seed, Sequence) else [row_seed(int(seed), row) for row in range(B)]
    assert len(seeds) == B, f"{len(seeds)} seeds for {B} prompts"
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def _sample_rows(logits: torch.Tensor, generators: list[torch.Generator] | None, **sampler: Any) -> torch.Tensor:
    """logits: (B, vocab) -> next ids (B,); row j draws from generators[j] alone, so its draw is its own."""
    if generators is None or sampler["temperature"] == 0.0:
        return sample_next(logits, generator=None, **sampler)
    return torch.cat([sample_next(logits[j : j + 1], generator=g, **sampler) for j, g in enumerate(generators)])


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
    max_new_tokens: int | Sequence[int],
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int | Sequence[int] | None = None,
    stop_tokens: Collection[int] | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """Complete prompts of any lengths as one left-padded batch; returns the new tokens of each prompt, each cut
    after its first stop token.

    Every row is decoded on its own terms, so its tokens do not depend on its neighbours in the batch: its budget
    (`max_new_tokens`: one for all rows or one per row), its random stream (`seed`: one per row, or one seed from
    which row r's is `row_seed(seed, r)`; None draws from torch's global generator), and it leaves the batch when
    it stops or its budget is spent. Decoding ends when no row is left."""
    B = len(prompts)
    budgets = [max_new_tokens] * B if isinstance(max_new_tokens, int) else list(max_new_tokens)
    assert len(budgets) == B and min(budgets) > 0, f"max_new_tokens must be > 0 for each of {B} rows, got {max_new_tokens}"
    model.eval()
    device = next(model.parameters()).device
    idx, mask = left_pad(prompts, device)  # (B, T), (B, T) | None
    _check_length(model, max(len(p) + n for p, n in zip(prompts, budgets)))
    generators = _row_generators(seed, B, device)
    sampler = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    stops = set(stop_tokens or ())
    seen = None
    if repetition_penalty != 1.0:  # which tokens each row has seen so far (its prompt, not the padding)
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, idx, True if mask is None else mask.bool())
    decoder = _Decoder(model, idx, mask, idx.shape[1] + max(budgets), use_cache=use_cache)
    logits, active = decoder.logits, list(range(B))  # active: the batch rows still decoding, in order
    out: list[list[int]] = [[] for _ in range(B)]
    while True:
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        gens = [generators[r] for r in active] if generators is not None else None
        nxt = _sample_rows(logits, gens, **sampler)  # (len(active),)
        keep = []
        for j, (row, token) in enumerate(zip(active, nxt.tolist())):
            out[row].append(token)
            if token not in stops and len(out[row]) < budgets[row]:
                keep.append(j)
        if not keep:
            return out
        if len(keep) < len(active):
            rows = torch.tensor(keep, device=device)
            active, nxt = [active[j] for j in keep], nxt.index_select(0, rows)
            seen = seen.index_select(0, rows) if seen is not None else None
            decoder.keep(rows)
        if seen is not None:
            seen.scatter_(1, nxt[:, None], True)
        logits = decoder.step(nxt)


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
    if not getattr(model, "supports_kv_cache", True):
        raise ValueError(f"beam search reorders a KV cache, which {type(model).__name__} has none of: use greedy or "
                         "sampled decoding")
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
