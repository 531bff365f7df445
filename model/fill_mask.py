"""Fill-mask for the encoder family: the top-k tokens, with probabilities, at each mask position of a prompt.

The encoder sees the whole prompt at once (no KV cache, nothing sampled): one
forward pass per batch of right-padded prompts, a softmax at the mask positions
only. Token ids in, token ids out, as for decoding; the caller tokenizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.generation import right_pad
from model.gpt import GPT


@dataclass(frozen=True)
class Prediction:
    """One candidate at one mask position."""
    token_id: int
    prob: float


@torch.inference_mode()
def fill_mask(model: GPT, prompts: list[list[int]], *, mask_id: int, top_k: int = 5,
              batch_size: int = 16) -> list[list[list[Prediction]]]:
    """For each prompt, for each of its mask positions (left to right), the `top_k` most likely tokens."""
    assert model.config.family == "encoder", "fill-mask needs an encoder (ModelConfig.family = 'encoder')"
    assert top_k >= 1, f"top_k must be >= 1, got {top_k}"
    for i, p in enumerate(prompts):
        assert p and model.supports_length(len(p)), f"prompt {i} has {len(p)} tokens; the model takes 1..{model.config.max_seq_len}"
    device = next(model.parameters()).device
    out: list[list[list[Prediction]]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        idx, real = right_pad(chunk, device)  # (B, T) each
        h = model.hidden_states(idx, attention_mask=real)  # (B, T, C)
        for row, p in enumerate(chunk):
            where = torch.tensor([i for i, t in enumerate(p) if t == mask_id], dtype=torch.long, device=device)
            if not len(where):
                out.append([])
                continue
            probs = model.unembed(h[row, where]).float().softmax(-1)  # (masks, vocab)
            top = probs.topk(min(top_k, probs.size(-1)), dim=-1)
            out.append([[Prediction(int(t), float(v)) for t, v in zip(ids.tolist(), vals.tolist())]
                        for ids, vals in zip(top.indices, top.values)])
    return out
