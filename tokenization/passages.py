"""Passages for retrieval: documents cut into overlapping windows of tokens, each citing where it came from.

A knowledge corpus is read exactly as `prepare` reads a training corpus
(`documents.located_documents`: the same readers, bad-input policy, Unicode
normalisation and length filters), so a document has the same text, and the
same `doc_hash`, in both. That hash travels with every passage: it is how a
retriever leaves out a query's own document (the leakage guard).

A document of n tokens becomes windows of `passage_tokens` tokens starting
every `passage_tokens - overlap` tokens; the last window ends at the last
token, so no window lies wholly inside its predecessor. A passage's text is the
document's characters those tokens cover (token offsets), and its `line` is
the 1-based line of the file where it starts: a text file's line counted
through the document, a JSON Lines record's line (or a `.json` element's, or a
Parquet row) for every passage of that record. Documents are read from whole
files (line numbers are then the file's). Exact duplicate documents are kept
once, at their first occurrence in file order.

The table (`PASSAGE_SCHEMA`) is one row per passage: id (its row number),
doc_hash (uint64), file (the stable input name), line, text, n_tokens.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from tokenization.bpe import BATCH_CHARS, split_text, splits_safely
from tokenization.documents import DocOptions, batches, doc_hash, located_documents
from tokenization.inputs import TEXT_SUFFIXES, InputFile, Piece, suffix_of
from tokenization.readers import SkipLog

PASSAGE_SCHEMA = pa.schema([
    ("id", pa.int64()),
    ("doc_hash", pa.uint64()),
    ("file", pa.string()),
    ("line", pa.int64()),
    ("text", pa.string()),
    ("n_tokens", pa.int32()),
])


@dataclass(frozen=True)
class PassageOptions:
    """How documents are cut into passages."""

    passage_tokens: int = 128
    """Tokens per passage (the last passage of a document may hold fewer)."""
    overlap: int = 16
    """Tokens each passage shares with the one before it."""

    def __post_init__(self) -> None:
        if self.passage_tokens < 1:
            raise ValueError(f"passage_tokens: must be >= 1, got {self.passage_tokens}")
        if not 0 <= self.overlap < self.passage_tokens:
            raise ValueError(f"overlap: must be in [0, passage_tokens={self.passage_tokens}), got {self.overlap}")


def windows(n: int, passage_tokens: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) token windows over n tokens: every `passage_tokens - overlap`, the last ending at n."""
    if n == 0:
        return []
    out = [(0, min(passage_tokens, n))]
    while out[-1][1] < n:
        start = out[-1][0] + passage_tokens - overlap
        out.append((start, min(start + passage_tokens, n)))
    return out


def token_offsets(tok, texts: list[str], *, cut: bool) -> list[list[tuple[int, int]]]:
    """The (start, end) character offsets of each token of each text, encoded in one batch; with `cut`
    (`splits_safely(tok)`, asked once: it serialises the tokenizer) long texts are encoded in pieces."""
    owners, pieces, bases = [], [], []
    for i, text in enumerate(texts):
        base = 0
        for piece in (split_text(text) if cut else (text,)):
            owners.append(i)
            pieces.append(piece)
            bases.append(base)
            base += len(piece)
    out: list[list[tuple[int, int]]] = [[] for _ in texts]
    for owner, base, enc in zip(owners, bases, tok.encode_batch(pieces, add_special_tokens=False)):
        if base == 0 and not out[owner]:  # a whole text (the usual case): its offsets as they are
            out[owner] = enc.offsets
        else:
            out[owner].extend((base + a, base + b) for a, b in enc.offsets)
    return out


def chunk_text(tok, text: str, opts: PassageOptions) -> list[tuple[int, int, int]]:
    """(start char, end char, tokens) of each passage of one document."""
    return _spans(token_offsets(tok, [text], cut=splits_safely(tok))[0], opts)


def _spans(offsets: list[tuple[int, int]], opts: PassageOptions) -> list[tuple[int, int, int]]:
    return [(offsets[a][0], offsets[b - 1][1], b - a) for a, b in windows(len(offsets), opts.passage_tokens, opts.overlap)]


def _document_passages(text: str, spans: list[tuple[int, int, int]], line: int, counts_lines: bool
                       ) -> Iterator[tuple[int, str, int]]:
    """(line, text, tokens) of each passage; a text file's line advances through the document."""
    at, seen = 0, line
    for a, b, n in spans:
        if counts_lines:
            seen += text.count("\n", at, a)
            at = a
        yield seen, text[a:b], n


def _unique(docs: Iterable[tuple[Piece, int, str]], filtered: Counter) -> Iterator[tuple[Piece, int, str, int]]:
    """The documents with their hash, each text once (later copies counted as `duplicate`)."""
    seen: set[int] = set()
    for piece, line, text in docs:
        h = doc_hash(text)
        if h in seen:
            filtered["duplicate"] += 1
            continue
        seen.add(h)
        yield piece, line, text, h


def file_passages(files: Iterable[InputFile], tok, doc_opts: DocOptions, opts: PassageOptions
                  ) -> tuple[pa.Table, SkipLog, Counter]:
    """The passages of whole files, in order (ids 0.. within this table; `assemble` renumbers), with what was
    skipped and filtered on the way. Duplicate documents within these files are kept once. Documents are
    encoded in batches of about `BATCH_CHARS` characters."""
    log, filtered = SkipLog(), Counter()
    names = {f.uri: f.name or f.uri for f in files}
    pieces = [Piece(f.uri, 0, f.size, f.size) for f in files]
    cut = splits_safely(tok)
    cols: dict[str, list] = {k: [] for k in ("doc_hash", "file", "line", "text", "n_tokens")}
    docs = _unique(located_documents(pieces, doc_opts, log, filtered), filtered)
    for batch in batches(docs, BATCH_CHARS, size=lambda d: len(d[2])):
        for (piece, line, text, h), offsets in zip(batch, token_offsets(tok, [d[2] for d in batch], cut=cut)):
            counts_lines = suffix_of(piece.uri) in TEXT_SUFFIXES
            for at, passage, n in _document_passages(text, _spans(offsets, opts), line, counts_lines):
                cols["doc_hash"].append(h)
                cols["file"].append(names[piece.uri])
                cols["line"].append(at)
                cols["text"].append(passage)
                cols["n_tokens"].append(n)
    table = pa.table({"id": np.arange(len(cols["text"]), dtype=np.int64), **cols}, schema=PASSAGE_SCHEMA)
    return table, log, filtered


def assemble(tables: list[pa.Table]) -> tuple[pa.Table, int]:
    """The tables of consecutive file groups as one, in order, ids renumbered, and how many documents were
    dropped: one already seen in an earlier group, so the result does not depend on how files were grouped."""
    kept, seen, dropped = [], np.zeros(0, dtype=np.uint64), 0
    for t in tables:
        hashes = t.column("doc_hash").to_numpy()
        keep = ~np.isin(hashes, seen)
        dropped += len(np.unique(hashes[~keep]))
        kept.append(t if keep.all() else t.filter(pa.array(keep)))
        seen = np.union1d(seen, hashes)
    out = pa.concat_tables(kept) if kept else PASSAGE_SCHEMA.empty_table()
    return out.set_column(0, "id", pa.array(np.arange(out.num_rows, dtype=np.int64))), dropped
