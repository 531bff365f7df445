"""Which part of a config section enters a stage's fingerprint, and sections as plain data.

A field marked `fingerprint: False` (pipeline.schema's `_no_fp` / `_nf`) never changes a stage's output, so
`fingerprint_view` leaves it out; `task_view` also leaves out the task-data keys of `data` while they hold the
defaults every text corpus had before task formats existed. `as_dict` and `flatten` give the same sections as
JSON data and as the dotted keys MLflow params and "which keys changed" use.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import BaseModel


def changes_output(section_type: type) -> dict[str, bool]:
    """name -> whether the field can change a stage's output, for a pydantic section or a dataclass section."""
    if dataclasses.is_dataclass(section_type):
        return {f.name: f.metadata.get("fingerprint", True) for f in dataclasses.fields(section_type)}
    extras = {name: f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
              for name, f in section_type.model_fields.items()}
    return {name: extra.get("fingerprint", True) for name, extra in extras.items()}


def fingerprint_view(section: Any) -> dict[str, Any]:
    """The fields of a section that change the output (fingerprint=False ones dropped)."""
    out: dict[str, Any] = {}
    for name, changes in changes_output(type(section)).items():
        if changes:
            value = getattr(section, name)
            is_section = isinstance(value, BaseModel) or dataclasses.is_dataclass(value)
            out[name] = fingerprint_view(value) if is_section else _plain(value)
    return out


def as_dict(section: Any) -> dict[str, Any]:
    """A section as plain JSON data (MLflow params, the worker's config)."""
    if isinstance(section, BaseModel):
        return section.model_dump(mode="json")
    return _plain(dataclasses.asdict(section))


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: for MLflow params and 'which keys changed'."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


TASK_KEYS = {"format": "text", "prompt_field": "prompt", "completion_field": "completion", "messages_field": "messages",
             "chat_template": None}


def task_view(data: dict[str, Any]) -> dict[str, Any]:
    """`data`'s fingerprint without the task-format keys at their defaults: text data keeps the fingerprint it had
    before task formats existed (a field name of another format does not change the output either)."""
    fmt = data.get("format", "text")
    used = {"text": (), "prompt_completion": ("prompt_field", "completion_field"), "chat": ("messages_field",)}[fmt]
    if data.get("chat_template") is not None and fmt == "chat":
        used += ("chat_template",)  # the built-in template: the fingerprint chat data had before templates
    return {k: v for k, v in data.items() if k not in TASK_KEYS or (k == "format" and fmt != "text") or k in used}


def data_view(data: Any) -> dict[str, Any]:
    """The `data` section as prepare's fingerprint sees it, without its inputs: the stage adds them by content
    (`inputs`, or each source's name and inputs), never a mixture's weights, which change what training draws,
    not the shards. One corpus keeps the fingerprint it had before mixtures existed."""
    view = task_view(fingerprint_view(data))
    view.pop("sources", None)
    view.pop("inputs", None)
    return view
