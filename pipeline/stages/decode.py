"""Stage `decode`: complete the configured prompts with the trained model and record what came out.

Prompts come from `decode.prompts` or, when set, `decode.prompts_file` (whose
content, not only its path, enters the fingerprint). Every sampling option of
the model is available: greedy (`temperature: 0`), temperature, top-k, top-p,
repetition penalty, and beam search (`num_beams > 1`), with `num_samples`
completions per prompt decoded together in left-padded batches. Writes
`samples.jsonl` and `samples.md` and logs an MLflow table (prompt, sampling
parameters, completion, its log-likelihood under the model, tokens/s). One Ray
task does the work (a GPU one when the cluster has GPUs).

With `decode.retrieve: k` the stage also reads the `index` stage: each
prompt's top-k passages go in front of it (`model.rag`'s template, within the
context), and each sample records its `sources`. With `decode.qa_file` it runs
the facts check (`pipeline.rag.facts_check`): `facts.jsonl`, a table, and
`rag/facts_em` / `rag/facts_em_base`. Unset, neither key enters the fingerprint.
When it retrieves (and `train.log_model` is on) it also logs the model with
the index as a pyfunc model that retrieves (`pipeline.tracking.models`),
tagged `model_uri` on its run: `mlflow models serve` then answers with the
passages in front and each row's sources.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from model.generation import SamplingOptions
from pipeline.artifacts import MODEL_FILES
from pipeline.cluster.resources import task_options
from pipeline.completion import fill_masks, transduce
from pipeline.engine.stage import Stage, StageContext
from pipeline.engine.store import StageRef
from pipeline.errors import ConfigError
from pipeline.fingerprints import as_dict, fingerprint_view
from pipeline.rag import (
    check_k,
    complete_with_retrieval,
    facts_check,
    open_retriever,
    read_questions,
)
from pipeline.schema import Config, DecodeConfig
from tokenization.inputs import InputError
from tokenization.masking import MASK


def read_prompts(d: DecodeConfig) -> list[str]:
    """`decode.prompts`, or the prompts of `decode.prompts_file`: in a .jsonl file a JSON string or an object with
    a "prompt" field per line (prompts with newlines); in any other file one prompt per non-empty line."""
    if d.prompts_file is None:
        return list(d.prompts)
    path = Path(d.prompts_file).expanduser()
    if not path.is_file():
        raise ConfigError(f"decode.prompts_file: {path} not found")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        prompts = lines
    else:
        prompts = []
        for n, line in enumerate(lines, 1):
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"decode.prompts_file: {path}:{n}: invalid JSON ({e.msg})") from None
            prompt = item.get("prompt") if isinstance(item, dict) else item
            if not isinstance(prompt, str):
                raise ConfigError(f'decode.prompts_file: {path}:{n}: expected a string or {{"prompt": "..."}}')
            prompts.append(prompt)
    if not prompts:
        raise ConfigError(f"decode.prompts_file: {path} holds no prompts")
    return prompts



def _section(cfg: Config) -> dict[str, Any]:
    section = fingerprint_view(cfg.decode)
    for key in ("retrieve", "qa_file"):  # unset: the fingerprint of a config that never heard of retrieval
        if section.get(key, ...) is None:
            del section[key]
    if cfg.decode.prompts_file is not None:  # edited prompts must rerun decode, as edited config prompts do
        text = "\x00".join(read_prompts(cfg.decode))
        section["prompts_file_sha256"] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if cfg.decode.qa_file is not None:  # so do edited questions; the path alone does not change the output
        _needs_retrieval(cfg)
        questions = json.dumps(read_questions(cfg.decode.qa_file), sort_keys=True)
        section["qa_file"] = hashlib.sha256(questions.encode("utf-8")).hexdigest()
    return section


def _needs_retrieval(cfg: Config) -> None:
    if cfg.decode.qa_file is not None and not cfg.decode.retrieve:
        raise ConfigError("decode.qa_file: the facts check compares answers with and without retrieval: set decode.retrieve")


def _extra_needs(cfg: Config) -> tuple[str, ...]:
    if not cfg.decode.retrieve:
        return ()
    if cfg.index is None:
        raise ConfigError("decode.retrieve: retrieval needs a knowledge index: add an `index:` section (index.inputs)")
    return ("index",)


def decode_samples(model_dir: str, *, prompts: list[str], opts: SamplingOptions, eos_token: str,
                   index_dir: str | None = None, retrieve: int | None = None) -> list[dict[str, Any]]:
    """Plain function (no Ray): one row per (prompt, sample), with its sources when retrieving."""
    return decode_all(model_dir, prompts=prompts, opts=opts, eos_token=eos_token, index_dir=index_dir,
                      retrieve=retrieve)["samples"]


def decode_all(model_dir: str, *, prompts: list[str], opts: SamplingOptions, eos_token: str,
               index_dir: str | None = None, retrieve: int | None = None,
               questions: list[dict[str, str]] | None = None, mask_token: str = MASK) -> dict[str, Any]:
    """The stage's work without Ray: {"samples": `decode_samples`'s rows; "facts": the facts check's rows and
    metrics, when questions are given}. An encoder fills the prompts' `mask_token`s instead (top_k candidates,
    5 when unset); an encoder-decoder answers each prompt as its source (`transduce`)."""
    import torch

    from model import load_model
    from tokenization.bpe import load_tokenizer

    model, _ = load_model(model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    tok = load_tokenizer(f"{model_dir}/tokenizer.json")
    try:
        if model.config.family == "encoder":
            return {"samples": fill_masks(model, tok, prompts, mask_token=mask_token, top_k=opts.top_k or 5)}
        if model.config.family == "encoder-decoder":
            return {"samples": transduce(model, tok, prompts, opts, eos_token=eos_token)}
    except ValueError as e:
        raise InputError(f"decode.prompts: {e}") from None
    retriever = open_retriever(index_dir, model, tok) if index_dir and retrieve else None
    out: dict[str, Any] = {"samples": complete_with_retrieval(model, tok, retriever, prompts, opts, k=retrieve,
                                                              eos_token=eos_token, key="decode.retrieve")}
    if questions:
        rows, metrics = facts_check(model, tok, retriever, questions, retrieve, eos_token=eos_token)
        out["facts"] = {"rows": rows, "metrics": metrics}
    return out


def write_samples(rows: list[dict[str, Any]], out_dir: Path, *, answers: bool = False) -> tuple[Path, Path]:
    """samples.jsonl (one row per line) and samples.md (each prompt followed by its completion, or with `answers`
    (an encoder-decoder) by its answer on a line of its own)."""
    with open(out_dir / "samples.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    text = "\n\n".join(f"## prompt {r['prompt']!r} (sample {r['sample']}, log-likelihood {r['log_likelihood']:.2f})"
                       f"\n\n{r['prompt']}{chr(10) + '=> ' if answers else ''}{r['completion']}"
                       if "predictions" not in r else _filled_md(r) for r in rows)
    (out_dir / "samples.md").write_text(text + "\n", encoding="utf-8")
    return out_dir / "samples.jsonl", out_dir / "samples.md"


def _filled_md(r: dict[str, Any]) -> str:
    """An encoder's row: the prompt, the prompt filled in, and the candidates at each mask."""
    lines = [f"## prompt {r['prompt']!r} (log-likelihood {r['log_likelihood']:.2f})", "", r["completion"], ""]
    for n, at in enumerate(r["predictions"], 1):
        lines.append(f"- mask {n}: " + ", ".join(f"{c['token']!r} {c['prob']:.3f}" for c in at))
    return "\n".join(lines)


