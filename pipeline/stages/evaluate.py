"""Stage `evaluate`: validation loss, perplexity, bits per byte, token accuracy, and a length sweep.

The scoring itself is `model.scoring` (see there for what each metric means);
this stage opens the trained model and the prepared validation shards on the
task's node, runs the sweep as one Ray task (a GPU one when the cluster has
GPUs), writes `eval.json` and two plots, and logs the headline metrics and the
loss-by-position curves to MLflow. `evaluate_model` is the same work without Ray.

With `evaluate.retrieve` set the stage also reads the `index` stage and scores
validation documents with and without retrieved passages in front
(`pipeline.rag.rag_evaluate`, never retrieving a document's own passages):
`rag/...` metrics and `eval.json`'s `rag` part. Unset, the section (hence the
fingerprint) is exactly what it was before retrieval existed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from model.scoring import (
    EvalOptions,
    NoWindowError,
    part_metrics,
    sweep,
    unigram_logprobs,
)
from pipeline.artifacts import MODEL_FILES
from pipeline.cluster.resources import task_options
from pipeline.engine.stage import Stage, StageContext
from pipeline.engine.store import StageRef
from pipeline.errors import ConfigError
from pipeline.fingerprints import as_dict, fingerprint_view
from pipeline.objectives import (
    Objective,
    objective_from_ids,
    objective_ids,
    objective_metrics,
    objective_sweep,
    pairs_scores,
)
from pipeline.plots import line_chart
from pipeline.rag import check_k
from pipeline.schema import Config
from tokenization.inputs import InputError
from tokenization.pairs import TaskPairs
from tokenization.shards import shard_paths


def _section(cfg: Config) -> dict[str, Any]:
    section = fingerprint_view(cfg.evaluate)
    if section.get("retrieve", ...) is None:  # retrieval off: the fingerprint of a config that never heard of it
        del section["retrieve"]
    return section


def _extra_needs(cfg: Config) -> tuple[str, ...]:
    if cfg.evaluate.retrieve is None:
        return ()
    if cfg.index is None:
        raise ConfigError("evaluate.retrieve: retrieval needs a knowledge index: add an `index:` section (index.inputs)")
    return ("index",)


def evaluate_model(model_dir: str, val_shards: list[str], train_shards: list[str], *, train_seq_len: int,
                   opts: EvalOptions, packing: str = "stream", index_dir: str | None = None,
                   eos_token: str | None = None, sources: dict[str, list[str]] | None = None,
                   objective: Objective | None = None, seq2seq: dict[str, int] | None = None) -> dict[str, Any]:
    """The whole stage's work as a plain function (no Ray): load, score, return eval.json's content.
    packing: the model's `train.packing`; `documents` scores each window within its documents, as it trained.
    With `opts.retrieve` and the folder of an `index` stage, also the retrieval-augmented scores (`rag`).
    sources: a data mixture's validation shards by source, each also scored alone (`val_loss_<source>`).
    An encoder or an encoder-decoder is scored on its `objective` by `objective_sweep` instead (masked-LM or
    span-corruption loss and accuracy by length); seq2seq ({"eos_id", "start_id"}: an encoder-decoder trained on
    prompt/completion records) by `pairs_scores` (loss, token accuracy and exact match on the validation pairs)."""
    from model import load_model
    from tokenization.bpe import load_tokenizer, token_byte_lengths
    from tokenization.shards import (
        read_document_starts,
        read_documents,
        read_loss_mask,
        read_tokens,
    )

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = load_model(model_dir, device=device)
    tok = load_tokenizer(f"{model_dir}/tokenizer.json")
    byte_lengths = token_byte_lengths(tok)
    kept = [(p, b) for p, b in ((p, read_tokens(p)) for p in val_shards) if len(b)]
    val = [b for _, b in kept]
    if seq2seq is not None:  # an encoder-decoder trained on records: loss and exact match on the validation pairs
        pairs = TaskPairs(val_shards, max_source=train_seq_len, max_target=train_seq_len, **seq2seq)
        return pairs_scores(model, pairs, max_tokens=opts.max_tokens, batch_size=opts.batch_size)
    if model.config.family in ("encoder", "encoder-decoder"):
        assert objective is not None, f"an {model.config.family} is evaluated on its training objective"
        unigram = unigram_logprobs([read_tokens(p) for p in train_shards], model.config.vocab_size)
        return objective_sweep(model, val, train_seq_len=train_seq_len, opts=opts, objective=objective, unigram_logp=unigram)
    doc_starts = [read_document_starts(p) for p, _ in kept] if packing == "documents" else None
    masks = [read_loss_mask(p) for p, _ in kept]  # task data: score the completion tokens only
    masks = masks if masks and all(m is not None for m in masks) else None
    unigram = unigram_logprobs([read_tokens(p) for p in train_shards], model.config.vocab_size)
    result = sweep(model, val, train_seq_len=train_seq_len, opts=opts, byte_lengths=byte_lengths, unigram_logp=unigram,
                   doc_starts=doc_starts, masks=masks)
    if objective is not None:  # XLNet: read left to right above; its own objective at the training length too
        result["metrics"] |= objective_metrics(model, val, T=train_seq_len, opts=opts, objective=objective)
    if sources:
        index = {p: i for i, (p, _) in enumerate(kept)}
        rows = {name: [index[p] for p in paths if p in index] for name, paths in sources.items()}
        result["metrics"].update(part_metrics(
            model, {name: [val[i] for i in ix] for name, ix in rows.items()}, train_seq_len=train_seq_len, opts=opts,
            byte_lengths=byte_lengths, doc_starts={n: [doc_starts[i] for i in ix] for n, ix in rows.items()} if doc_starts else None,
            masks={n: [masks[i] for i in ix] for n, ix in rows.items()} if masks else None))
    retrieve = getattr(opts, "retrieve", None)
    if retrieve is not None and index_dir is not None:
        from pipeline.rag import open_retriever, rag_evaluate

        docs = [d for p in val_shards for d in read_documents(p)]
        rag = rag_evaluate(model, tok, open_retriever(index_dir, model, tok), docs, opts=retrieve,
                           context=min(train_seq_len, model.config.max_seq_len),
                           eos_id=tok.token_to_id(eos_token) if eos_token else None, byte_lengths=byte_lengths,
                           batch_size=opts.batch_size)
        result["metrics"].update(rag["metrics"])
        result["rag"] = rag
    return result


def plot(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """extrapolation.png (perplexity by context length, one line per RoPE scaling, and for a segment-memory model
    with its memory and by sliding windows) and loss_by_position.png (loss by position within the window, one line
    per length, and the longest length with memory and sliding); for an encoder,
    masked_lm.png (masked-token accuracy by context length), for an encoder-decoder span_corruption.png."""
    if result.get("metric") == "seq2seq":
        return []  # no lengths to draw: eval.json holds the first answers beside their targets
    if result.get("family") in ("encoder", "encoder-decoder"):
        m = result["metric"]
        path = out_dir / ("masked_lm.png" if m == "mlm" else "span_corruption.png")
        line_chart(path, {"accuracy": [(r["context"], r[f"{m}_accuracy"]) for r in result["lengths"] if r["supported"]]},
                   title=f"{'masked' if m == 'mlm' else 'span'}-token accuracy by context (trained at {result['train_seq_len']})",
                   x_label="context (tokens)", y_label="accuracy", log_x=True, log_y=False)
        return [path]
    ok = [r for r in result["lengths"] if r["supported"]]
    memory_rows = result.get("memory", {})
    series = {"one window" if memory_rows else "none": [(r["context"], r["ppl"]) for r in ok]}
    for kind, rows in result["rope_scaled"].items():  # scaled lines start from the unscaled value at the context
        series[kind] = [(r["context"], r["ppl"]) for r in ok if r["multiplier"] == 1.0] + [(r["context"], r["ppl"]) for r in rows]
    for kind, rows in memory_rows.items():  # a segment-memory model read with its memory, or by sliding windows
        label = f"with its memory ({rows[0]['memory_len']})" if kind == "memory" else "sliding windows"
        series[label] = [(r["context"], r["ppl"]) for r in rows]
    bad = [r["context"] for r in result["lengths"] if not r["supported"]]
    paths = [out_dir / "extrapolation.png", out_dir / "loss_by_position.png"]
    line_chart(paths[0], series, title=f"validation perplexity by context (trained at {result['train_seq_len']})",
               x_label="context (tokens)", y_label="perplexity", log_x=True, log_y=True,
               note=f"unsupported (learned table): {bad}" if bad else "")
    curves = [(f"ctx {r['context']}", r) for r in ok]
    curves += [(f"ctx {r['context']} {kind}", r) for kind, rows in result.get("memory", {}).items() for r in rows[-1:]]
    by_pos = {name: [((a + b - 1) / 2, v) for a, b, v in zip(*r["loss_by_position"].values()) if v is not None]
              for name, r in curves}
    line_chart(paths[1], by_pos, title="validation loss by position within the window", x_label="position (tokens)",
               y_label="loss (nats)", log_x=False)
    return paths


def _log_position_curves(ctx: StageContext, result: dict[str, Any]) -> None:
    """`pos_loss_ctx_<T>` as MLflow step series (step = a bucket's first position), drawn as curves in the UI."""
    by_step: dict[int, dict[str, float]] = {}
    for r in result["lengths"]:
        if r["supported"] and "loss_by_position" in r:
            for start, _, v in zip(*r["loss_by_position"].values()):
                if v is not None:
                    by_step.setdefault(start, {})[f"pos_loss_ctx_{r['context']}"] = v
    for step, values in sorted(by_step.items()):
        ctx.tracker.log_metrics(ctx.run_id, values, step=step)


def _evaluate_task(train: StageRef, prepare: StageRef, index: StageRef | None = None, **kw: Any) -> dict[str, Any]:
    """On the task's node: open the model, the prepared data and the index (when retrieving) there, then evaluate."""
    folder = prepare.local()
    try:
        sources = {name: shard_paths(folder, split="val", source=name) for name in kw.pop("mixture", None) or ()}
        return evaluate_model(str(train.local(list(MODEL_FILES))), shard_paths(folder, split="val"),
                              shard_paths(folder, split="train"), index_dir=str(index.local()) if index else None,
                              sources=sources or None, **kw)
    except NoWindowError as e:
        raise InputError(str(e)) from None


def run(ctx: StageContext) -> dict[str, float]:
    import ray

    cfg = ctx.config
    vocab = int(ctx.inputs["tokenizer"].manifest["metrics"]["vocab_size"])
    ids = objective_ids(cfg, ctx.inputs["tokenizer"].file("tokenizer.json"))  # the tokenizer read once
    seq2seq = ids is not None and ids["kind"] == "seq2seq"
    task = ray.remote(_evaluate_task).options(**task_options(cfg.resources.evaluate, "evaluate"))
    if cfg.objective == "seq2seq":
        ctx.progress.update(status=f"scoring validation pairs (loss, greedy exact match) up to {cfg.evaluate.max_tokens} "
                                   "source tokens (one Ray task)")
    else:
        ctx.progress.update(status=f"scoring up to {cfg.evaluate.max_tokens} validation tokens at "
                                   f"{len(set(cfg.evaluate.context_multipliers) | {1.0})} context lengths (one Ray task)")
    index = ctx.inputs.get("index")
    if index is not None:  # a k the index cannot serve fails here, before the model is loaded
        check_k(json.loads(index.file("index.json").read_text())["passages"], cfg.evaluate.retrieve.k, "evaluate.retrieve.k")
        ctx.progress.update(status=f"scoring with and without {cfg.evaluate.retrieve.k} retrieved passages too")
    result = ray.get(task.remote(ctx.inputs["train"].ref, ctx.inputs["prepare"].ref, index.ref if index else None,
                                 train_seq_len=cfg.train_seq_len, opts=cfg.evaluate, packing=cfg.train.packing,
                                 eos_token=cfg.tokenizer.eos_token, mixture=list(cfg.data.mixture()),
                                 objective=objective_from_ids(ids, cfg.train.model_dump(mode="json"), vocab),
                                 seq2seq={k: ids[k] for k in ("eos_id", "start_id")} if seq2seq else None))
    (ctx.out_dir / "eval.json").write_text(json.dumps(result, indent=2))
    for path in [ctx.out_dir / "eval.json", *plot(result, ctx.out_dir)]:
        ctx.tracker.log_artifact(ctx.run_id, path)
    _log_position_curves(ctx, result)
    return result["metrics"]


STAGE = Stage(name="evaluate", needs=("tokenizer", "prepare", "train"), section=_section, version=2, run=run,
              input_context="evaluation", main_input="prepare", extra_needs=_extra_needs,
              params=lambda cfg: as_dict(cfg.evaluate))
