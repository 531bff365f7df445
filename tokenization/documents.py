"""Documents as the stages see them: read, normalised, filtered, hashed.

`documents()` is the one place that applies the data options (bad-input
policy, Unicode NFC, length filters) so the tokenizer trains on, and `prepare`
writes, the same documents. `doc_hash` is the content hash used both for exact
de-duplication and for the train/validation split: a document's fate depends
only on its text, never on sharding or worker count.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from typing import Literal, TypeVar

import numpy as np

from tokenization.inputs import InputError, Piece, display, suffix_of
from tokenization.readers import SkipLog, iter_documents, iter_located_documents
from tokenization.taskdata import record_reader

T = TypeVar("T")
JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json")  # the files that hold task records

# Token-count histogram edges: 0, 1, 2, 4, ... 2^24 (then everything longer).
LENGTH_EDGES = np.array([0] + [2**k for k in range(25)], dtype=np.int64)


@dataclass(frozen=True)
class DocOptions:
    """Which documents a corpus yields and how they are cleaned; also those fields of the pipeline's `data` section."""

    # Read by pydantic when the pipeline validates a config (a plain dict: this module does not import pydantic).
    __pydantic_config__ = {"extra": "forbid", "use_attribute_docstrings": True, "allow_inf_nan": False}

    text_field: str = "text"
    """JSONL key / Parquet column holding the document text."""
    on_error: Literal["raise", "skip"] = "raise"
    """Bad records: stop with an error naming file:line, or skip, count and list them."""
    replace_invalid_utf8: bool = False
    """Replace invalid UTF-8 bytes with U+FFFD (counted) instead of applying on_error."""
    normalize: Literal["nfc", "none"] = "nfc"
    """Unicode normalisation of every document."""
    min_chars: int = 1
    """Drop documents with fewer non-blank characters (counted as too_short)."""
    max_chars: int | None = None
    """Drop documents longer than this (counted as too_long)."""
    format: Literal["text", "prompt_completion", "chat"] = "text"
    """text: plain documents (text_field); prompt_completion: JSON records {prompt, completion}; chat: JSON records {messages: [{role: system|user|assistant, content}]}, rendered with the built-in template. Task formats store a loss mask: only completion / assistant tokens are trained on and scored."""
    prompt_field: str = "prompt"
    """prompt_completion: the key holding the prompt."""
    completion_field: str = "completion"
    """prompt_completion: the key holding the completion."""
    messages_field: str = "messages"
    """chat: the key holding the list of messages."""
    chat_template: str | None = None
    """chat: a Jinja chat template in Hugging Face's form (`messages`, `add_generation_prompt`, `eos_token`) instead of the built-in one; each assistant turn's content and closing markers are learnt. Its markers should be special tokens (tokenizer.special_tokens). Default: a loaded tokenizer's own template (tokenizer.path's tokenizer_config.json), else the built-in template."""

    def __post_init__(self) -> None:
        if self.min_chars < 0:
            raise ValueError(f"DocOptions.min_chars: must be >= 0, got {self.min_chars}")
        if self.max_chars is not None and self.max_chars < max(1, self.min_chars):
            raise ValueError(f"DocOptions.max_chars: {self.max_chars} is below min_chars ({self.min_chars}) or 1")

    def record_field(self) -> str | Callable:
        """What the readers take a record's document from: `text_field`, or a task format's record reader."""
        if self.format == "text":
            return self.text_field
        return record_reader(self.format, prompt_field=self.prompt_field, completion_field=self.completion_field,
                             messages_field=self.messages_field)

    def doc_options(self) -> DocOptions:
        """Just these options (a subclass, such as the pipeline's data section, carries more fields)."""
        return DocOptions(**{f.name: getattr(self, f.name) for f in fields(DocOptions)})


def _check_format(piece: Piece, opts: DocOptions) -> None:
    """Task records are JSON: a text or Parquet file cannot hold them."""
    if opts.format != "text" and suffix_of(piece.uri) not in JSON_SUFFIXES:
        raise InputError(f"{display(piece.uri)}: data.format={opts.format} reads JSON records "
                         f"({', '.join(JSON_SUFFIXES)}), not {suffix_of(piece.uri)} files")


def documents(pieces: Iterable[Piece], opts: DocOptions, log: SkipLog, filtered: Counter) -> Iterator[str]:
    skip_log = log if opts.on_error == "skip" else None
    field = opts.record_field()
    for piece in pieces:
        _check_format(piece, opts)
        for text in iter_documents(piece, text_field=field, log=skip_log,
                                   replace_invalid_utf8=opts.replace_invalid_utf8, max_chars=opts.max_chars):
            if (text := _cleaned(text, opts, filtered)) is not None:
                yield text


def located_documents(pieces: Iterable[Piece], opts: DocOptions, log: SkipLog, filtered: Counter
                      ) -> Iterator[tuple[Piece, int, str]]:
    """`documents` with where each starts: (piece, 1-based line or Parquet row within the piece, text)."""
    skip_log = log if opts.on_error == "skip" else None
    field = opts.record_field()
    for piece in pieces:
        _check_format(piece, opts)
        for line, text in iter_located_documents(piece, text_field=field, log=skip_log,
                                                 replace_invalid_utf8=opts.replace_invalid_utf8,
                                                 max_chars=opts.max_chars):
            if (text := _cleaned(text, opts, filtered)) is not None:
                yield piece, line, text


def _cleaned(text: str, opts: DocOptions, filtered: Counter) -> str | None:
    """The document normalised, or None when a length filter drops it (counted in `filtered`)."""
    if opts.normalize == "nfc":
        text = unicodedata.normalize("NFC", text)
    if len(text.strip()) < opts.min_chars:
        filtered["too_short"] += 1
        return None
    if opts.max_chars is not None and len(text) > opts.max_chars:
        filtered["too_long"] += 1
        return None
    return text


def doc_hash(text: str) -> int:
    """64-bit content hash (blake2b) as an unsigned int."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def is_validation(h: int, fraction: float) -> bool:
    return h / 2**64 < fraction


def duplicate_indices(hashes: list[np.ndarray]) -> list[np.ndarray]:
    """Per shard, the indices of the duplicates: documents whose text already appeared earlier (in shard, then
    document order). These are the ones de-duplication drops; each text's first occurrence is kept."""
    flat = np.concatenate(hashes) if hashes else np.zeros(0, dtype=np.uint64)
    keep = np.zeros(len(flat), dtype=bool)
    _, first = np.unique(flat, return_index=True)
    keep[first] = True
    out, start = [], 0
    for h in hashes:
        out.append(np.flatnonzero(~keep[start : start + len(h)]))
        start += len(h)
    return out


def length_histogram(token_counts: Iterable[int]) -> np.ndarray:
    counts = np.fromiter(token_counts, dtype=np.int64)
    return np.bincount(np.searchsorted(LENGTH_EDGES, counts, side="right") - 1, minlength=len(LENGTH_EDGES))


def batches(items: Iterable[T], limit: int, *, size: Callable[[T], int] = len) -> Iterator[list[T]]:
    """Consecutive lists of `items` that each just reach `limit` in total `size` (the last may hold less), so a
    batched encoder holds about `limit` characters at a time however long the stream."""
    batch: list[T] = []
    total = 0
    for item in items:
        batch.append(item)
        total += size(item)
        if total >= limit:
            yield batch
            batch, total = [], 0
    if batch:
        yield batch
