"""Every wrong config is one clear line before any work: a wrong-typed value for each field of the schema
(generated from `pipeline.config.Config`), through `load_config` and through the CLI, and Hypothesis fuzzing
of whole YAML documents and dotted overrides, where `ConfigError` is the only exception that may escape."""

from __future__ import annotations

import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import cli
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.schema import Config
from tests.conftest import tiny_raw


def _json_types(prop: dict[str, Any]) -> set[str]:
    """The JSON types a schema property accepts (through anyOf, enums and consts)."""
    if "anyOf" in prop:
        return set().union(*(_json_types(p) for p in prop["anyOf"]))
    if "enum" in prop or "const" in prop:
        values = prop.get("enum", [prop.get("const")])
        return {"string" if isinstance(v, str) else "integer" if isinstance(v, int) else "other" for v in values}
    kind = prop.get("type", "any")
    return set(kind) if isinstance(kind, list) else {kind}


def _ref(prop: dict[str, Any]) -> str | None:
    ref = prop.get("$ref") or next((p["$ref"] for p in prop.get("allOf", []) if "$ref" in p), None)
    return ref.rsplit("/", 1)[1] if ref else None


def schema_fields() -> list[tuple[str, set[str]]]:
    """(dotted key, accepted JSON types) for every section and every field of the config schema."""
    schema = Config.model_json_schema()

    def walk(node: dict[str, Any], prefix: str) -> Iterator[tuple[str, set[str]]]:
        for name, prop in node["properties"].items():
            key = prefix + name
            if ref := _ref(prop):
                yield key, {"object"}
                yield from walk(schema["$defs"][ref], key + ".")
            else:
                yield key, _json_types(prop)

    return list(walk(schema, ""))


FIELDS = schema_fields()


def wrong_value(types: set[str]) -> Any:
    """A YAML value of a type the field does not accept (pydantic's lax mode turns "3" into 3 and
    "yes" into True, so the string is neither numeric nor boolean)."""
    return {"wrong": ["type"]} if "string" in types else "not-a-valid-value"


def _set(raw: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    *parents, last = dotted.split(".")
    node = raw
    for p in parents:
        if not isinstance(node.get(p), dict):  # a section an earlier mutation replaced by a scalar
            node[p] = {}
        node = node[p]
    node[last] = value
    return raw


def _write(folder: Path, raw: Any) -> Path:
    path = folder / "c.yaml"
    path.write_text(yaml.safe_dump(raw) if not isinstance(raw, str) else raw, encoding="utf-8")
    return path


def test_the_schema_walk_covers_every_section_and_the_leaf_types():
    keys = dict(FIELDS)
    assert {"store", "data", "tokenizer", "model", "train", "evaluate", "decode", "tracking"} <= keys.keys()
    assert keys["train.lr"] == {"number"} and keys["data.max_chars"] == {"integer", "null"}
    assert keys["data.on_error"] == {"string"} and keys["train.zero_stage"] == {"integer"}
    assert keys["train.deepspeed"] == {"object"} and keys["decode.prompts"] == {"array"}
    assert len(FIELDS) > 100


@pytest.mark.parametrize("key,types", FIELDS, ids=[k for k, _ in FIELDS])
def test_a_wrong_typed_value_is_one_config_error_line_naming_the_file_and_key(tmp_path, capsys, key, types):
    store = tmp_path / "store"
    path = _write(tmp_path, _set(tiny_raw(tmp_path / "corpus", store), key, wrong_value(types)))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert message.startswith(f"{path}: {key}: ") and "\n" not in message and "more)" not in message, message

    assert cli.main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"llmpipe: error: {message}\n"  # one line, the same one, no traceback
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]  # no store root, no MLflow db: no work started


@pytest.mark.parametrize("key,types", FIELDS, ids=[k for k, _ in FIELDS])
def test_a_wrong_typed_override_names_the_key(tmp_path, key, types):
    path = _write(tmp_path, tiny_raw(tmp_path / "corpus", tmp_path / "store"))
    value = yaml.safe_dump(wrong_value(types), default_flow_style=True).strip().removesuffix("...").strip()
    with pytest.raises(ConfigError, match=rf"^{path}: {key}: "):
        load_config(path, [f"{key}={value}"])


def test_a_non_finite_float_is_refused_naming_the_key(tmp_path):
    path = _write(tmp_path, tiny_raw(tmp_path / "corpus", tmp_path / "store"))
    for value in (".inf", "-.inf", ".nan"):
        with pytest.raises(ConfigError, match=rf"{path}: train.lr: Input should be a finite number"):
            load_config(path, [f"train.lr={value}"])


# --- Hypothesis: arbitrary documents and overrides ---------------------------------------------------------

KEYS = [k for k, _ in FIELDS]
scalars = st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.text(max_size=12)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                      max_leaves=8)


@st.composite
def mutated_configs(draw: st.DrawFn) -> dict[str, Any]:
    """A valid tiny config with a few keys set to arbitrary values, deleted, or added (misspelt)."""
    raw = tiny_raw(Path("/nonexistent/corpus"), Path("/nonexistent/store"))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        key = draw(st.sampled_from(KEYS))
        action = draw(st.sampled_from(["set", "delete", "add"]))
        if action == "set":
            _set(raw, key, draw(values))
        elif action == "add":
            _set(raw, key.rsplit(".", 1)[0] + "." + draw(st.text(min_size=1, max_size=8)) if "." in key else key, draw(values))
        else:
            node = raw
            *parents, last = key.split(".")
            for p in parents:
                node = node.get(p, {}) if isinstance(node, dict) else {}
            if isinstance(node, dict):
                node.pop(last, None)
    return raw


# YAML-ish text: printable characters mixed with the tokens that steer PyYAML into its rarer paths
# (tags, anchors, aliases, documents, flow collections, explicit keys, impossible dates).
YAML_TOKENS = list(string.printable) + ["é", "\x08", "\u2028", "\ufeff", "!!", "&a", "*a", "- ", ": ", "---", "[", "{",
                                        "!!python/object:os.system", "2001-13-01", "!!int x", "!!float", "!!binary", "? ",
                                        "!!int", "!!bool", "!!timestamp", "!!set", "!!omap", "<<: ", " x", " ''",
                                        "name: x\n", "data: {inputs: [a]}\n", "[" * 1000]
yaml_text = st.lists(st.sampled_from(YAML_TOKENS), max_size=40).map("".join)
overrides = st.lists(st.one_of(st.text(max_size=20),
                               st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), st.text(max_size=12)),
                               st.builds(lambda k, v: f"{k}={yaml.safe_dump(v, default_flow_style=True)}",
                                         st.sampled_from(KEYS), values)),
                     max_size=3)


def _only_config_errors(path: Path, extra: list[str]) -> None:
    try:
        load_config(path, extra)
    except ConfigError as e:
        assert "\n" not in str(e), f"a multi-line error: {e!r}"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=mutated_configs(), extra=overrides)
def test_arbitrary_config_values_and_overrides_only_ever_raise_config_error(tmp_path, raw, extra):
    _only_config_errors(_write(tmp_path, raw), extra)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=yaml_text, extra=overrides)
def test_arbitrary_yaml_text_only_ever_raises_config_error(tmp_path, text, extra):
    _only_config_errors(_write(tmp_path, text), extra)
