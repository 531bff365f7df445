"""The tokenizer's training sample: a deterministic spread over the corpus that reads only what it takes.

With a corpus of `total` bytes and a budget of `max_train_bytes`, each part of
the corpus is taken with probability `rate = max_train_bytes / total`, decided
by a hash of the file's stable name and the part's index, so the sample
depends on the inputs' names and contents only (not on their paths or on the
order work runs in). The parts are what a format can reach without reading the
rest: blocks of `BLOCK` bytes of a plain `.jsonl` or a `.parquet` (the lines or
row groups starting in the block); a `.txt` / `.md` file (one document) whole;
a compressed or `.json` file up to `BLOCK` bytes whole, a larger one from its
start until its share (`rate` x its size on disk) of text is read. Documents
then pass through `tokenization.documents.documents`, the same bad-input
policy, normalisation and filters `prepare` applies; a part never taken is
never opened, so a bad record there is for `prepare` to find.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator

from tokenization.documents import DocOptions, documents
from tokenization.inputs import (
    SPLIT_SUFFIXES,
    TEXT_SUFFIXES,
    InputFile,
    Piece,
    split_file,
    suffix_of,
)
from tokenization.readers import SkipLog
from tokenization.taskdata import plain_text

BLOCK = 1 << 20


def _drawn(name: str, index: int, rate: float) -> bool:
    h = hashlib.blake2b(f"{name}\0{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64 < rate


def sample_parts(files: list[InputFile], max_train_bytes: int) -> tuple[float, list[tuple[Piece, int | None]]]:
    """(rate, [(piece, at most this many text bytes from it, or None for all)]) in corpus order."""
    total = sum(f.size for f in files)
    rate = min(1.0, max_train_bytes / max(1, total))
    parts: list[tuple[Piece, int | None]] = []
    for f in files:
        kind, name = suffix_of(f.uri), f.name or f.uri
        whole = Piece(f.uri, 0, f.size, f.size)
        if rate >= 1.0:
            parts.append((whole, None))
        elif kind in SPLIT_SUFFIXES:
            parts += [(p, None) for i, p in enumerate(split_file(f, BLOCK)) if _drawn(name, i, rate)]
        elif kind in TEXT_SUFFIXES or f.size <= BLOCK:
            if _drawn(name, 0, rate):
                parts.append((whole, None))
        else:
            parts.append((whole, max(1, int(rate * f.size))))
    return rate, parts


def sample_texts(files: list[InputFile], opts: DocOptions, max_train_bytes: int, log: SkipLog, filtered: Counter,
                 seen: Counter) -> Iterator[str]:
    """The sample's documents, cut at `max_train_bytes` in all; `seen` counts its bytes and docs."""
    _, parts = sample_parts(files, max_train_bytes)
    for piece, share in parts:
        taken = 0
        for text in documents([piece], opts, log, filtered):
            if opts.format != "text":  # a task record: its texts, not its canonical JSON
                text = plain_text(text)
            if seen["bytes"] >= max_train_bytes:
                return
            text = text[: max_train_bytes - seen["bytes"]]
            n = len(text.encode("utf-8"))
            seen["bytes"] += n
            seen["docs"] += 1
            taken += n
            yield text
            if share is not None and taken >= share:
                break  # the rest of this stream is not read
