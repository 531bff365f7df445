"""Retrieval over a passage table: BM25 (bm25s), dense (faiss over our model's pooled states), or both fused.

A `Retriever` holds the passages (an Arrow table with id, doc_hash, file,
line, text; see `tokenization.passages`) and one index per kind:
- `bm25`: `bm25s` over lower-cased word tokens (`\\w+`, no stop list), scored
  exactly for every passage, so leaving passages out is exact. A passage
  scoring 0 (no word in common with the query) is never a hit: it would put
  unrelated text in front of the prompt, so a search may return fewer than k.
- `dense`: a `faiss` inner-product index over L2-normalised mean-pooled final
  hidden states of the trained model (`embed`), i.e. cosine similarity;
  queries are embedded with the same model and tokenizer.
- `hybrid`: reciprocal rank fusion (score = sum of 1 / (60 + rank)) of the two.

`search(..., exclude=[doc_hash | None per query])` never returns a passage of
the query's own document (the leakage guard) and still returns k hits when at
least k other passages exist (for BM25: k other passages that share a word
with the query). Persistence pickles nothing: the passages are
Parquet, bm25s writes its arrays with `np.save(allow_pickle=False)` and its
vocabulary as JSON (loaded with `allow_pickle=False`), faiss its own format,
and `retriever.json` says what the folder holds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    import torch

Kind = Literal["bm25", "dense", "hybrid"]
KINDS = ("bm25", "dense", "hybrid")
RRF_K = 60  # the usual reciprocal-rank-fusion constant (Cormack et al. 2009)
_WORD = re.compile(r"\w+")
PASSAGES_FILE, META_FILE, BM25_DIR, DENSE_FILE = "passages.parquet", "retriever.json", "bm25", "dense.faiss"


class Hit(NamedTuple):
    """One retrieved passage (a named tuple: a search makes k per query, and a frozen dataclass is slower to make)."""

    passage_id: int
    doc_hash: int
    file: str
    line: int
    text: str
    score: float


def words(text: str) -> list[str]:
    """BM25's tokens: lower-cased runs of word characters."""
    return _WORD.findall(text.lower())


