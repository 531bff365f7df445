"""Stage `tokenizer`: train a byte-level BPE on the corpus (or load one) -> tokenizer.json.

The BPE trains on a deterministic prefix of the documents (inputs in sorted
order, up to `tokenizer.max_train_bytes`), as one Ray task so the driver does no
heavy work. The input files' identity (path, size, mtime) is part of the
fingerprint: adding or changing a file makes the tokenizer stale.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pipeline.config import Config, fingerprint_view
from pipeline.workflow import Stage, StageContext
from tokenization.bpe import load_tokenizer, tokenizer_hash, train_bpe
from tokenization.readers import InputFile, iter_documents, resolve_inputs


def _section(cfg: Config) -> dict[str, Any]:
    tok = fingerprint_view(cfg.tokenizer)
    if cfg.tokenizer.path:  # a given tokenizer: its bytes are the identity, the corpus is irrelevant
        return {"path": cfg.tokenizer.path, "sha256": tokenizer_hash(_given_path(cfg.tokenizer.path))}
    return {"tokenizer": tok, "inputs": [f.identity() for f in resolve_inputs(cfg.data.inputs)],
            "text_field": cfg.data.text_field}


def _given_path(path: str) -> Path:
    p = Path(path).expanduser()
    p = p / "tokenizer.json" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer.path: {p} not found")
    return p


def build_tokenizer(files: list[InputFile], *, vocab_size: int, min_frequency: int, max_train_bytes: int,
                    text_field: str, out_dir: str) -> dict[str, float]:
    """Train a BPE on the first `max_train_bytes` of the corpus and save it. Plain function (no Ray)."""
    seen = {"bytes": 0, "docs": 0}

    def texts():
        for f in files:
            for doc in iter_documents(f.uri, text_field=text_field):
                if seen["bytes"] >= max_train_bytes:
                    return
                doc = doc[: max(1, max_train_bytes - seen["bytes"])]
                seen["bytes"] += len(doc.encode("utf-8"))
                seen["docs"] += 1
                yield doc

    tok = train_bpe(texts(), vocab_size=vocab_size, min_frequency=min_frequency)
    tok.save(str(Path(out_dir) / "tokenizer.json"))
    return {"vocab_size": float(tok.get_vocab_size()), "train_bytes": float(seen["bytes"]), "train_docs": float(seen["docs"])}


def run(ctx: StageContext) -> dict[str, float]:
    import ray

    cfg = ctx.config
    if cfg.tokenizer.path:
        src = _given_path(cfg.tokenizer.path)
        shutil.copyfile(src, ctx.out_dir / "tokenizer.json")
        return {"vocab_size": float(load_tokenizer(src).get_vocab_size())}
    task = ray.remote(num_cpus=cfg.data.num_cpus_per_task, max_retries=cfg.data.max_retries)(build_tokenizer)
    metrics = ray.get(task.remote(resolve_inputs(cfg.data.inputs), vocab_size=cfg.tokenizer.vocab_size,
                                  min_frequency=cfg.tokenizer.min_frequency, max_train_bytes=cfg.tokenizer.max_train_bytes,
                                  text_field=cfg.data.text_field, out_dir=str(ctx.out_dir)))
    ctx.tracker.log_artifact(ctx.run_id, ctx.out_dir / "tokenizer.json")
    return metrics


STAGE = Stage(name="tokenizer", needs=(), section=_section, version=1, run=run,
              params=lambda cfg: {"tokenizer": cfg.tokenizer.model_dump(mode="json"), "inputs": cfg.data.inputs})
