"""The config sections that name a corpus: `data` (one corpus or a weighted mixture of sources) and `index` (a
knowledge corpus for retrieval), both read like documents (`tokenization.documents.DocOptions`).

Part of the schema (`pipeline.schema` nests them and re-exports them); here because they are a third of it.
Fields made with `no_fp` never change a stage's output and stay out of its fingerprint.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Literal

from tokenization.documents import DocOptions


def no_fp(default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A dataclass field that does not enter the fingerprint."""
    return dataclasses.field(default=default, metadata={"fingerprint": False}, **kw)


@dataclass(frozen=True, kw_only=True)
class DataSource:
    """One source of a weighted mixture (`data.sources`): its own inputs and its share of the training samples."""

    __pydantic_config__ = {"extra": "forbid", "use_attribute_docstrings": True, "allow_inf_nan": False}

    name: str
    """Names the source in metrics (`val_loss_<name>`, `share_<name>`): letters, digits, `_` and `-`."""
    inputs: list[str]
    """Its files, folders or globs, in any form data.inputs accepts."""
    weight: float = 1.0
    """Its share of the training samples (weights are normalised to sum to 1). Changing it retrains; it never re-tokenises (prepare's fingerprint leaves weights out)."""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.name):
            raise ValueError(f"DataSource.name: {self.name!r} must be letters, digits, '_' or '-' (it names metrics)")
        if not self.inputs:
            raise ValueError(f"DataSource.inputs: source {self.name!r} needs at least one file, folder or glob")
        if not self.weight > 0:
            raise ValueError(f"DataSource.weight: source {self.name!r} needs a weight > 0, got {self.weight}")



@dataclass(frozen=True, kw_only=True)
class DataConfig(DocOptions):
    """The `data` section: the corpus, how documents are cleaned (`DocOptions`) and how they are sharded."""

    inputs: list[str] = dataclasses.field(default_factory=list)
    """Files, directories or globs: local paths, pyarrow.fs URIs (s3://, gs://, hdfs://; filesystem options as a query, e.g. ?endpoint_override=host:9000&scheme=http) or pkg://PACKAGE/glob (data a package ships). .txt/.md files are one document each; .jsonl, .jsonl.gz, .jsonl.zst, .json (an array of records or strings) and .parquet hold one per record; a UTF-8 BOM is dropped. A folder is read for every one of these; other files in it are named in a warning. Files are identified by content and by their path relative to the entry (package-relative for pkg://), so a copied corpus is the same input. Give this or `sources`."""
    sources: list[DataSource] = dataclasses.field(default_factory=list)
    """A weighted mixture instead of one corpus: `[{name, inputs, weight}, ...]`. Each source is sharded on its own (a shard never mixes sources); training draws each source's share of every run of samples from its weight, and evaluation reports a validation loss per source. The tokenizer trains on all of them."""
    val_fraction: float = 0.05
    """Fraction of documents (by content hash) held out for validation."""
    shard_size_mb: float = 64.0
    """Target raw bytes per shard; fixes the shard plan, hence the output bytes."""
    append_eos: bool = True
    """Append the EOS token after every document."""
    dedup: bool = True
    """Drop exact duplicate documents (by content hash) across all shards."""
    num_tasks: int | None = no_fp(None)
    """Ray tasks for prepare (default: one per shard); never changes the output."""
    max_retries: int = no_fp(3)
    """Ray retries of a task whose worker died."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.inputs and self.sources:
            raise ValueError("DataConfig.sources: give data.inputs (one corpus) or data.sources (a mixture), not both")
        if not self.inputs and not self.sources:
            raise ValueError("DataConfig.inputs: give at least one file, folder or glob (or data.sources)")
        names = [s.name for s in self.sources]
        if dup := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"DataConfig.sources: source names must be unique (they name metrics), repeated: {', '.join(dup)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"DataConfig.val_fraction: must be in (0, 1), got {self.val_fraction}")
        if self.shard_size_mb <= 0:
            raise ValueError(f"DataConfig.shard_size_mb: must be > 0, got {self.shard_size_mb}")
        if self.num_tasks is not None and self.num_tasks < 1:
            raise ValueError(f"DataConfig.num_tasks: must be >= 1, got {self.num_tasks}")
        if self.max_retries < 0:
            raise ValueError(f"DataConfig.max_retries: must be >= 0, got {self.max_retries}")

    def input_groups(self) -> dict[str, list[str]]:
        """The inputs by source: {name: specs} for a mixture, {"": data.inputs} for one corpus."""
        return {s.name: list(s.inputs) for s in self.sources} if self.sources else {"": list(self.inputs)}

    def all_inputs(self) -> list[str]:
        """Every input spec, of every source (what the tokenizer trains on and every node must see)."""
        return [spec for specs in self.input_groups().values() for spec in specs]

    def mixture(self) -> dict[str, float]:
        """{source name: normalised weight}; empty for one corpus."""
        total = sum(s.weight for s in self.sources)
        return {s.name: s.weight / total for s in self.sources}


@dataclass(frozen=True, kw_only=True)
class IndexConfig(DocOptions):
    """The `index` section: a knowledge corpus for retrieval, read like `data` (`DocOptions`), cut into passages."""

    inputs: list[str]
    """The knowledge corpus, in any form data.inputs accepts (files, folders, globs, pyarrow.fs URIs, pkg://). Its files are identified by content, so editing one reruns only `index` and what reads it, never `train`."""
    passage_tokens: int = 128
    """Tokens per passage (the tokenizer stage's tokenizer)."""
    overlap: int = 16
    """Tokens each passage shares with the one before it."""
    kind: Literal["bm25", "dense", "hybrid"] = "bm25"
    """bm25 (bm25s, word tokens); dense (faiss inner product over the trained model's mean-pooled, L2-normalised final hidden states: needs `train`); hybrid (reciprocal rank fusion of both)."""
    num_tasks: int | None = no_fp(None)
    """Ray tasks that cut passages (default: one per input file); never changes the output."""
    max_retries: int = no_fp(3)
    """Ray retries of a task whose worker died."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.inputs:
            raise ValueError("IndexConfig.inputs: give at least one file, folder or glob")
        if self.format != "text":
            raise ValueError(f"IndexConfig.format: a knowledge corpus is text, got {self.format!r}")
        if self.passage_tokens < 1:
            raise ValueError(f"IndexConfig.passage_tokens: must be >= 1, got {self.passage_tokens}")
        if not 0 <= self.overlap < self.passage_tokens:
            raise ValueError(f"IndexConfig.overlap: must be in [0, passage_tokens={self.passage_tokens}), got {self.overlap}")
        if self.num_tasks is not None and self.num_tasks < 1:
            raise ValueError(f"IndexConfig.num_tasks: must be >= 1, got {self.num_tasks}")
        if self.max_retries < 0:
            raise ValueError(f"IndexConfig.max_retries: must be >= 0, got {self.max_retries}")
