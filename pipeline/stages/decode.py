"""Stage `decode`: complete the configured prompts with the trained model (KV cache).

Greedy when `decode.temperature` is 0, else temperature + top-k sampling,
seeded. Writes `samples.jsonl` and `samples.md` and logs an MLflow table
(prompt, sampling parameters, completion, tokens/s). One Ray task does the work.
"""

from __future__ import annotations

import json
import time
from typing import Any

from model import generate, load_model
from pipeline.config import Config, fingerprint_view
from pipeline.workflow import Stage, StageContext
from tokenization.bpe import load_tokenizer


def _section(cfg: Config) -> dict[str, Any]:
    return fingerprint_view(cfg.decode)


def decode_samples(model_dir: str, *, prompts: list[str], max_new_tokens: int, temperature: float, top_k: int | None,
                   num_samples: int, seed: int, eos_token: str) -> list[dict[str, Any]]:
    """Plain function (no Ray): one row per (prompt, sample)."""
    model, _ = load_model(model_dir)
    tok = load_tokenizer(f"{model_dir}/tokenizer.json")
    eos = tok.token_to_id(eos_token)
    cfg = model.config
    rows = []
    for p_i, prompt in enumerate(prompts):
        ids = tok.encode(prompt, add_special_tokens=False).ids or [eos]
        if cfg.pos_encoding == "learned":
            ids = ids[-(cfg.max_seq_len - max_new_tokens):] if max_new_tokens < cfg.max_seq_len else ids[-1:]
        budget = min(max_new_tokens, cfg.max_seq_len - len(ids)) if cfg.pos_encoding == "learned" else max_new_tokens
        t0 = time.perf_counter()
        outs = generate(model, ids, max_new_tokens=budget, num_samples=num_samples, temperature=temperature,
                        top_k=top_k, seed=seed + p_i, stop_token=eos)
        dt = time.perf_counter() - t0
        for s_i, new in enumerate(outs):
            rows.append({"prompt": prompt, "sample": s_i, "temperature": temperature, "top_k": top_k or 0,
                         "completion": tok.decode(new, skip_special_tokens=True), "new_tokens": len(new),
                         "tokens_per_s": sum(len(o) for o in outs) / dt})
    return rows


def run(ctx: StageContext) -> dict[str, float]:
    import ray

    d = ctx.config.decode
    task = ray.remote(num_cpus=d.num_cpus)(decode_samples)
    rows = ray.get(task.remote(str(ctx.inputs["train"].path), prompts=d.prompts, max_new_tokens=d.max_new_tokens,
                               temperature=d.temperature, top_k=d.top_k, num_samples=d.num_samples, seed=d.seed,
                               eos_token=ctx.config.tokenizer.eos_token))
    with open(ctx.out_dir / "samples.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    text = "\n\n".join(f"## prompt {r['prompt']!r} (sample {r['sample']})\n\n{r['prompt']}{r['completion']}" for r in rows)
    (ctx.out_dir / "samples.md").write_text(text + "\n", encoding="utf-8")
    ctx.tracker.log_table(ctx.run_id, rows, "samples.json")
    ctx.tracker.log_artifact(ctx.run_id, ctx.out_dir / "samples.md")
    return {"samples": float(len(rows)), "mean_new_tokens": sum(r["new_tokens"] for r in rows) / len(rows),
            "tokens_per_s": sum(r["tokens_per_s"] for r in rows) / len(rows)}


STAGE = Stage(name="decode", needs=("tokenizer", "train"), section=_section, version=1, run=run,
              params=lambda cfg: cfg.decode.model_dump(mode="json"))
