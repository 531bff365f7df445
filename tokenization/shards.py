"""The one module that knows the Arrow shard schema.

A shard is an uncompressed Arrow IPC file (so it memory-maps) with one row per
document: `input_ids: list<uint16 | uint32>` (uint16 when the vocabulary fits).
Shards are written to a temporary name and renamed, so a killed writer never
leaves a file under a final name. Reading returns the flat token buffer as a
zero-copy numpy view of the memory map.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

COLUMN = "input_ids"


def schema(dtype: np.dtype) -> pa.Schema:
    return pa.schema([pa.field(COLUMN, pa.list_(pa.from_numpy_dtype(dtype)))])


def write_shard(path: str | Path, docs: list[np.ndarray], dtype: np.dtype) -> dict:
    """Write one shard atomically; returns {docs, tokens, bytes, sha256}."""
    path = Path(path)
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum([len(d) for d in docs], out=offsets[1:])
    flat = np.concatenate(docs).astype(dtype, copy=False) if docs else np.zeros(0, dtype=dtype)
    arr = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(flat))
    table = pa.table({COLUMN: arr}, schema=schema(dtype))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, path)
    return {"docs": len(docs), "tokens": int(len(flat)), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_tokens(path: str | Path) -> np.ndarray:
    """The flat token buffer of a shard, a zero-copy view of its memory map."""
    source = pa.memory_map(str(path), "r")
    table = pa.ipc.open_file(source).read_all()
    col = table.column(COLUMN)
    if col.num_chunks == 0:
        return np.zeros(0, dtype=np.uint16)
    chunk = col.chunk(0) if col.num_chunks == 1 else pa.concat_arrays(col.chunks)
    values = chunk.values.slice(chunk.offsets[0].as_py(), chunk.offsets[-1].as_py() - chunk.offsets[0].as_py())
    return values.to_numpy(zero_copy_only=True)


def shard_paths(upstream_dir: Path, manifest_file: str = "shards.json", split: str = "train") -> list[str]:
    """Paths of one split's non-empty shards in a prepared folder, from its `shards.json`."""
    m = json.loads((upstream_dir / manifest_file).read_text())
    return [str(upstream_dir / sh[split]["file"]) for sh in m["shards"] if sh[split]["tokens"] > 0]
