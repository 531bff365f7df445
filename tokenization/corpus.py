"""The corpus into token shards, the plain work of the `prepare` stage (no Ray here).

`plan_shards` cuts the inputs into pieces and groups contiguous pieces into
shards of about a target size: the plan depends on file sizes only. Pass 1
(`hash_shards`) hashes every document for exact de-duplication; pass 2
(`tokenize_shard`) tokenizes one shard, drops the duplicates it is told to,
splits by content hash and writes `train-NNNNN.arrow` / `val-NNNNN.arrow`.
This module imports only numpy, pyarrow and tokenizers, so the processes
that run it start fast.
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from tokenization.bpe import encode_documents, id_dtype, load_tokenizer
from tokenization.documents import (
    DocOptions,
    doc_hash,
    documents,
    is_validation,
    length_histogram,
)
from tokenization.inputs import InputFile, Piece, split_file
from tokenization.readers import SkipLog
from tokenization.shards import write_shard


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


def tokenize_shard(index: int, pieces: list[Piece], drop: np.ndarray, *, tokenizer_path: str, eos_token: str,
                   opts: DocOptions, val_fraction: float, append_eos: bool, out_dir: str) -> dict[str, Any]:
    """Pass 2 (plain function): tokenize one shard and write its train/val Arrow files."""
    tok = _tokenizer(tokenizer_path)
    dtype = id_dtype(tok.get_vocab_size())
    eos = np.asarray([tok.token_to_id(eos_token)] if append_eos else [], dtype=dtype)
    log, filtered = SkipLog(), Counter()
    texts = list(documents(pieces, opts, log, filtered))
    dropped = set(drop.tolist())
    filtered["duplicate"] += len(dropped)
    texts = [t for i, t in enumerate(texts) if i not in dropped]
    encoded = encode_documents(tok, texts, dtype)
    splits: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    text_bytes = {"train": 0, "val": 0}
    for text, ids in zip(texts, encoded):
        split = "val" if is_validation(doc_hash(text), val_fraction) else "train"
        splits[split].append(np.concatenate([ids, eos]))
        text_bytes[split] += len(text.encode("utf-8"))
    out: dict[str, Any] = {"index": index, "pieces": [[p.uri, p.start, p.end] for p in pieces],
                           "skipped": dict(sorted(log.counts.items())), "filtered": dict(sorted(filtered.items())),
                           "skipped_records": log.records,
                           "length_histogram": length_histogram(len(d) for s in splits.values() for d in s).tolist()}
    for split, docs in splits.items():
        name = f"{split}-{index:05d}.arrow"
        out[split] = {"file": name, "text_bytes": text_bytes[split], **write_shard(Path(out_dir) / name, docs, dtype)}
    return out
