"""The Ray-side entry points of the data stages, kept in a module with light imports.

Ray ships a task to a worker by reference to its module; importing a stage
module there would drag in every stage (torch, DeepSpeed) just to tokenize.
These wrappers import only `tokenization` (numpy, pyarrow, tokenizers) and the
fault-injection hook, and call the plain functions that do the work.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from pipeline import faults


def _limit_threads(num_cpus: float) -> None:
    """Keep HF tokenizers' Rust thread pool to the CPUs Ray reserved for this task (it would
    otherwise start one thread per core in every task). Must run before the pool's first use."""
    os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, int(num_cpus))))


def hash_task(shards: list, indices: list[int], opts: Any) -> list[np.ndarray]:
    from tokenization.sharding import hash_shards

    return hash_shards([shards[i] for i in indices], opts)


def tokenize_task(shards: list, indices: list[int], drops: list[np.ndarray], kw: dict[str, Any], num_cpus: float) -> list[dict]:
    from tokenization.sharding import tokenize_shard

    _limit_threads(num_cpus)
    out = []
    for i, drop in zip(indices, drops):
        faults.maybe_fail("prepare.shard", i)
        out.append(tokenize_shard(i, shards[i], drop, **kw))
    return out


def tokenizer_task(files: list, **kw: Any) -> dict[str, float]:
    from tokenization.bpe import build_tokenizer

    return build_tokenizer(files, **kw)
