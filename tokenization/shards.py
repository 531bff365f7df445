"""The one module that knows the Arrow shard schema.

A shard is an uncompressed Arrow IPC file (so it memory-maps) with one row per
document: `input_ids: list<uint16 | uint32>` (uint16 when the vocabulary fits),
one record batch. Arrow's `list` has 32-bit offsets, so a shard of more than
2^31 - 1 tokens (one huge compressed file or row group makes one shard) is a
`large_list` (64-bit offsets) instead; `list_type` chooses, readers take both.
`ShardWriter` takes documents one at a time and spills their tokens to a
scratch file beside the shard, so writing a shard holds one document, not the
shard; the Arrow file is then written from the memory-mapped scratch. Shards
are written to a temporary name and renamed, so a killed writer never leaves a
file under a final name. Reading returns the flat token buffer as a zero-copy
numpy view of the memory map, and, for document-aware packing, where each
document starts in that buffer (the list offsets). Task data (fine-tuning)
adds a second column, `loss_mask: list<uint8>`, one 0/1 per token on the same
offsets: 1 where the token is a target the loss counts. Text shards have no such
column, so their bytes are what they were before it existed.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from pathlib import Path

import numpy as np
import pyarrow as pa

COLUMN = "input_ids"
MASK = "loss_mask"


INT32_MAX = int(np.iinfo(np.int32).max)


def list_type(dtype: np.dtype, tokens: int) -> pa.DataType:
    """`list<dtype>`, or `large_list<dtype>` when `tokens` overflow 32-bit offsets."""
    item = pa.from_numpy_dtype(dtype)
    return pa.large_list(item) if tokens > INT32_MAX else pa.list_(item)


class ShardWriter:
    """One shard, written a document at a time: tokens go to a scratch file, `close()` writes the Arrow file."""

    def __init__(self, path: str | Path, dtype: np.dtype, *, loss_mask: bool = False):
        self.path, self.dtype = Path(path), np.dtype(dtype)
        self.scratch = self.path.with_name(f".{self.path.name}.tokens-{os.getpid()}")
        self._tokens = open(self.scratch, "wb")  # noqa: SIM115 -- held across add() calls, closed in close()/discard()
        self._lengths = array("q")
        self._mask = array("B") if loss_mask else None  # one byte a token: small beside the ids, kept in memory

    def add(self, ids: np.ndarray, mask: np.ndarray | None = None) -> None:
        """One document; `mask` (0/1 per token) is required exactly when the writer stores a loss mask."""
        assert (mask is None) == (self._mask is None), "a loss mask goes with every document of a task shard, or none"
        self._tokens.write(np.ascontiguousarray(ids, dtype=self.dtype).data)
        self._lengths.append(len(ids))
        if self._mask is not None:
            assert len(mask) == len(ids), f"loss mask of {len(mask)} for {len(ids)} tokens"
            self._mask.frombytes(np.ascontiguousarray(mask, dtype=np.uint8).tobytes())

    def close(self) -> dict:
        """Write the shard atomically; returns {docs, tokens, bytes, sha256}."""
        self._tokens.close()
        try:
            offsets = np.zeros(len(self._lengths) + 1, dtype=np.int64)
            np.cumsum(np.frombuffer(self._lengths, dtype=np.int64), out=offsets[1:])
            total = int(offsets[-1])
            flat = np.memmap(self.scratch, dtype=self.dtype, mode="r") if total else np.zeros(0, dtype=self.dtype)
            typ = list_type(self.dtype, total)
            make = pa.LargeListArray if pa.types.is_large_list(typ) else pa.ListArray
            arr_offsets = pa.array(offsets if make is pa.LargeListArray else offsets.astype(np.int32))
            arr = make.from_arrays(arr_offsets, pa.array(flat))
            columns, fields = {COLUMN: arr}, [pa.field(COLUMN, typ)]
            if self._mask is not None:
                columns[MASK] = make.from_arrays(arr_offsets, pa.array(np.frombuffer(self._mask, dtype=np.uint8)))
                fields.append(pa.field(MASK, list_type(np.dtype(np.uint8), total)))
            table = pa.table(columns, schema=pa.schema(fields))
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
            del table, arr, flat
            os.replace(tmp, self.path)
        finally:
            self.scratch.unlink(missing_ok=True)
        return {"docs": len(self._lengths), "tokens": total, "bytes": self.path.stat().st_size, "sha256": sha256_file(self.path)}

    def discard(self) -> None:
        self._tokens.close()
        self.scratch.unlink(missing_ok=True)


def write_shard(path: str | Path, docs: list[np.ndarray], dtype: np.dtype) -> dict:
    """Write one shard of these documents atomically; returns {docs, tokens, bytes, sha256}."""
    writer = ShardWriter(path, dtype)
    for d in docs:
        writer.add(d)
    return writer.close()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _column(path: str | Path, name: str = COLUMN) -> pa.Array | None:
    """A list column of a shard (memory-mapped), or None when it has no rows (or no such column)."""
    table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    if name not in table.column_names:
        return None
    col = table.column(name)
    if col.num_chunks == 0:
        return None
    return col.chunk(0) if col.num_chunks == 1 else pa.concat_arrays(col.chunks)


def read_tokens(path: str | Path) -> np.ndarray:
    """The flat token buffer of a shard, a zero-copy view of its memory map."""
    chunk = _column(path)
    if chunk is None:
        return np.zeros(0, dtype=np.uint16)
    values = chunk.values.slice(chunk.offsets[0].as_py(), chunk.offsets[-1].as_py() - chunk.offsets[0].as_py())
    return values.to_numpy(zero_copy_only=True)


def has_loss_mask(path: str | Path) -> bool:
    """Whether a shard holds task data (a `loss_mask` column)."""
    return MASK in pa.ipc.open_file(pa.memory_map(str(path), "r")).schema.names


def read_loss_mask(path: str | Path) -> np.ndarray | None:
    """The flat 0/1 uint8 loss mask beside `read_tokens(path)` (a zero-copy view), or None for a text shard."""
    if not has_loss_mask(path):
        return None
    chunk = _column(path, MASK)
    if chunk is None:
        return np.zeros(0, dtype=np.uint8)
    values = chunk.values.slice(chunk.offsets[0].as_py(), chunk.offsets[-1].as_py() - chunk.offsets[0].as_py())
    return values.to_numpy(zero_copy_only=True)


def read_document_starts(path: str | Path) -> np.ndarray:
    """(docs + 1,) int64: where each document starts in `read_tokens(path)`, then the buffer's length."""
    chunk = _column(path)
    if chunk is None:
        return np.zeros(1, dtype=np.int64)
    offsets = chunk.offsets.to_numpy().astype(np.int64)
    return offsets - offsets[0]


def shard_paths(upstream_dir: Path, manifest_file: str = "shards.json", split: str = "train",
                source: str | None = None) -> list[str]:
    """Paths of one split's non-empty shards in a prepared folder, from its `shards.json` (of one source of a
    mixture when `source` is given)."""
    m = json.loads((upstream_dir / manifest_file).read_text())
    return [str(upstream_dir / sh[split]["file"]) for sh in m["shards"]
            if sh[split]["tokens"] > 0 and (source is None or sh.get("source") == source)]


def read_documents(path: str | Path) -> list[np.ndarray]:
    """A shard's documents (one token array per row, EOS included when prepare appended it)."""
    table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    return [np.asarray(row.values.to_numpy(zero_copy_only=False)) for chunk in table.column(COLUMN).chunks for row in chunk]
