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
document starts in that buffer (the list offsets).
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


INT32_MAX = int(np.iinfo(np.int32).max)


def list_type(dtype: np.dtype, tokens: int) -> pa.DataType:
    """`list<dtype>`, or `large_list<dtype>` when `tokens` overflow 32-bit offsets."""
    item = pa.from_numpy_dtype(dtype)
    return pa.large_list(item) if tokens > INT32_MAX else pa.list_(item)


class ShardWriter:
    """One shard, written a document at a time: tokens go to a scratch file, `close()` writes the Arrow file."""

    def __init__(self, path: str | Path, dtype: np.dtype):
        self.path, self.dtype = Path(path), np.dtype(dtype)
        self.scratch = self.path.with_name(f".{self.path.name}.tokens-{os.getpid()}")
        self._tokens = open(self.scratch, "wb")  # noqa: SIM115 -- held across add() calls, closed in close()/discard()
        self._lengths = array("q")

    def add(self, ids: np.ndarray) -> None:
        self._tokens.write(np.ascontiguousarray(ids, dtype=self.dtype).data)
        self._lengths.append(len(ids))

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
            arr = make.from_arrays(pa.array(offsets if make is pa.LargeListArray else offsets.astype(np.int32)), pa.array(flat))
            table = pa.table({COLUMN: arr}, schema=pa.schema([pa.field(COLUMN, typ)]))
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


def _column(path: str | Path) -> pa.Array | None:
    """The `input_ids` list array of a shard (memory-mapped), or None when it has no rows."""
    table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    col = table.column(COLUMN)
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


def read_document_starts(path: str | Path) -> np.ndarray:
    """(docs + 1,) int64: where each document starts in `read_tokens(path)`, then the buffer's length."""
    chunk = _column(path)
    if chunk is None:
        return np.zeros(1, dtype=np.int64)
    offsets = chunk.offsets.to_numpy().astype(np.int64)
    return offsets - offsets[0]


def shard_paths(upstream_dir: Path, manifest_file: str = "shards.json", split: str = "train") -> list[str]:
    """Paths of one split's non-empty shards in a prepared folder, from its `shards.json`."""
    m = json.loads((upstream_dir / manifest_file).read_text())
    return [str(upstream_dir / sh[split]["file"]) for sh in m["shards"] if sh[split]["tokens"] > 0]


def read_documents(path: str | Path) -> list[np.ndarray]:
    """A shard's documents (one token array per row, EOS included when prepare appended it)."""
    table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    return [np.asarray(row.values.to_numpy(zero_copy_only=False)) for chunk in table.column(COLUMN).chunks for row in chunk]
