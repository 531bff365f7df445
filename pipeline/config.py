"""Loading an experiment config: YAML file + dotted overrides -> a validated `Config`, or one error line.

Every error, whatever the document holds (a list at the top, an impossible date,
a nesting too deep for the YAML parser, a value a section's own checks refuse),
becomes a single `ConfigError` line naming the file and the dotted key path;
nothing else escapes `load_config`. CLI overrides are dotted assignments
(`train.lr=3e-4`) parsed as YAML scalars and applied to the raw mapping *before*
validation, so they are checked exactly like the file. The schema itself is
`pipeline.schema`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.errors import ConfigError
from pipeline.schema import Config

_MOVED = {"data.num_cpus_per_task": "resources.prepare.num_cpus", "train.cpus_per_worker": "resources.train.num_cpus",
          "train.use_gpu": "resources.train.num_gpus", "evaluate.num_cpus": "resources.evaluate.num_cpus",
          "decode.num_cpus": "resources.decode.num_cpus"}


def _key(part: Any) -> str:
    """A key path component as printed: a key holding a newline or other control character is quoted,
    so the error stays one line."""
    text = str(part)
    return text if text.isprintable() else repr(text)


def _yaml(text: str) -> Any:
    """yaml.safe_load that fails only with YAMLError or ValueError. PyYAML's constructors raise plain
    Python errors for a scalar its tag cannot hold (`2001-13-01`, `!!int x`, `!!bool x`, a bare `!!float`)
    and RecursionError for a nesting deeper than Python's stack; they become ValueErrors here."""
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except ValueError as e:
        raise ValueError(f"a value YAML cannot construct: {e}") from None
    except (LookupError, AttributeError, TypeError) as e:
        raise ValueError(f"a value YAML cannot construct ({type(e).__name__}: {e})") from None


def _problem(e: yaml.YAMLError) -> str:
    """What is wrong, in one line (a ReaderError, e.g. a control character, has no `problem`)."""
    return getattr(e, "problem", None) or str(e).splitlines()[0]


# A section's own check names its field as `Class.field: ...`; the error then names the dotted key instead.
_FIELD_CHECK = re.compile(r"^[A-Z]\w*\.(\w+): (.*)$", re.S)
_UNKNOWN = ("extra_forbidden", "unexpected_keyword_argument")
_MISSING = ("missing", "missing_argument", "missing_keyword_only_argument")


def _format_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(_key(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if first["type"] in _UNKNOWN:
        msg = "unknown key" + (f" (moved to {_MOVED[loc]})" if loc in _MOVED else "")
    elif first["type"] in _MISSING:
        msg = "required key is missing"
    elif first["type"] == "value_error" and (m := _FIELD_CHECK.match(msg)):
        loc, msg = f"{loc}.{m[1]}" if loc else m[1], m[2]
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {loc}: {msg}{more}" if loc else f"{source}: {msg}{more}"


def _item(items: list, index: str, override: str) -> Any:
    if not index.isdigit() or int(index) >= len(items):
        raise ConfigError(f"override {override!r}: {index} is not an item of that list (it has {len(items)})")
    return items[int(index)]


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` assignments (values parsed as YAML) to a raw mapping; a number after a list's key picks
    one of its items (`data.sources.0.weight=2`)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override {item!r}: expected KEY.PATH=VALUE")
        node: Any = raw
        parts = key.split(".")
        for i, p in enumerate(parts[:-1]):
            child = _item(node, p, item) if isinstance(node, list) else node.setdefault(p, {})
            if not isinstance(child, (dict, list)) or (isinstance(child, list) and not parts[i + 1].isdigit()):
                raise ConfigError(f"override {item!r}: {p} is not a section")
            node = child
        try:
            parsed = _yaml(value) if value != "" else ""
            if isinstance(node, list):
                _item(node, parts[-1], item)  # an existing item: a list is not grown by an override
                node[int(parts[-1])] = parsed
            else:
                node[parts[-1]] = parsed
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({_problem(e)})") from None
        except ValueError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
    return raw


def parse_config(raw: Any, *, source: str = "<config>") -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_error(source, e)) from None
    except (TypeError, ArithmeticError) as e:  # a section's own check met a value it did not expect
        raise ConfigError(f"{source}: {e}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = _yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({_problem(e)})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except ValueError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    raw = raw if raw is not None else {}
    if isinstance(raw, dict):  # otherwise parse_config says the top level must be a mapping
        raw = apply_overrides(raw, overrides or [])
    return parse_config(raw, source=str(path))
