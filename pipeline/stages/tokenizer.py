"""Stage `tokenizer`: train a byte-level BPE on the corpus (or load one) -> tokenizer.json.

The BPE trains on a deterministic sample spread over the whole corpus: parts
of files (blocks of a `.jsonl` or `.parquet`, whole text files, the start of a
compressed file) are drawn with probability `max_train_bytes / corpus bytes`
and only those are read (`tokenization.sample`), until `max_train_bytes` are
collected. It sees the documents `prepare` will see (same bad-input policy,
normalisation and filters) and runs as one Ray task. For task data it trains on
the records' texts (no markers); for chat data it adds the chat template's
role markers to the special tokens. The input files'
identity (stable name and sha256, `tokenization.inputs.input_identity`) is
part of the fingerprint; a given tokenizer is identified by its bytes instead.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pipeline import ray_tasks as tasks
from pipeline.cluster.resources import task_options
from pipeline.engine.stage import Stage, StageContext
from pipeline.errors import ConfigError
from pipeline.fingerprints import TASK_KEYS, fingerprint_view, task_view
from pipeline.schema import Config
from tokenization.bpe import load_tokenizer, tokenizer_hash
from tokenization.inputs import input_identity, resolve_inputs
from tokenization.spans import sentinel_tokens
from tokenization.taskdata import CHAT_MARKERS


def _given_path(path: str) -> Path:
    p = Path(path).expanduser()
    p = p / "tokenizer.json" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer.path: {p} not found (expected a tokenizer.json or a folder holding one)")
    return p


def _section(cfg: Config) -> dict[str, Any]:
    if cfg.tokenizer.path:  # a given tokenizer: its bytes are the identity, the corpus is irrelevant
        return {"sha256": tokenizer_hash(_given_path(cfg.tokenizer.path)), "eos_token": cfg.tokenizer.eos_token}
    data = task_view(fingerprint_view(cfg.data))
    keys = ("text_field", "on_error", "replace_invalid_utf8", "normalize", "min_chars", "max_chars", *TASK_KEYS)
    tokenizer = fingerprint_view(cfg.tokenizer)
    if not tokenizer["sentinels"]:  # none: the fingerprint of a config that never heard of sentinels
        del tokenizer["sentinels"]
    return {"tokenizer": tokenizer,
            "documents": {k: data[k] for k in keys if k in data},  # task keys only for task data: text keeps its fingerprint
            "inputs": input_identity(resolve_inputs(cfg.data.all_inputs()))}  # every source's


def special_tokens(cfg: Config) -> list[str]:
    """tokenizer.special_tokens, plus the chat template's markers for chat data (the template needs them whole),
    plus `tokenizer.sentinels` sentinel tokens (span corruption)."""
    built_in = cfg.data.format == "chat" and cfg.data.chat_template is None  # a Jinja template's markers: the user's
    extra = [m for m in CHAT_MARKERS if m not in cfg.tokenizer.special_tokens] if built_in else []
    return [*cfg.tokenizer.special_tokens, *extra, *sentinel_tokens(cfg.tokenizer.sentinels)]


def run(ctx: StageContext) -> dict[str, float]:
    import ray

    cfg = ctx.config
    t = cfg.tokenizer
    if t.path:
        src = _given_path(t.path)
        tok = load_tokenizer(src)
        if tok.token_to_id(t.eos_token) is None:
            raise ConfigError(f"tokenizer.eos_token {t.eos_token!r} is not a token of {src}; set tokenizer.eos_token to its end-of-text token")
        shutil.copyfile(src, ctx.out_dir / "tokenizer.json")
        return {"vocab_size": float(tok.get_vocab_size())}
    res = cfg.resources.tokenizer
    files = resolve_inputs(cfg.data.all_inputs())
    ctx.progress.update(status=f"training a {t.vocab_size}-token BPE on {len(files)} files (one Ray task)")
    task = ray.remote(tasks.tokenizer_task).options(**task_options(res, "tokenizer", max_retries=cfg.data.max_retries))
    metrics, text = ray.get(task.remote(files, opts=cfg.data.doc_options(), vocab_size=t.vocab_size,
                                        min_frequency=t.min_frequency, max_train_bytes=t.max_train_bytes,
                                        special_tokens=special_tokens(cfg)))
    (ctx.out_dir / "tokenizer.json").write_text(text, encoding="utf-8")
    ctx.tracker.log_artifact(ctx.run_id, ctx.out_dir / "tokenizer.json")
    return metrics


STAGE = Stage(name="tokenizer", needs=(), section=_section, version=3, run=run, reads_inputs=True,
              params=lambda cfg: {"tokenizer": cfg.tokenizer.model_dump(mode="json"), "inputs": cfg.data.all_inputs()})
