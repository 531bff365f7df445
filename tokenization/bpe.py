"""Byte-level BPE with Hugging Face `tokenizers`: train, load, and per-token byte lengths.

Byte-level means every string is representable (no unknown token) and every
token stands for a fixed byte string, which is what makes bits-per-byte exact:
`token_byte_lengths` recovers those byte counts from the vocabulary.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tokenization.documents import DocOptions, doc_hash, documents
from tokenization.readers import InputError, InputFile, Piece, SkipLog

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOS, PAD]


def train_bpe(texts: Iterable[str], *, vocab_size: int, min_frequency: int = 2,
              special_tokens: list[str] | None = None) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens or SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(str(path))
    return Tokenizer.from_file(str(path))


def tokenizer_hash(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes->printable-unicode map used by the ByteLevel pre-tokenizer."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """bytes[id]: how many UTF-8 bytes token `id` stands for (0 for special tokens)."""
    dec = _byte_decoder()
    specials = {t.content for t in tok.get_added_tokens_decoder().values()}
    out = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    for token, idx in tok.get_vocab().items():
        out[idx] = 0 if token in specials else sum(1 for ch in token if ch in dec)
    return out


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def build_tokenizer(files: list[InputFile], *, opts: DocOptions, vocab_size: int, min_frequency: int,
                    max_train_bytes: int, special_tokens: list[str], out_dir: str) -> dict[str, float]:
    """Train a BPE on a deterministic sample of about `max_train_bytes` (documents whose content hash
    falls below max_train_bytes / corpus bytes) and save it as out_dir/tokenizer.json."""
    total = sum(f.size for f in files)
    rate = min(1.0, max_train_bytes / max(1, total))
    seen = {"bytes": 0, "docs": 0}
    log, filtered = SkipLog(), Counter()

    def texts():
        for text in documents([Piece(f.uri, 0, f.size, f.size) for f in files], opts, log, filtered):
            if rate < 1.0 and doc_hash(text) / 2**64 >= rate:
                continue
            if seen["bytes"] >= max_train_bytes:
                return
            text = text[: max_train_bytes - seen["bytes"]]
            seen["bytes"] += len(text.encode("utf-8"))
            seen["docs"] += 1
            yield text

    tok = train_bpe(texts(), vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens)
    if seen["docs"] == 0:
        raise InputError("tokenizer: no documents to train on (every record was skipped or filtered)")
    tok.save(str(Path(out_dir) / "tokenizer.json"))
    return {"vocab_size": float(tok.get_vocab_size()), "train_bytes": float(seen["bytes"]), "train_docs": float(seen["docs"]),
            "sample_rate": rate, **{f"skipped_{k}": float(v) for k, v in log.counts.items()}}