def embed(model: torch.nn.Module, token_lists: list[list[int]], *, batch_size: int = 32) -> np.ndarray:
    """(N, C) float32: the mean of the final hidden states over each sequence's tokens, L2-normalised (an empty
    sequence is a zero row). Sequences longer than the model's context keep their last `max_seq_len` tokens.
    Batches are right-padded: the model is causal, so padding never reaches a real position. (torch is imported
    here, not by the module: a BM25 index is built and searched without it.)"""
    import torch

    max_len = model.config.max_seq_len
    device = next(model.parameters()).device
    seqs = [list(t)[-max_len:] for t in token_lists]
    out = np.zeros((len(seqs), model.config.d_model), dtype=np.float32)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths together: little padding
    order = [i for i in order if seqs[i]]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        try:
            for at in range(0, len(order), batch_size):
                rows = order[at:at + batch_size]
                T = max(len(seqs[i]) for i in rows)
                idx = torch.zeros((len(rows), T), dtype=torch.long)
                mask = torch.zeros((len(rows), T, 1))
                for r, i in enumerate(rows):
                    idx[r, :len(seqs[i])] = torch.tensor(seqs[i])
                    mask[r, :len(seqs[i])] = 1.0
                h = model.hidden_states(idx.to(device)).float().cpu()  # (B, T, C)
                pooled = (h * mask).sum(1) / mask.sum(1)  # (B, C)
                out[rows] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        finally:
            model.train(was_training)
    return out


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best finite scores, best first; ties go to the lower index (deterministic)."""
    if k < len(scores):
        idx = np.argpartition(-scores, k - 1)[:k]
        cut = scores[idx].min()  # the k-th best value
        if np.count_nonzero(scores[idx] == cut) < np.count_nonzero(scores == cut):  # ties cross the cut: lowest first
            idx = np.concatenate([idx[scores[idx] > cut], np.flatnonzero(scores == cut)[:k - np.count_nonzero(scores[idx] > cut)]])
    else:
        idx = np.arange(len(scores))
    idx = idx[np.isfinite(scores[idx])]
    return idx[np.lexsort((idx, -scores[idx]))]


class Retriever:
    """Passages and their index; build with `Retriever.build`, reopen with `Retriever.load`."""

    def __init__(self, passages: pa.Table, kind: Kind, *, bm25: Any = None, dense: Any = None,
                 model: torch.nn.Module | None = None, tokenizer: Any = None, batch_size: int = 32):
        assert kind in KINDS, f"unknown retrieval kind {kind!r} (known: {', '.join(KINDS)})"
        self.passages, self.kind = passages, kind
        self._bm25, self._dense = bm25, dense
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self._doc = passages.column("doc_hash").to_numpy()  # (N,) uint64
        self._rows_of: dict[int, np.ndarray] | None = None
        self._columns: dict[str, list] | None = None

    def __len__(self) -> int:
        return self.passages.num_rows

    # ---- building ---------------------------------------------------------------------------------------
    @classmethod
    def build(cls, passages: pa.Table, kind: Kind = "bm25", *, model: torch.nn.Module | None = None,
              tokenizer: Any = None, batch_size: int = 32) -> Retriever:
        """Index `passages`. Dense kinds need the model and its tokenizer (anything with `encode_batch`)."""
        if kind not in KINDS:
            raise ValueError(f"unknown retrieval kind {kind!r} (known: {', '.join(KINDS)})")
        texts = passages.column("text").to_pylist()
        bm25 = _bm25_index(texts) if kind in ("bm25", "hybrid") else None
        dense = None
        if kind in ("dense", "hybrid"):
            if model is None or tokenizer is None:
                raise ValueError(f"retrieval kind {kind!r} embeds passages with the trained model: pass model= and tokenizer=")
            dense = _dense_index(embed(model, _encode(tokenizer, texts), batch_size=batch_size))
        return cls(passages, kind, bm25=bm25, dense=dense, model=model, tokenizer=tokenizer, batch_size=batch_size)

    # ---- searching --------------------------------------------------------------------------------------
    def search(self, queries: list[str], k: int, *, exclude: list[int | None] | None = None) -> list[list[Hit]]:
        """The k best passages for each query, best first; none of `exclude[i]`'s document for query i."""
        if not 1 <= k <= len(self):
            raise ValueError(f"k={k} must be between 1 and the number of passages in the index ({len(self)})")
        exclude = [None] * len(queries) if exclude is None else list(exclude)
        if len(exclude) != len(queries):
            raise ValueError(f"exclude holds {len(exclude)} entries for {len(queries)} queries")
        banned = [self._rows(h) for h in exclude]
        if self.kind == "bm25":
            ranked = [self._bm25_search(q, k, b) for q, b in zip(queries, banned)]
        elif self.kind == "dense":
            ranked = self._dense_search(queries, k, banned)
        else:
            ranked = self._hybrid_search(queries, k, banned)
        return [[self._hit(int(i), float(s)) for i, s in rows] for rows in ranked]

    def _rows(self, h: int | None) -> np.ndarray:
        """The rows of document `h` (none for None or an unknown document)."""
        if h is None:
            return np.zeros(0, dtype=np.int64)
        if self._rows_of is None:
            order = np.argsort(self._doc, kind="stable")
            uniq, starts = np.unique(self._doc[order], return_index=True)
            self._rows_of = {int(u): r for u, r in zip(uniq, np.split(order, starts[1:]))}
        return self._rows_of.get(int(h), np.zeros(0, dtype=np.int64))

    def _bm25_scores(self, query: str) -> np.ndarray:
        ids = self._bm25.get_tokens_ids(words(query))
        if not ids:  # no word of the query is in the corpus: every passage scores 0
            return np.zeros(len(self), dtype=np.float32)
        return np.asarray(self._bm25.get_scores_from_ids(ids), dtype=np.float32)

    def _bm25_matches(self, query: str) -> np.ndarray:
        """BM25 scores, -inf where a passage shares no word with the query (score <= 0): not a hit, at any rank."""
        scores = self._bm25_scores(query)
        scores[scores <= 0] = -np.inf
        return scores

    def _bm25_search(self, query: str, k: int, banned: np.ndarray) -> list[tuple[int, float]]:
        scores = self._bm25_matches(query)
        scores[banned] = -np.inf
        top = _top(scores, k)
        return list(zip(top.tolist(), scores[top].tolist()))

    def _dense_candidates(self, queries: list[str], depth: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """faiss's best max(depth) passages per query: (scores, rows), -1 rows past the end."""
        q = embed(self.model, _encode(self.tokenizer, queries), batch_size=self.batch_size)
        return self._dense.search(q, min(len(self), max(depth)))

    def _dense_search(self, queries: list[str], k: int, banned: list[np.ndarray]) -> list[list[tuple[int, float]]]:
        # Ask for k more than the query's own document holds: after dropping those, k remain (when they exist).
        scores, rows = self._dense_candidates(queries, [k + len(b) for b in banned])
        out = []
        for s, r, b in zip(scores, rows, banned):
            keep = r >= 0
            if len(b):  # a document's few rows: one comparison table is cheaper than np.isin's sort
                keep &= (r[:, None] != b[None, :]).all(axis=1) if len(b) <= 64 else ~np.isin(r, b)
            out.append(list(zip(r[keep][:k].tolist(), s[keep][:k].tolist())))
        return out

    def _hybrid_search(self, queries: list[str], k: int, banned: list[np.ndarray]) -> list[list[tuple[int, float]]]:
        depth = [min(len(self), max(k, 50) + len(b)) for b in banned]  # fuse the two lists' heads, as RRF does
        _, dense_rows = self._dense_candidates(queries, depth)
        out = []
        for query, d_rows, b, n in zip(queries, dense_rows, banned, depth):
            fused = np.zeros(len(self))
            sparse = _top(self._bm25_matches(query), n)  # only passages sharing a word
            for ranking in (sparse, d_rows[(d_rows >= 0)][:n]):
                fused[ranking] += 1.0 / (RRF_K + 1 + np.arange(len(ranking)))
            fused[fused == 0] = -np.inf  # in neither list: not a candidate
            fused[b] = -np.inf
            top = _top(fused, k)
            out.append(list(zip(top.tolist(), fused[top].tolist())))
        return out

    def _hit(self, row: int, score: float) -> Hit:
        if self._columns is None:  # Python lists once, not an Arrow slice per hit
            self._columns = {name: self.passages.column(name).to_pylist() for name in ("id", "file", "line", "text")}
        c = self._columns
        return Hit(passage_id=c["id"][row], doc_hash=int(self._doc[row]), file=c["file"][row], line=c["line"][row],
                   text=c["text"][row], score=score)

    # ---- persistence ------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> list[str]:
        """Write the passages and the index into `folder`; returns the files written (relative)."""
        import faiss
        import pyarrow.parquet as pq

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(self.passages, folder / PASSAGES_FILE)
        files = [PASSAGES_FILE]
        if self._bm25 is not None:
            self._bm25.save(folder / BM25_DIR, allow_pickle=False, show_progress=False)
            files += sorted(f"{BM25_DIR}/{p.name}" for p in (folder / BM25_DIR).iterdir())
        if self._dense is not None:
            faiss.write_index(self._dense, str(folder / DENSE_FILE))
            files.append(DENSE_FILE)
        meta = {"kind": self.kind, "passages": len(self), "words": _WORD.pattern, "rrf_k": RRF_K,
                "dim": None if self._dense is None else int(self._dense.d)}
        (folder / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return [*files, META_FILE]

    @classmethod
    def load(cls, folder: str | Path, *, model: torch.nn.Module | None = None, tokenizer: Any = None,
             batch_size: int = 32) -> Retriever:
        """Reopen a saved retriever. Dense kinds need the model and tokenizer that built it (to embed queries)."""
        import bm25s
        import faiss
        import pyarrow.parquet as pq

        folder = Path(folder)
        meta = json.loads((folder / META_FILE).read_text())
        kind = meta["kind"]
        if kind in ("dense", "hybrid") and (model is None or tokenizer is None):
            raise ValueError(f"{folder}: a {kind!r} index embeds queries with its model: pass model= and tokenizer=")
        passages = pq.read_table(folder / PASSAGES_FILE)
        bm25 = (bm25s.BM25.load(str(folder / BM25_DIR), allow_pickle=False, show_progress=False)
                if kind in ("bm25", "hybrid") else None)
        dense = faiss.read_index(str(folder / DENSE_FILE)) if kind in ("dense", "hybrid") else None
        if dense is not None and dense.d != model.config.d_model:
            raise ValueError(f"{folder}: the index holds {dense.d}-dim embeddings, the model makes {model.config.d_model}")
        return cls(passages, kind, bm25=bm25, dense=dense, model=model, tokenizer=tokenizer, batch_size=batch_size)


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


def _bm25_index(texts: list[str]) -> Any:
    import bm25s

    # Our own vocabulary, in sorted order: bm25s numbers the words of a list-of-words corpus in set order, which
    # changes with each process's string hashing, so the saved index would differ from run to run.
    docs = [words(t) for t in texts]
    vocab = {w: i for i, w in enumerate(sorted({w for d in docs for w in d}))}
    index = bm25s.BM25()
    index.index(([[vocab[w] for w in d] for d in docs], vocab), show_progress=False)
    return index


def _dense_index(vectors: np.ndarray) -> Any:
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])  # exact inner product = cosine on normalised vectors
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index