def _decode_task(train: StageRef, index: StageRef | None = None, **kw: Any) -> dict[str, Any]:
    """On the task's node: open the model (and the index, when retrieving) there, then decode."""
    return decode_all(str(train.local(list(MODEL_FILES))), index_dir=str(index.local()) if index else None, **kw)


def _log_facts(ctx: StageContext, facts: dict[str, Any]) -> None:
    """facts.jsonl, a table, and the exact-match line on the terminal."""
    with open(ctx.out_dir / "facts.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in facts["rows"])
    ctx.tracker.log_table(ctx.run_id, facts["rows"], "facts.json")
    ctx.tracker.log_artifact(ctx.run_id, ctx.out_dir / "facts.jsonl")
    m = facts["metrics"]
    ctx.progress.note(f"facts check: exact match {m['rag/facts_em']:.2f} with retrieval, {m['rag/facts_em_base']:.2f} "
                      f"without ({int(m['rag/facts_questions'])} questions)")


def run(ctx: StageContext) -> dict[str, float]:
    import ray

    d = ctx.config.decode
    task = ray.remote(_decode_task).options(**task_options(ctx.config.resources.decode, "decode"))
    prompts = read_prompts(d)
    index = ctx.inputs.get("index")
    if index is not None:  # a k the index cannot serve fails here, before the model is loaded
        check_k(json.loads(index.file("index.json").read_text())["passages"], d.retrieve, "decode.retrieve")
    questions = read_questions(d.qa_file) if d.qa_file else None
    if ctx.config.model.family == "encoder":
        ctx.progress.update(status=f"{len(prompts)} prompt(s): masks filled, top {d.top_k or 5} each (one Ray task)")
    else:
        ctx.progress.update(status=f"{len(prompts)} prompt(s) x {d.num_samples} sample(s) of {d.max_new_tokens} tokens"
                                   f"{f', {d.retrieve} passages each' if d.retrieve else ''}"
                                   f"{f', {len(questions)} facts questions' if questions else ''} (one Ray task)")
    out = ray.get(task.remote(ctx.inputs["train"].ref, index.ref if index else None, prompts=prompts,
                              opts=d.sampling_options(), eos_token=ctx.config.tokenizer.eos_token, retrieve=d.retrieve,
                              questions=questions, mask_token=ctx.config.train.masking.mask_token))
    rows = out["samples"]
    _, md = write_samples(rows, ctx.out_dir, answers=ctx.config.model.family == "encoder-decoder")
    # MLflow tables want one type per cell: the sources as JSON text there, a list in samples.jsonl
    ctx.tracker.log_table(ctx.run_id, [{**r, **{k: json.dumps(r[k]) for k in ("sources", "predictions") if k in r}}
                                       for r in rows], "samples.json")
    ctx.tracker.log_artifact(ctx.run_id, md)
    new_tokens = sum(r["new_tokens"] for r in rows)
    metrics = {"samples": float(len(rows)), "mean_new_tokens": new_tokens / len(rows),
               "tokens_per_s": sum(r["tokens_per_s"] for r in rows) / len(rows),
               "mean_token_log_likelihood": sum(r["log_likelihood"] for r in rows) / max(1, new_tokens)}
    if "facts" in out:
        _log_facts(ctx, out["facts"])
        metrics.update(out["facts"]["metrics"])
    if index is not None and ctx.config.train.log_model:  # train's served model has no index: this one retrieves
        ctx.tracker.log_model(ctx.run_id, ctx.inputs["train"].ref.local(list(MODEL_FILES)),
                              eos_token=ctx.config.tokenizer.eos_token, index_dir=index.ref.local(), retrieve=d.retrieve)
    return metrics


STAGE = Stage(name="decode", needs=("tokenizer", "train"), section=_section, version=3, run=run,
              input_context="inference", main_input="train", extra_needs=_extra_needs,
              params=lambda cfg: as_dict(cfg.decode))
