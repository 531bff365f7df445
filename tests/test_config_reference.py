"""The README's configuration reference is the schema's: generated from it, and checked against it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline import cli
from pipeline.config_reference import (
    BEGIN,
    END,
    field_docs,
    readme_block,
    reference,
    sections,
)
from pipeline.schema import Config

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_reference_is_the_one_the_schema_generates():
    text = README.read_text(encoding="utf-8")
    block = text[text.index(BEGIN) : text.index(END) + len(END)]
    assert block == readme_block(), "README.md is out of date: run `llmpipe config --reference --write README.md`"


def test_every_field_of_every_section_is_documented_once():
    keys = [line.split("|")[1].strip().strip("`") for line in reference().splitlines() if line.startswith("| `")]
    assert len(keys) == len(set(keys))
    for key, kind, _ in sections():
        for name, doc in field_docs(kind).items():
            assert doc, f"{key}.{name} has no docstring or description"
            if key == "resources":  # its fields are the per-stage sections, one table `resources.<stage>`
                continue
            assert f"{key}.{name}" in keys, f"{key}.{name} is missing from the reference"


def test_the_model_section_is_the_model_config_and_no_field_is_restated():
    from model.config import ModelConfig
    from model.generation import SamplingOptions
    from model.scoring import EvalOptions
    from tokenization.documents import DocOptions

    fields = Config.model_fields
    assert issubclass(fields["model"].annotation, ModelConfig)
    assert issubclass(fields["evaluate"].annotation, EvalOptions)  # plus `retrieve`
    assert issubclass(fields["decode"].annotation, SamplingOptions)
    assert issubclass(fields["data"].annotation, DocOptions)
    for section, pure in (("model", ModelConfig), ("evaluate", EvalOptions), ("decode", SamplingOptions),
                          ("data", DocOptions)):
        own = {f.name for f in dataclasses.fields(fields[section].annotation)} - {f.name for f in dataclasses.fields(pure)}
        assert not own & {f.name for f in dataclasses.fields(pure)}  # extras only add, never restate


def test_write_replaces_only_the_generated_block(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# intro\n\n{BEGIN}\nstale table\n{END}\n\n## after\n", encoding="utf-8")
    assert cli.main(["config", "--reference", "--write", str(readme)]) == 0
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("# intro\n\n") and text.endswith("\n\n## after\n") and "stale table" not in text
    assert readme_block() in text
    no_block = tmp_path / "other.md"
    no_block.write_text("nothing here\n")
    assert cli.main(["config", "--reference", "--write", str(no_block)]) == 2
    assert "no generated block" in capsys.readouterr().err
