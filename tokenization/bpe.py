"""Byte-level BPE with Hugging Face `tokenizers`: train, load, and per-token byte lengths.

Byte-level means every string is representable (no unknown token) and every
token stands for a fixed byte string, which is what makes bits-per-byte exact:
`token_byte_lengths` recovers those byte counts from the vocabulary.

Long documents are trained on and encoded in pieces (`split_text`), because
`tokenizers` holds about 170 bytes per character of a text while it encodes
it: a 100 MB document would need some 16 GiB at once. The cuts fall where
GPT-2's pre-tokenizer always ends a pre-token, and BPE never merges across
pre-tokens, so the pieces give exactly the tokens (and merges) of the whole.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tokenization.documents import DocOptions, batches
from tokenization.inputs import InputError, InputFile
from tokenization.readers import SkipLog
from tokenization.sample import sample_parts, sample_texts

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOS, PAD]
PIECE_CHARS = 1 << 16  # a longer document is tokenized in pieces of about this many characters
BATCH_CHARS = 1 << 21  # characters per encode_batch call: bounds the Encoding objects alive at once
# A safe cut: a space or newline right after a non-whitespace character. No alternative of GPT-2's
# pre-tokenizer regex matches a non-space followed by whitespace, so a pre-token always ends there.
_CUT = re.compile(r"(?<=\S)[ \n]")


def split_text(text: str, piece_chars: int = PIECE_CHARS) -> Iterator[str]:
    """`text` in consecutive pieces of at least `piece_chars` characters (the last may be shorter), cut
    only at safe positions; a text with no safe position after `piece_chars` stays one piece."""
    start = 0
    while len(text) - start > piece_chars and (m := _CUT.search(text, start + piece_chars)):
        yield text[start : m.start()]
        start = m.start()
    yield text if start == 0 else text[start:]


def _specials_cut_safely(specials: Iterable[dict]) -> bool:
    """Added tokens are matched before pre-tokenization: a cut is safe only if none can contain or
    swallow whitespace."""
    return all(not any(c.isspace() for c in t["content"]) and not (t.get("lstrip") or t.get("rstrip") or t.get("single_word"))
               for t in specials)


def splits_safely(tok: Tokenizer) -> bool:
    """True when `split_text` pieces encode exactly like the whole text: a byte-level pre-tokenizer with
    GPT-2's regex and no prefix space, no normalizer, and added tokens without whitespace (our own
    tokenizers and GPT-2-style ones; a given tokenizer of another kind is encoded whole)."""
    spec = json.loads(tok.to_str())
    pre = spec.get("pre_tokenizer") or {}
    return (spec.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False) and _specials_cut_safely(spec.get("added_tokens", [])))


def encode_documents(tok: Tokenizer, texts: list[str], dtype: np.dtype, *, piece_chars: int = PIECE_CHARS,
                     batch_chars: int = BATCH_CHARS) -> list[np.ndarray]:
    """The token ids of each text (no special tokens added), encoded in batches of about `batch_chars`
    characters, long texts in pieces when that is exact, so memory does not grow with the longest text."""
    cut = splits_safely(tok)
    parts: list[list[np.ndarray]] = [[] for _ in texts]
    pieces = ((i, piece) for i, text in enumerate(texts) for piece in (split_text(text, piece_chars) if cut else (text,)))
    for chunk in batches(pieces, batch_chars, size=lambda owned: len(owned[1])):
        encodings = tok.encode_batch([piece for _, piece in chunk], add_special_tokens=False)
        for (owner, _), enc in zip(chunk, encodings):
            parts[owner].append(np.asarray(enc.ids, dtype=dtype))
    return [p[0] if len(p) == 1 else np.concatenate(p) for p in parts]


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
    specials = [{"content": t} for t in special_tokens or SPECIAL_TOKENS]
    # Long texts train in pieces (same word counts, hence the same merges) so memory stays bounded.
    pieces = (p for t in texts for p in split_text(t)) if _specials_cut_safely(specials) else texts
    tok.train_from_iterator(pieces, trainer=trainer)
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
    """Train a BPE on a deterministic sample of about `max_train_bytes` spread over the corpus (see
    `tokenization.sample`: parts of files are drawn, and only those are read) and save it as out_dir/tokenizer.json."""
    seen: Counter = Counter()
    log, filtered = SkipLog(), Counter()
    rate, _ = sample_parts(files, max_train_bytes)
    tok = train_bpe(sample_texts(files, opts, max_train_bytes, log, filtered, seen), vocab_size=vocab_size,
                    min_frequency=min_frequency, special_tokens=special_tokens)
    if seen["docs"] == 0:
        raise InputError("tokenizer: no documents to train on (every record was skipped or filtered)")
    tok.save(str(Path(out_dir) / "tokenizer.json"))
    return {"vocab_size": float(tok.get_vocab_size()), "train_bytes": float(seen["bytes"]), "train_docs": float(seen["docs"]),
            "sample_rate": rate, **{f"skipped_{k}": float(v) for k, v in log.counts.items()}}
