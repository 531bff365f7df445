"""Task data for fine-tuning: prompt/completion and chat records, rendered into token ids and a loss mask.

`data.format` says how a JSON record becomes a document. `text` is plain
pretraining text (the reader's `text_field`). `prompt_completion` reads
`{"prompt", "completion"}`; `chat` reads `{"messages": [{"role", "content"}...]}`
with roles system, user and assistant. A task record is checked here, where the
reader can still name its file:line, and becomes a canonical document: the JSON
of its `[role, content]` turns (roles `prompt` / `completion` for the
prompt/completion format). That string is what the rest of the data path
already handles (normalisation, content hash for de-duplication and the
train/validation split); `encode_task` turns it into tokens only in `prepare`.

Rendering (the built-in template): a prompt/completion pair is the prompt's
tokens then the completion's; a chat turn is its role marker (`<|user|>`...),
its content, then `<|end|>`, each marker one special token the tokenizer stage
adds (`CHAT_MARKERS`). Each text part is tokenized on its own and the ids are
concatenated, so the mask boundary falls exactly between parts (BPE never
merges across it). The loss mask is 1 on the tokens the model must learn to
produce: the completion, or an assistant turn's content and its `<|end|>`;
its role marker and everything else is 0. The EOS that `prepare` appends counts
when the last part does.

Rendering (a Jinja chat template, Hugging Face's form: `messages`,
`add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`; given as
`data.chat_template` or taken from a loaded tokenizer's `tokenizer_config.json`):
the conversation is rendered whole, and each assistant turn's span is found by
rendering twice more: the turns before it with the generation prompt (where its
content starts) and the turns up to it (where its end markers stop). Those must
be prefixes of the whole rendering and the span must hold the turn's content;
a template for which they are not (it reorders, or drops the assistant's
content) cannot place the loss mask and is refused (`TemplateError`). The spans
are learnt, the text between them is not; each span is tokenized on its own,
its markers as the special tokens the tokenizer holds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np

from tokenization.inputs import InputError
from tokenization.records import SURROGATE, Result


class TemplateError(InputError):
    """A chat template (`data.chat_template`) that cannot render a conversation with its assistant turns in place."""

FORMATS = ("text", "prompt_completion", "chat")
ROLES = ("system", "user", "assistant")
END = "<|end|>"
CHAT_MARKERS = [f"<|{r}|>" for r in ROLES] + [END]  # the special tokens the chat template needs


def _bad_unicode(text: str, what: str) -> Result | None:
    if not text.isascii() and (bad := SURROGATE.search(text)):
        return "invalid_utf8", (f"{what} holds a lone surrogate \\u{ord(bad.group()):04x} at character {bad.start()}, "
                                "which is not valid Unicode")
    return None


def _string(record: dict, key: str, replace: bool) -> str | Result:
    if key not in record:
        return "missing_field", f"field {key!r} is missing"
    value = record[key]
    if not isinstance(value, str):
        return "not_a_string", f"field {key!r} is {type(value).__name__}, not a string"
    if (bad := _bad_unicode(value, f"field {key!r}")) is not None:
        return (bad if not replace else SURROGATE.sub("\ufffd", value))
    return value


def prompt_completion_record(record: Any, prompt_field: str, completion_field: str, replace: bool = False) -> Result:
    """The canonical document of a `{"prompt", "completion"}` record, or (reason, detail)."""
    if not isinstance(record, dict):
        return "missing_field", f"a record must be an object with {prompt_field!r} and {completion_field!r}"
    prompt = _string(record, prompt_field, replace)
    if not isinstance(prompt, str):
        return prompt
    completion = _string(record, completion_field, replace)
    if not isinstance(completion, str):
        return completion
    if not completion:
        return "empty_completion", f"field {completion_field!r} is empty: nothing to learn from"
    return json.dumps([["prompt", prompt], ["completion", completion]], ensure_ascii=False)


def chat_record(record: Any, messages_field: str, replace: bool = False) -> Result:
    """The canonical document of a `{"messages": [...]}` record, or (reason, detail)."""
    if not isinstance(record, dict) or messages_field not in record:
        return "missing_field", f"field {messages_field!r} is missing"
    messages = record[messages_field]
    if not isinstance(messages, list) or not messages:
        return "bad_message", f"field {messages_field!r} must be a non-empty list of {{role, content}} objects"
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return "bad_message", f"{messages_field}[{i}] must be an object with string 'role' and 'content'"
        if m["role"] not in ROLES:
            return "unknown_role", f"{messages_field}[{i}] has role {m['role']!r} (expected one of {', '.join(ROLES)})"
        content = m["content"]
        if (bad := _bad_unicode(content, f"{messages_field}[{i}].content")) is not None:
            if not replace:
                return bad
            content = SURROGATE.sub("\ufffd", content)
        turns.append([m["role"], content])
    if not any(role == "assistant" and content for role, content in turns):
        return "no_assistant_turn", "no assistant turn with content: nothing to learn from"
    return json.dumps(turns, ensure_ascii=False)


def record_reader(fmt: str, *, prompt_field: str, completion_field: str, messages_field: str
                  ) -> Callable[[Any, bool], Result]:
    """What the readers call on each parsed record of a task format: (record, replace) -> document or (reason, detail)."""
    if fmt == "prompt_completion":
        return lambda record, replace=False: prompt_completion_record(record, prompt_field, completion_field, replace)
    if fmt == "chat":
        return lambda record, replace=False: chat_record(record, messages_field, replace)
    raise ValueError(f"data.format: {fmt!r} is not a task format")


def parts(document: str) -> list[tuple[str, bool, bool]]:
    """The rendered document as (text, is a special token, trainable) parts, in order (the built-in template)."""
    out: list[tuple[str, bool, bool]] = []
    for role, content in json.loads(document):
        if role in ("prompt", "completion"):
            out.append((content, False, role == "completion"))
            continue
        learn = role == "assistant"
        out += [(f"<|{role}|>", True, False), (content, False, learn), (END, True, learn)]
    return [p for p in out if p[0]]


@lru_cache(maxsize=4)
def _compiled(template: str) -> Callable[..., str]:
    # sandboxed, as transformers renders them: a template comes from a config or a downloaded tokenizer
    from jinja2 import TemplateError as JinjaError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(f"data.chat_template: the template refused a conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        compiled = env.from_string(template)
    except JinjaError as e:
        raise TemplateError(f"data.chat_template: the template does not parse: {e}") from None

    def render(messages: list[dict[str, str]], generation_prompt: bool, eos_token: str) -> str:
        try:
            return compiled.render(messages=messages, add_generation_prompt=generation_prompt, bos_token="",
                                   eos_token=eos_token)
        except JinjaError as e:
            raise TemplateError(f"data.chat_template: the template fails: {e}") from None

    return render


def template_parts(document: str, template: str, *, eos_token: str = "") -> list[tuple[str, bool, bool]]:
    """The document rendered by a Jinja chat template as (text, False, trainable) parts: each assistant turn's span
    (its content and closing markers) learnt, the rest not; TemplateError when the spans cannot be placed."""
    render = _compiled(template)
    turns = [{"role": role, "content": content} for role, content in json.loads(document)]
    full = render(turns, False, eos_token)
    out, at = [], 0
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        before, through = render(turns[:i], True, eos_token), render(turns[: i + 1], False, eos_token)
        if not (through.startswith(before) and full.startswith(through) and len(before) >= at):
            raise TemplateError("data.chat_template: the template does not render a conversation's turns in order (rendering the "
                                "turns before an assistant turn is not a prefix of rendering them all), so the loss "
                                "mask of the assistant turns cannot be placed")
        if turn["content"] not in through[len(before):]:
            raise TemplateError("data.chat_template: the template does not render the assistant's content where its turn starts, "
                                "so the loss mask would not cover it")
        out += [(full[at : len(before)], False, False), (through[len(before):], False, True)]
        at = len(through)
    out.append((full[at:], False, False))
    return [p for p in out if p[0]]


def check_template(template: str, *, eos_token: str = "") -> None:
    """TemplateError unless the template renders a probe conversation (system, user, assistant, user, assistant)
    with its assistant turns in place: what `prepare` checks before any work."""
    probe = [["system", "Be brief."], ["user", "Who speaks?"], ["assistant", "The king."], ["user", "And then?"],
             ["assistant", "The fool."]]
    template_parts(json.dumps(probe), template, eos_token=eos_token)


def plain_text(document: str) -> str:
    """The document's text without markers (what the tokenizer trains on)."""
    return "\n".join(content for _, content in json.loads(document))


