"""Stage `prepare`: Ray tasks tokenize the corpus into Arrow shards + `shards.json`.

The driver plans shards from file sizes alone (contiguous runs of the sorted
inputs, about `data.shard_size_mb` each), so the plan, and the bytes written,
do not depend on how many workers run it. Each shard is one Ray task writing
`train-NNNNN.arrow` and `val-NNNNN.arrow`; a document goes to validation when
the hash of its text falls below `data.val_fraction`, independent of sharding.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from pipeline.config import Config, fingerprint_view
from pipeline.workflow import Stage, StageContext
from tokenization.bpe import EOS, id_dtype, load_tokenizer, tokenizer_hash
from tokenization.readers import InputError, InputFile, iter_documents, resolve_inputs
from tokenization.shards import write_shard


def _section(cfg: Config) -> dict[str, Any]:
    data = fingerprint_view(cfg.data)
    data["inputs"] = [f.identity() for f in resolve_inputs(cfg.data.inputs)]
    return {"data": data}


def plan_shards(files: list[InputFile], shard_bytes: int) -> list[list[InputFile]]:
    shards: list[list[InputFile]] = [[]]
    size = 0
    for f in files:
        if shards[-1] and size + f.size > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(f)
        size += f.size
    return shards


def is_validation(text: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < fraction


def tokenize_shard(index: int, files: list[InputFile], *, tokenizer_path: str, text_field: str,
                   val_fraction: float, append_eos: bool, out_dir: str) -> dict[str, Any]:
    """Tokenize one shard's files and write its train/val Arrow files. Plain function (no Ray)."""
    tok = load_tokenizer(tokenizer_path)
    dtype = id_dtype(tok.get_vocab_size())
    eos = tok.token_to_id(EOS)
    texts = [doc for f in files for doc in iter_documents(f.uri, text_field=text_field)]
    encoded = tok.encode_batch(texts, add_special_tokens=False)
    splits: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    raw_bytes = {"train": 0, "val": 0}
    for text, enc in zip(texts, encoded):
        ids = enc.ids + ([eos] if append_eos else [])
        split = "val" if is_validation(text, val_fraction) else "train"
        splits[split].append(np.asarray(ids, dtype=dtype))
        raw_bytes[split] += len(text.encode("utf-8"))
    out = {"index": index, "files": [f.uri for f in files]}
    for split, docs in splits.items():
        name = f"{split}-{index:05d}.arrow"
        out[split] = {"file": name, "text_bytes": raw_bytes[split], **write_shard(f"{out_dir}/{name}", docs, dtype)}
    return out


def run(ctx: StageContext) -> dict[str, float]:
    import ray

    cfg = ctx.config
    tok_path = str(ctx.inputs["tokenizer"].path / "tokenizer.json")
    files = resolve_inputs(cfg.data.inputs)
    plan = plan_shards(files, int(cfg.data.shard_size_mb * 2**20))
    task = ray.remote(num_cpus=cfg.data.num_cpus_per_task, max_retries=cfg.data.max_retries)(tokenize_shard)
    refs = [task.remote(i, shard, tokenizer_path=tok_path, text_field=cfg.data.text_field,
                        val_fraction=cfg.data.val_fraction, append_eos=cfg.data.append_eos, out_dir=str(ctx.out_dir))
            for i, shard in enumerate(plan)]
    shards = ray.get(refs)
    totals = {s: {k: sum(sh[s][k] for sh in shards) for k in ("docs", "tokens", "text_bytes")} for s in ("train", "val")}
    for split in ("train", "val"):
        if totals[split]["tokens"] == 0:
            raise InputError(f"data: the {split} split is empty ({sum(t['docs'] for t in totals.values())} documents, "
                             f"data.val_fraction={cfg.data.val_fraction}); add documents or change data.val_fraction")
    tok = ctx.inputs["tokenizer"]
    manifest = {"dtype": str(id_dtype(int(tok.manifest["metrics"]["vocab_size"]))),
                "tokenizer_sha256": tokenizer_hash(tok_path), "shards": shards, "totals": totals}
    (ctx.out_dir / "shards.json").write_text(json.dumps(manifest, indent=2))
    ctx.tracker.log_artifact(ctx.run_id, ctx.out_dir / "shards.json")
    all_bytes = totals["train"]["text_bytes"] + totals["val"]["text_bytes"]
    all_tokens = totals["train"]["tokens"] + totals["val"]["tokens"]
    return {"shards": float(len(shards)), "docs": float(totals["train"]["docs"] + totals["val"]["docs"]),
            "train_tokens": float(totals["train"]["tokens"]), "val_tokens": float(totals["val"]["tokens"]),
            "val_docs": float(totals["val"]["docs"]), "tokens_per_byte": all_tokens / max(1, all_bytes)}


def shard_paths(upstream_dir, manifest_file: str = "shards.json", split: str = "train") -> list[str]:
    """Local paths of a committed prepare stage's shards of one split."""
    m = json.loads((upstream_dir / manifest_file).read_text())
    return [str(upstream_dir / sh[split]["file"]) for sh in m["shards"] if sh[split]["tokens"] > 0]


STAGE = Stage(name="prepare", needs=("tokenizer",), section=_section, version=1, run=run,
              params=lambda cfg: cfg.data.model_dump(mode="json"))
