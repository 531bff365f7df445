"""Secrets never reach MLflow: params and tags whose key names a secret are logged as `***`.

A key names a secret when a part of it holds the word token, secret, password,
credential or api_key (but not a vocabulary token such as `tokenizer.eos_token`);
the password of a URL such as `s3://key:secret@bucket` is masked too.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***"


# --- secrets -------------------------------------------------------------------

_SECRET_WORDS = {"secret", "secrets", "password", "passwd", "passphrase", "credential", "credentials", "apikey"}
_VOCABULARY_TOKENS = {"eos", "bos", "pad", "unk", "sep", "cls", "mask", "special"}  # `eos_token` is a word, not a key
_URL_PASSWORD = re.compile(r"(://[^/@:\s]*:)[^/@\s]+@")


def is_secret_key(key: str) -> bool:
    """True when a part of the dotted `key` names a secret: the word token (`hf_token`, `authToken`, `token`),
    secret, password, credential or api_key, in any case or separator style; `eos_token` and `max_tokens` do not."""
    for part in key.split("."):
        words = re.findall(r"[a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", part).lower())
        if any(w in _SECRET_WORDS for w in words) or "api_key" in "_".join(words) or "private_key" in "_".join(words):
            return True
        if any(w == "token" and (i == 0 or words[i - 1] not in _VOCABULARY_TOKENS) for i, w in enumerate(words)):
            return True
    return False


def redact(key: str, value: Any) -> Any:
    """`value` with secrets replaced by `***`: all of it under a secret key, nested secret keys of a dict
    (a raw DeepSpeed JSON), and the password of a URL."""
    if is_secret_key(key):
        return REDACTED
    if isinstance(value, dict):
        return {k: redact(f"{key}.{k}", v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(key, v) for v in value]
    if isinstance(value, str):
        return _URL_PASSWORD.sub(rf"\1{REDACTED}@", value)
    return value
