"""Stage `decode`: complete the configured prompts with the trained model and record what came out.

Prompts come from `decode.prompts` or, when set, `decode.prompts_file` (whose
content, not only its path, enters the fingerprint). Every sampling option of
the model is available: greedy (`temperature: 0`), temperature, top-k, top-p,
repetition penalty, and beam search (`num_beams > 1`), with `num_samples`
completions per prompt decoded together in left-padded batches. Writes
`samples.jsonl` and `samples.md` and logs an MLflow table (prompt, sampling
parameters, completion, its log-likelihood under the model, tokens/s). One Ray
task does the work (a GPU one when the cluster has GPUs).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from model.generate import SamplingOptions
from pipeline.artifacts import MODEL_FILES
from pipeline.cluster.resources import task_options
from pipeline.completion import complete
from pipeline.engine.stage import Stage, StageContext
from pipeline.engine.store import StageRef
from pipeline.errors import ConfigError
from pipeline.schema import Config, DecodeConfig, as_dict, fingerprint_view


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
    if cfg.decode.prompts_file is not None:  # edited prompts must rerun decode, as edited config prompts do
        text = "\x00".join(read_prompts(cfg.decode))
        section["prompts_file_sha256"] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return section


def decode_samples(model_dir: str, *, prompts: list[str], opts: SamplingOptions, eos_token: str) -> list[dict[str, Any]]:
    """Plain function (no Ray): one row per (prompt, sample)."""
    import torch

    from model import load_model
    from tokenization.bpe import load_tokenizer

    model, _ = load_model(model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    return complete(model, load_tokenizer(f"{model_dir}/tokenizer.json"), prompts, opts, eos_token=eos_token)


def write_samples(rows: list[dict[str, Any]], out_dir: Path) -> tuple[Path, Path]:
    """samples.jsonl (one row per line) and samples.md (each prompt followed by its completion)."""
    with open(out_dir / "samples.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    text = "\n\n".join(f"## prompt {r['prompt']!r} (sample {r['sample']}, log-likelihood {r['log_likelihood']:.2f})"
                       f"\n\n{r['prompt']}{r['completion']}" for r in rows)
    (out_dir / "samples.md").write_text(text + "\n", encoding="utf-8")
    return out_dir / "samples.jsonl", out_dir / "samples.md"


def _decode_task(train: StageRef, **kw: Any) -> list[dict[str, Any]]:
    """On the task's node: open the model there, then decode."""
    return decode_samples(str(train.local(list(MODEL_FILES))), **kw)


def run(ctx: StageContext) -> dict[str, float]:
    import ray

    d = ctx.config.decode
    task = ray.remote(_decode_task).options(**task_options(ctx.config.resources.decode, "decode"))
    prompts = read_prompts(d)
    ctx.progress.update(status=f"{len(prompts)} prompt(s) x {d.num_samples} sample(s) of {d.max_new_tokens} tokens "
                               "(one Ray task)")
    rows = ray.get(task.remote(ctx.inputs["train"].ref, prompts=prompts, opts=d.sampling_options(),
                               eos_token=ctx.config.tokenizer.eos_token))
    _, md = write_samples(rows, ctx.out_dir)
    ctx.tracker.log_table(ctx.run_id, rows, "samples.json")
    ctx.tracker.log_artifact(ctx.run_id, md)
    new_tokens = sum(r["new_tokens"] for r in rows)
    return {"samples": float(len(rows)), "mean_new_tokens": new_tokens / len(rows),
            "tokens_per_s": sum(r["tokens_per_s"] for r in rows) / len(rows),
            "mean_token_log_likelihood": sum(r["log_likelihood"] for r in rows) / max(1, new_tokens)}


STAGE = Stage(name="decode", needs=("tokenizer", "train"), section=_section, version=3, run=run,
              input_context="inference", main_input="train",
              params=lambda cfg: as_dict(cfg.decode))
