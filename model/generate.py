"""Autoregressive generation as a few small functions: `prefill`, `decode_one_token`, `generate`.

The engine sees only token ids (the tokenizer lives elsewhere). Each prompt is
prefilled once into a KV cache; its samples then decode together as a batch
that shares the prompt. `temperature == 0` is greedy decoding.
"""

from __future__ import annotations

import torch

from model.gpt import GPT
from model.kv_cache import KVCache


def sample_next(logits: torch.Tensor, *, temperature: float, top_k: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """logits: (B, vocab) -> next ids (B,)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def prefill(model: GPT, prompt: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """prompt: (B, T) -> logits of the last position (B, vocab)."""
    return model(prompt, kv_cache=cache)[:, -1, :]


@torch.no_grad()
def decode_one_token(model: GPT, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """token: (B,) -> logits for the next position (B, vocab)."""
    return model(token[:, None], kv_cache=cache)[:, -1, :]


@torch.no_grad()
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
) -> list[list[int]]:
    """Complete one prompt `num_samples` times; returns the new tokens of each sample."""
    assert prompt, "prompt must contain at least one token"
    model.eval()
    device = next(model.parameters()).device
    cfg = model.config
    total = len(prompt) + max_new_tokens
    if cfg.pos_encoding == "learned":
        assert total <= cfg.max_seq_len, f"prompt + max_new_tokens = {total} exceeds max_seq_len {cfg.max_seq_len}"
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    idx = torch.tensor([prompt] * num_samples, dtype=torch.long, device=device)  # (S, T)
    cache = KVCache(n_layer=cfg.n_layer, batch_size=num_samples, n_head=cfg.n_head, head_dim=cfg.head_dim,
                    max_len=total, device=device, dtype=next(model.parameters()).dtype) if use_cache else None
    logits = prefill(model, idx, cache) if cache else model(idx)[:, -1, :]
    out: list[torch.Tensor] = []
    done = torch.zeros(num_samples, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature=temperature, top_k=top_k, generator=gen)  # (S,)
        out.append(nxt)
        if stop_token is not None:
            done |= nxt == stop_token
            if bool(done.all()):
                break
        if cache is not None:
            logits = decode_one_token(model, nxt, cache)
        else:  # reference path: the full forward over everything so far
            idx = torch.cat([idx, nxt[:, None]], dim=1)
            logits = model(idx)[:, -1, :]
    tokens = torch.stack(out, dim=1).tolist()  # (S, new)
    if stop_token is not None:  # cut each sample after its stop token
        tokens = [t[: t.index(stop_token) + 1] if stop_token in t else t for t in tokens]
    return tokens
