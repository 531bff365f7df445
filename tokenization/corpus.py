"""The corpus into token shards, the plain work of the `prepare` stage (no Ray here).

`plan_shards` cuts the inputs into pieces and groups contiguous pieces into
shards of about a target size: the plan depends on file sizes only. Pass 1
(`hash_shards`) hashes every document for exact de-duplication; pass 2
(`tokenize_shard`) tokenizes one shard a batch of documents at a time, drops
the duplicates it is told to, splits by content hash and writes
`train-NNNNN.arrow` / `val-NNNNN.arrow` through a spilling `ShardWriter`
(task data, `data.format` other than text, with its loss mask column).
This module imports only numpy, pyarrow and tokenizers, so the processes
that run it start fast.
"""

from __future__ import annotations

from array import array
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from tokenization.bpe import BATCH_CHARS, encode_documents, id_dtype, load_tokenizer
from tokenization.documents import (
    DocOptions,
    batches,
    doc_hash,
    documents,
    is_validation,
    length_histogram,
)
from tokenization.inputs import InputFile, Piece, split_file
from tokenization.readers import SkipLog
from tokenization.shards import ShardWriter
from tokenization.taskdata import encode_task


def plan_shards(files: list[InputFile], shard_bytes: int) -> list[list[Piece]]:
    shards: list[list[Piece]] = [[]]
    size = 0
    for piece in (p for f in files for p in split_file(f, shard_bytes)):
        if shards[-1] and size + (piece.end - piece.start) > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(piece)
        size += piece.end - piece.start
    return shards


def hash_shards(shards: list[list[Piece]], opts: DocOptions) -> list[np.ndarray]:
    """Pass 1 (plain function): the content hash of every document, per shard."""
    out = []
    for pieces in shards:
        out.append(np.fromiter((doc_hash(t) for t in documents(pieces, opts, SkipLog(), Counter())), dtype=np.uint64))
    return out


@lru_cache(maxsize=4)
def _tokenizer(path: str):
    """One load per worker process, not per shard (tokenizer.json is immutable in a committed stage)."""
    return load_tokenizer(path)


def _encoded(tok, batch: list[str], dtype: np.dtype, opts: DocOptions, n_eos: int,
             eos_token: str) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(ids, loss mask of ids + EOS, or None for text) per document of a batch."""
    if opts.format == "text":
        return [(ids, None) for ids in encode_documents(tok, batch, dtype)]
    out = []
    template = opts.chat_template if opts.format == "chat" else None
    for ids, mask, last_learnt in encode_task(batch, lambda texts: encode_documents(tok, texts, dtype), tok.token_to_id,
                                              dtype, template=template, eos_token=eos_token):
        out.append((ids, np.concatenate([mask, np.full(n_eos, last_learnt, dtype=np.uint8)])))  # EOS counts after a completion
    return out


def tokenize_shard(index: int, pieces: list[Piece], drop: np.ndarray, *, tokenizer_path: str, eos_token: str,
                   opts: DocOptions, val_fraction: float, append_eos: bool, out_dir: str) -> dict[str, Any]:
    """Pass 2 (plain function): tokenize one shard and write its train/val Arrow files. Documents are read, encoded
    and written a batch at a time, so memory does not grow with the shard (one huge file is one shard)."""
    tok = _tokenizer(tokenizer_path)
    dtype = id_dtype(tok.get_vocab_size())
    eos = np.asarray([tok.token_to_id(eos_token)] if append_eos else [], dtype=dtype)
    log, filtered = SkipLog(), Counter()
    dropped = set(drop.tolist())
    filtered["duplicate"] += len(dropped)
    names = {split: f"{split}-{index:05d}.arrow" for split in ("train", "val")}
    task = opts.format != "text"  # task data: ids rendered from the record's parts, with a loss mask
    writers = {split: ShardWriter(Path(out_dir) / name, dtype, loss_mask=task) for split, name in names.items()}
    text_bytes = {"train": 0, "val": 0}
    lengths = array("q")
    try:
        kept = (text for i, text in enumerate(documents(pieces, opts, log, filtered)) if i not in dropped)
        for batch in batches(kept, BATCH_CHARS):
            for text, (ids, mask) in zip(batch, _encoded(tok, batch, dtype, opts, len(eos), eos_token)):
                split = "val" if is_validation(doc_hash(text), val_fraction) else "train"
                writers[split].add(np.concatenate([ids, eos]), mask)
                text_bytes[split] += len(text.encode("utf-8"))
                lengths.append(len(ids) + len(eos))
        written = {split: w.close() for split, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.discard()
        raise
    out: dict[str, Any] = {"index": index, "pieces": [[p.uri, p.start, p.end] for p in pieces],
                           "skipped": dict(sorted(log.counts.items())), "filtered": dict(sorted(filtered.items())),
                           "skipped_records": log.records, "length_histogram": length_histogram(lengths).tolist()}
    for split, name in names.items():
        out[split] = {"file": name, "text_bytes": text_bytes[split], **written[split]}
    return out
