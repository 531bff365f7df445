"""What each model family trains on, and what it cannot do: the config's checks for encoders and encoder-decoders.

A decoder trains on next tokens (`causal_lm`), an encoder on masked tokens (`masked_lm`), an encoder-decoder on
span corruption over text or on source/target pairs of prompt/completion records (`seq2seq`); `train.objective`
may name the family's objective or leave it to the family. What only a decoder has (next-token scores over one
stream: packed documents, task accuracy, retrieval) and what only sampling has (beams, samples) are refused for
the others, each naming its key, before any work; so are an encoder's prompts without the mask token and too few
sentinels for span corruption, when the tokenizer is trained here (a given one is checked when it is read,
`pipeline.objectives`); so is a segment memory (`model.memory_len`) with anything that cuts its stream. Called by `pipeline.schema.Config` as a cross-check; it raises ValueError, which config
loading turns into one line.
"""

from __future__ import annotations

from typing import Any

# what each family trains on, its default first
OBJECTIVES = {"decoder": ("causal_lm",), "encoder": ("masked_lm",), "encoder-decoder": ("span_corruption", "seq2seq"),
              "xlnet": ("permutation_lm",)}


def objective_of(cfg: Any) -> str:
    """train.objective, or the family's own: seq2seq for an encoder-decoder on records, else the first above."""
    if cfg.train.objective:
        return cfg.train.objective
    if cfg.model.family == "encoder-decoder" and cfg.data.format != "text":
        return "seq2seq"
    return OBJECTIVES[cfg.model.family][0]


def check_family(cfg: Any) -> None:
    """A ValueError naming the key of the first thing this config's model family cannot do."""
    _check_objective(cfg)
    if cfg.model.family == "encoder":
        _check_fill_mask(cfg)
    if cfg.model.memory_len:
        _check_memory(cfg)
    if cfg.model.family != "decoder":
        for key, on in (("train.packing: documents", cfg.train.packing == "documents"),
                        ("decode.retrieve", cfg.decode.retrieve is not None),
                        ("evaluate.retrieve", cfg.evaluate.retrieve is not None), ("tasks", cfg.tasks is not None),
                        ("decode.num_beams", cfg.model.family == "xlnet" and cfg.decode.num_beams > 1)):
            if on:
                raise ValueError(f"{key} needs a decoder (model.family: decoder); an {cfg.model.family} model has no "
                                 "next-token scores over one stream" + (" with a KV cache" if cfg.model.family == "xlnet" else ""))


def _check_objective(cfg: Any) -> None:
    family, objective, fmt = cfg.model.family, objective_of(cfg), cfg.data.format
    if objective not in OBJECTIVES[family]:
        needs = next(f for f, o in OBJECTIVES.items() if objective in o)
        raise ValueError(f"train.objective {objective} needs model.family {needs}, got {family}")
    if (objective == "seq2seq") != (family == "encoder-decoder" and fmt != "text"):
        raise ValueError(f"train.objective {objective} with data.format {fmt}: an encoder-decoder trains seq2seq on "
                         "prompt_completion records and span_corruption on text")
    if objective == "seq2seq" and fmt != "prompt_completion":
        raise ValueError(f"data.format {fmt}: an encoder-decoder's seq2seq training reads prompt_completion records "
                         "(a prompt becomes the source, its completion the target)")
    if cfg.tokenizer.path is not None:
        return
    if objective == "span_corruption":
        _, spans = cfg.train.spans.shape(cfg.train_seq_len)
        if spans > cfg.tokenizer.sentinels:
            raise ValueError(f"tokenizer.sentinels: a window of {cfg.train_seq_len} tokens has {spans} spans with "
                             f"train.spans, so span corruption needs at least {spans} sentinel tokens, got "
                             f"{cfg.tokenizer.sentinels}")
    mask = cfg.train.masking.mask_token
    if objective == "masked_lm" and mask not in cfg.tokenizer.special_tokens:
        raise ValueError(f"train.masking.mask_token {mask!r} is not in tokenizer.special_tokens "
                         f"{cfg.tokenizer.special_tokens}: add it there")


def _check_memory(cfg: Any) -> None:
    """A segment memory trains on consecutive windows of one stream per batch row: nothing that cuts the stream
    otherwise (packed documents, a mixture's weighted draw)."""
    for key, on in (("train.packing: documents", cfg.train.packing == "documents"),
                    ("data.sources (a mixture)", bool(cfg.data.sources))):
        if on:
            raise ValueError(f"model.memory_len {cfg.model.memory_len} with {key}: a segment memory trains on "
                             "consecutive windows of one token stream per batch row")


def _check_fill_mask(cfg: Any) -> None:
    """Fill-mask is one forward pass: nothing is decoded, sampled or searched, and every prompt holds a mask."""
    for key, value in (("num_beams", cfg.decode.num_beams), ("num_samples", cfg.decode.num_samples)):
        if value != 1:
            raise ValueError(f"decode.{key} {value}: an encoder fills masks in one forward pass (the top_k candidates "
                             "at each); beams and samples need a decoder")
    mask = cfg.train.masking.mask_token
    for i, prompt in enumerate(cfg.decode.prompts if cfg.decode.prompts_file is None else ()):
        if mask not in prompt:
            raise ValueError(f"decode.prompts[{i}] has no {mask}: an encoder fills masks (put the mask token where a "
                             "word is missing)")