def missing_markers(token_to_id: Callable[[str], int | None]) -> list[str]:
    """The chat markers that are not single tokens of a tokenizer: with any missing, the template could not say
    where an assistant turn starts and ends, so its loss mask would be lost."""
    return [m for m in CHAT_MARKERS if token_to_id(m) is None]


def encode_task(documents: list[str], encode: Callable[[list[str]], list[np.ndarray]],
                token_to_id: Callable[[str], int | None], dtype: np.dtype, *, template: str | None = None,
                eos_token: str = "") -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """Per canonical document: (token ids, loss mask uint8, whether the last part is trainable). Each text part is
    encoded alone (`encode`: texts -> id arrays), markers are looked up as single tokens; with a chat `template`
    the parts are its rendering's spans."""
    rendered = [template_parts(d, template, eos_token=eos_token) if template else parts(d) for d in documents]
    texts = [t for ps in rendered for t, special, _ in ps if not special]
    encoded = iter(encode(texts))
    out = []
    for ps in rendered:
        ids, mask = [], []
        for text, special, learn in ps:
            piece = np.asarray([token_to_id(text)], dtype=dtype) if special else next(encoded)
            ids.append(piece)
            mask.append(np.full(len(piece), learn, dtype=np.uint8))
        out.append((np.concatenate(ids) if ids else np.zeros(0, dtype=dtype),
                    np.concatenate(mask) if mask else np.zeros(0, dtype=np.uint8), bool(ps and ps[-1][2])))
    return out
