"""Stage `prepare`: Ray tasks tokenize the corpus into Arrow shards + `shards.json`.

The driver plans shards from file sizes alone: files are cut into pieces (big
`.jsonl` and `.parquet` files into byte ranges owning the lines or row groups
that start in them) and contiguous pieces are grouped into shards of about
`data.shard_size_mb`. The plan, and so every byte
written, depends only on the inputs and the fingerprinted config, never on how
many tasks (`data.num_tasks`) or workers run it: each task takes whole shards.

With `data.dedup`, a first pass of tasks hashes every document; the driver
keeps the first occurrence of each text (in shard, then document order) and
the second pass drops the rest while tokenizing. Each shard becomes
`train-NNNNN.arrow` and `val-NNNNN.arrow` (a document goes to validation when
its content hash falls below `data.val_fraction`), written under a temporary
name and renamed. Skipped records are counted by reason in `shards.json` and
listed with file:line in `skipped.jsonl`; a length histogram goes to MLflow.
Task data (`data.format` prompt_completion or chat, `tokenization.taskdata`)
adds a `loss_mask` column to the shards; text shards are unchanged.
A mixture (`data.sources`) is sharded source after source, so no shard mixes two; each shard names its
source in `shards.json`, which also totals each source. Weights are not read here (nor fingerprinted): changing
them retrains, never re-tokenises.
Files of other types in an input folder are named in one warning line and
counted (`ignored_files`). The inputs enter the fingerprint by stable name and
content (`tokenization.inputs.input_identity`), not by path or mtime.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import faults
from pipeline import ray_tasks as tasks
from pipeline.cluster.resources import task_options
from pipeline.engine.stage import Stage, StageContext
from pipeline.fingerprints import as_dict, data_view
from pipeline.schema import Config, DataConfig
from pipeline.terminal import Progress
from tokenization.bpe import id_dtype, load_tokenizer, tokenizer_hash
from tokenization.corpus import plan_shards
from tokenization.documents import LENGTH_EDGES, duplicate_indices
from tokenization.inputs import (
    InputError,
    describe_ignored,
    input_identity,
    resolve_inputs,
)
from tokenization.taskdata import check_template, missing_markers


def chat_template(cfg: Config) -> str | None:
    """The Jinja chat template chat data is rendered with: data.chat_template, else the template of the Hugging
    Face tokenizer tokenizer.path names (its folder's chat_template.jinja or tokenizer_config.json); None: the
    built-in template."""
    if cfg.data.format != "chat":
        return None
    if cfg.data.chat_template is not None or not cfg.tokenizer.path:
        return cfg.data.chat_template
    folder = Path(cfg.tokenizer.path).expanduser()
    folder = folder if folder.is_dir() else folder.parent
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "tokenizer_config.json").is_file():
        found = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
        if isinstance(found, list):  # named templates: the default one
            found = next((t.get("template") for t in found if isinstance(t, dict) and t.get("name") == "default"), None)
        return found if isinstance(found, str) else None
    return None


def _check_template(cfg: Config, tok_path: str) -> None:
    """A chat template must place the assistant turns (a Jinja one: checked on a probe conversation), and the
    built-in one needs its markers as single tokens, or the loss mask could not be placed: say so before work."""
    if cfg.data.format != "chat":
        return
    if (template := chat_template(cfg)) is not None:
        check_template(template, eos_token=cfg.tokenizer.eos_token)
        return
    if missing := missing_markers(load_tokenizer(tok_path).token_to_id):
        raise InputError(f"data.format=chat: the tokenizer has no token {', '.join(missing)}, so the chat template "
                         "cannot mark the assistant turns and their loss mask would be lost; let the tokenizer stage "
                         "train one (it adds them for chat data) or add them to tokenizer.special_tokens")


def _section(cfg: Config) -> dict[str, Any]:
    data = data_view(cfg.data)
    if (template := chat_template(cfg)) is not None:  # the tokenizer's own template renders as if configured
        check_template(template, eos_token=cfg.tokenizer.eos_token)  # at plan time: before any stage runs
        data["chat_template"] = template
    if cfg.data.sources:
        data["sources"] = [{"name": s.name, "inputs": input_identity(resolve_inputs(s.inputs))} for s in cfg.data.sources]
    else:
        data["inputs"] = input_identity(resolve_inputs(cfg.data.inputs))
    return {"data": data}


def _shard_groups(n: int, num_tasks: int | None) -> list[list[int]]:
    k = min(n, num_tasks or n)
    return [g.tolist() for g in np.array_split(np.arange(n), k) if len(g)]


def run(ctx: StageContext) -> dict[str, float]:
    import ray

    cfg = ctx.config
    d = cfg.data
    tok = ctx.inputs["tokenizer"]
    _check_template(cfg, str(tok.file("tokenizer.json")))
    opts = dataclasses.replace(cfg.data.doc_options(), chat_template=chat_template(cfg))
    ignored: Counter = Counter()
    shards, sources = _plan(d, ignored)
    if ignored:  # a folder's other files are not inputs; say which, so a format we do not read is not lost silently
        ctx.progress.note(f"warning: {describe_ignored(ignored)}")  # `[prepare] warning: ...` on the terminal
    groups = _shard_groups(len(shards), d.num_tasks)
    res = cfg.resources.prepare
    options = task_options(res, "prepare", max_retries=d.max_retries,
                           **({"runtime_env": {"env_vars": faults.env()}} if faults.env() else {}))
    shards_ref = ray.put(shards)
    sizes = [sum(p.end - p.start for p in shard) for shard in shards]
    if d.dedup:
        t0 = time.monotonic()
        hashed = _gather([ray.remote(tasks.hash_task).options(**options).remote(shards_ref, g, opts) for g in groups],
                         groups, sizes, ctx.progress, "hashed", t0)
        drops = duplicate_indices([h for part in hashed for h in part])
    else:
        drops = [np.zeros(0, dtype=np.int64)] * len(shards)
    kw = {"eos_token": cfg.tokenizer.eos_token, "opts": opts, "val_fraction": d.val_fraction, "append_eos": d.append_eos}
    task = ray.remote(tasks.tokenize_task).options(**options)
    t0 = time.monotonic()
    results = _gather([task.remote(shards_ref, g, [drops[i] for i in g], kw, tok.ref, ctx.output, res.num_cpus)
                       for g in groups], groups, sizes, ctx.progress, "tokenized", t0)
    per_shard = [r for part in results for r in part]
    if d.sources:  # which source each shard holds: training draws from each by its weight
        per_shard = [{**sh, "source": name} for sh, name in zip(per_shard, sources)]
    return _finish(ctx, per_shard, str(tok.file("tokenizer.json")), sum(ignored.values()))


def _plan(d: DataConfig, ignored: Counter) -> tuple[list, list[str]]:
    """The shards and the source of each: a mixture's sources are sharded one after the other, so a shard never
    mixes two of them (one corpus: the source "")."""
    shards, sources = [], []
    for i, (name, specs) in enumerate(d.input_groups().items()):
        try:
            files = resolve_inputs(specs, ignored)
        except InputError as e:
            raise (InputError(str(e).replace("data.inputs", f"data.sources.{i}.inputs ({name})", 1)) if name else e) from None
        planned = plan_shards(files, max(1, int(d.shard_size_mb * 2**20)))
        shards += planned
        sources += [name] * len(planned)
    return shards, sources


def _gather(refs: list, groups: list[list[int]], sizes: list[int], progress: Progress, verb: str, t0: float) -> list:
    """`ray.get` of the tasks, in order, showing the shards done (of all) and the raw MB/s since `t0` (when they
    were submitted) as each task ends."""
    import ray

    index = {ref: i for i, ref in enumerate(refs)}
    results: list = [None] * len(refs)
    total, done, done_bytes = len(sizes), 0, 0
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        i = index[ready[0]]
        results[i] = ray.get(ready[0])  # a failed task raises here, as a plain ray.get of them all would
        done, done_bytes = done + len(groups[i]), done_bytes + sum(sizes[s] for s in groups[i])
        mb_s = done_bytes / 2**20 / max(time.monotonic() - t0, 1e-6)
        progress.update(done=done, total=total, status=f"{verb} {done}/{total} shards, {mb_s:.1f} MB/s")
    return results


def _finish(ctx: StageContext, per_shard: list[dict[str, Any]], tok_path: str, ignored: int) -> dict[str, float]:
    d = ctx.config.data
    skipped, filtered = Counter(), Counter()
    hist = np.zeros(len(LENGTH_EDGES), dtype=np.int64)
    with open(ctx.out_dir / "skipped.jsonl", "w", encoding="utf-8") as f:
        for sh in per_shard:
            skipped.update(sh["skipped"])
            filtered.update(sh["filtered"])
            hist += np.asarray(sh.pop("length_histogram"))
            for rec in sh.pop("skipped_records"):
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    totals = _totals(per_shard)
    n_docs = totals["train"]["docs"] + totals["val"]["docs"]
    if n_docs == 0:
        raise InputError(f"data.inputs: no documents left to train on (skipped {dict(skipped)}, filtered {dict(filtered)})")
    for split in ("train", "val"):
        if totals[split]["tokens"] == 0:
            raise InputError(f"data: the {split} split is empty ({n_docs} documents, data.val_fraction={d.val_fraction}); "
                             "add documents or change data.val_fraction")
    by_source = {name: _totals([sh for sh in per_shard if sh["source"] == name]) for name in d.mixture()}
    for i, (name, t) in enumerate(by_source.items()):
        if t["train"]["tokens"] == 0 or t["val"]["tokens"] == 0:
            split = "train" if t["train"]["tokens"] == 0 else "val"
            raise InputError(f"data.sources.{i} ({name}): its {split} split is empty ({t['train']['docs'] + t['val']['docs']} "
                             "documents left); every source needs both (add documents or change data.val_fraction)")
    vocab = load_tokenizer(tok_path).get_vocab_size()
    manifest = {"dtype": str(id_dtype(vocab)), "tokenizer_sha256": tokenizer_hash(tok_path), "shards": per_shard,
                "totals": totals, "skipped": dict(sorted(skipped.items())), "filtered": dict(sorted(filtered.items())),
                "length_histogram": {"edges": LENGTH_EDGES.tolist(), "counts": hist.tolist()},
                **({"sources": by_source} if by_source else {})}
    (ctx.out_dir / "shards.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    _plot_lengths(ctx.out_dir / "doc_lengths.png", hist)
    for name in ("shards.json", "doc_lengths.png", "skipped.jsonl"):
        ctx.tracker.log_artifact(ctx.run_id, ctx.out_dir / name)
    all_bytes = totals["train"]["text_bytes"] + totals["val"]["text_bytes"]
    all_tokens = totals["train"]["tokens"] + totals["val"]["tokens"]
    metrics = {"shards": float(len(per_shard)), "docs": float(n_docs), "bytes": float(all_bytes), "tokens": float(all_tokens),
               "tokens_per_byte": all_tokens / max(1, all_bytes), "ignored_files": float(ignored)}
    for split in ("train", "val"):
        metrics.update({f"{split}_{k}": float(v) for k, v in totals[split].items()})
    for name, t in by_source.items():
        metrics.update({f"{name}_{split}_tokens": float(t[split]["tokens"]) for split in ("train", "val")})
    metrics.update({f"skipped_{k}": float(v) for k, v in skipped.items()})
    metrics.update({f"filtered_{k}": float(v) for k, v in filtered.items()})
    return metrics


def _totals(per_shard: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    return {s: {k: sum(sh[s][k] for sh in per_shard) for k in ("docs", "tokens", "text_bytes")} for s in ("train", "val")}


def _plot_lengths(path: Path, hist: np.ndarray) -> None:
    """A bar chart of document lengths as PNG, drawn with Pillow (matplotlib's import alone
    costs more than tokenizing a small corpus)."""
    from PIL import Image, ImageDraw

    last = int(np.flatnonzero(hist).max()) + 1 if hist.any() else 1
    W, H, left, bottom, top = 760, 320, 60, 60, 30
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 8), "documents by length (tokens per document)", fill="black")
    peak = max(1, int(hist[:last].max()))
    bar = (W - left - 20) / last
    for i in range(last):
        h = (H - bottom - top) * int(hist[i]) / peak
        x0 = left + i * bar
        draw.rectangle([x0 + 2, H - bottom - h, x0 + bar - 2, H - bottom], fill=(70, 110, 180))
        draw.text((x0 + 2, H - bottom + 4 + 12 * (i % 2)), f"<{LENGTH_EDGES[min(i + 1, len(LENGTH_EDGES) - 1)]}", fill="black")
        if hist[i]:
            draw.text((x0 + 2, H - bottom - h - 12), str(int(hist[i])), fill="black")
    draw.line([left, H - bottom, W - 20, H - bottom], fill="black")
    img.save(path, format="PNG")


STAGE = Stage(name="prepare", needs=("tokenizer",), section=_section, version=4, run=run, reads_inputs=True,
              params=lambda cfg: as_dict(cfg.data))
