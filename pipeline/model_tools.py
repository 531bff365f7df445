"""The command line's tools for a trained model: `llmpipe generate` and `llmpipe export-hf`.

Each takes a stage folder, an MLflow run id or (generate) a config whose train stage is committed, resolved by
`pipeline.tracking.lookup` / `pipeline.artifacts`, and dispatches on the model's family: a decoder completes
prompts (with retrieval when asked), an encoder fills masks, an encoder-decoder answers prompts as sources;
export writes GPT-2, LLaMA, BERT, RoBERTa or T5 folders. Errors a user can fix are `ConfigError` /
`TargetError`, which the CLI prints as one line.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from model.generation import SamplingOptions
from pipeline.errors import ConfigError, TargetError


def generate(args: argparse.Namespace) -> None:
    """`llmpipe generate`: a decoder completes, an encoder fills masks, an encoder-decoder answers."""
    import torch

    from model import load_model
    from pipeline.artifacts import committed_dirs
    from pipeline.completion import transduce
    from pipeline.rag import complete_with_retrieval, open_retriever
    from pipeline.tracking.lookup import resolve_model_dir
    from tokenization.bpe import load_tokenizer

    try:
        opts = SamplingOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                               top_p=args.top_p, repetition_penalty=args.repetition_penalty, num_beams=args.num_beams,
                               length_penalty=args.length_penalty, num_samples=args.num_samples, seed=args.seed)
    except ValueError as e:
        raise ConfigError(f"generate: {e}") from None
    if args.retrieve is not None and args.retrieve < 1:
        raise ConfigError(f"generate --retrieve: must be >= 1, got {args.retrieve}")
    if args.target.endswith((".yaml", ".yml")) and Path(args.target).is_file():  # a config: its committed stages
        folder, index = committed_dirs(args.target, args.overrides)
        args.index = args.index or (str(index) if index else None)
    elif args.overrides:
        raise ConfigError(f"generate: overrides {args.overrides} need a config as TARGET")
    else:
        folder = resolve_model_dir(args.target, tracking_uri=args.tracking_uri)
    if args.retrieve and not args.index:
        raise ConfigError("generate --retrieve: retrieval needs an index: pass --index FOLDER (an index stage folder), "
                          "or a config with an `index:` section as TARGET")
    if args.index and not (Path(args.index) / "retriever.json").is_file():
        raise TargetError(f"generate --index: {args.index} is not an index stage folder (no retriever.json)")
    model, _ = load_model(folder, device="cuda" if torch.cuda.is_available() else "cpu")
    tok = load_tokenizer(folder / "tokenizer.json")
    if model.config.family == "encoder":
        _fill(model, tok, args)
        return
    if model.config.family == "xlnet" and (args.retrieve or args.num_beams > 1):
        raise ConfigError(f"generate {'--retrieve' if args.retrieve else '--num-beams'}: needs a decoder; an XLNet "
                          "decodes left to right without a KV cache (greedy or sampled)")
    if model.config.family == "encoder-decoder":
        if args.retrieve:
            raise ConfigError("generate --retrieve: retrieval needs a decoder")
        rows = transduce(model, tok, args.prompt, opts, eos_token=args.eos_token)
    else:
        retriever = open_retriever(args.index, model, tok) if args.retrieve else None
        rows = complete_with_retrieval(model, tok, retriever, args.prompt, opts, k=args.retrieve,
                                       eos_token=args.eos_token, key="generate --retrieve")
    for r in rows:
        print(f"--- prompt {r['prompt']!r}, sample {r['sample']}: {r['new_tokens']} tokens, "
              f"log-likelihood {r['log_likelihood']:.2f}, {r['tokens_per_s']:.0f} tokens/s")
        for src in r.get("sources", []):
            print(f"    source: passage {src['passage_id']} {src['file']}:{src['line']} (score {src['score']:.3f})")
        print(r["prompt"] + r["completion"] if model.config.family in ("decoder", "xlnet")
              else f"{r['prompt']}\n=> {r['completion']}")


def _fill(model: Any, tok: Any, args: argparse.Namespace) -> None:
    """`generate` with an encoder: each prompt's masks filled in, with the top-k candidates at each."""
    from pipeline.completion import fill_masks

    if args.retrieve:
        raise ConfigError("generate --retrieve: an encoder fills masks; retrieval needs a decoder")
    try:
        rows = fill_masks(model, tok, args.prompt, mask_token=args.mask_token, top_k=args.top_k or 5)
    except ValueError as e:
        raise ConfigError(f"generate --prompt: {e}") from None
    for r in rows:
        print(f"--- prompt {r['prompt']!r}: {r['completion']!r}")
        for n, at in enumerate(r["predictions"], 1):
            print(f"    mask {n}: " + ", ".join(f"{c['token']!r} {c['prob']:.3f}" for c in at))


def export_hf(args: argparse.Namespace) -> None:
    """`llmpipe export-hf`: the model (and a LoRA adapter in PEFT's format) as a Hugging Face folder."""
    from model import export_hf, load_model
    from model.hf import export_peft_adapter, hf_family
    from pipeline.stages.train.lora import base_model, read_adapter
    from pipeline.tracking.lookup import resolve_model_dir
    from tokenization.bpe import load_tokenizer

    folder = resolve_model_dir(args.target, tracking_uri=args.tracking_uri)
    model, _ = load_model(folder)
    try:
        family = hf_family(model.config)
    except ValueError as e:
        raise TargetError(f"export-hf: {folder}: {e}") from None
    tok = load_tokenizer(folder / "tokenizer.json")
    eos = tok.token_to_id(args.eos_token)
    adapter = None if args.merge else read_adapter(folder)
    if family == "bert":  # an encoder: BERT or RoBERTa, with its padding and mask tokens
        if adapter is not None:
            raise TargetError(f"export-hf: {folder}: an encoder's LoRA model is exported merged only: pass --merge")
        family = args.encoder_type
        try:
            export_hf(model, args.out, tokenizer=folder / "tokenizer.json", eos_token_id=eos, encoder_type=family,
                      pad_token_id=tok.token_to_id(args.pad_token), mask_token_id=tok.token_to_id(args.mask_token))
        except ValueError as e:
            raise TargetError(f"export-hf: {folder}: {e}") from None
    elif family == "t5":  # T5's decoder starts from the padding token
        if adapter is not None:
            raise TargetError(f"export-hf: {folder}: an encoder-decoder's LoRA model is exported merged only: pass --merge")
        export_hf(model, args.out, tokenizer=folder / "tokenizer.json", eos_token_id=eos,
                  pad_token_id=tok.token_to_id(args.pad_token))
    elif adapter is None:  # a fully fine-tuned model, or --merge: model.safetensors holds the merged weights
        export_hf(model, args.out, tokenizer=folder / "tokenizer.json", eos_token_id=eos)
    if adapter is None:
        print(f"exported {folder} as a Hugging Face {family} model to {args.out}")
        return
    tensors, meta = adapter
    export_hf(base_model(model.config, meta, folder), args.out, tokenizer=folder / "tokenizer.json", eos_token_id=eos)
    export_peft_adapter(tensors, model.config, Path(args.out) / "adapter", r=meta["r"], alpha=meta["alpha"],
                        dropout=meta["dropout"], base=str(Path(args.out).resolve()))
    print(f"exported the base of {folder} as a Hugging Face {family} model to {args.out}, and its LoRA adapter in "
          f"PEFT's format to {Path(args.out) / 'adapter'} (--merge: the merged weights instead)")
