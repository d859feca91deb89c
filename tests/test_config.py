"""Typed configs: YAML + key=value overrides, one clear error per bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdftlab.config import load_config, parse_overrides
from sdftlab.errors import ConfigError
from sdftlab.world.config import WorldConfig

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides_compose(tmp_path):
    path = tmp_path / "w.yaml"
    path.write_text("seed: 7\npretrain:\n  steps: 300\n  lr: 0.001\n")
    cfg = load_config(WorldConfig, path, ["pretrain.steps=500", "model.num_layers=2"])
    assert (cfg.seed, cfg.pretrain.steps, cfg.pretrain.lr) == (7, 500, 0.001)
    assert cfg.model.num_layers == 2
    assert cfg.model.hidden_size == WorldConfig().model.hidden_size  # untouched default


def test_hash_is_stable_and_sensitive():
    a = load_config(WorldConfig, None, ["seed=1"])
    b = load_config(WorldConfig, None, ["seed=1"])
    c = load_config(WorldConfig, None, ["seed=2"])
    assert a.stable_hash() == b.stable_hash() != c.stable_hash()


def test_override_values_parse_as_yaml_scalars():
    assert parse_overrides(["a.b=3", "c=1e-3", "d=true", "e=text"]) == {
        "a": {"b": 3}, "c": 1e-3, "d": True, "e": "text"
    }  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (
            ["pretrain.steps=-3"],
            r"pretrain\.steps: .*greater than 0 \(got -3\)\. Fix: set pretrain\.steps",
        ),
        (
            ["pretrain.stepz=3"],
            r"pretrain\.stepz: unknown key.*Fix: remove it or check the spelling",
        ),
        (["model.num_heads=3"], r"model: .*not divisible by num_heads=3"),
        (["pretrain.lr=fast"], r"pretrain\.lr: .*valid number.*\(got \"fast\"\)"),
        (["steps"], r"override 'steps' is not key=value"),
        (["seed.x=1"], r"seed: Input should be a valid integer \(got \{\"x\": 1\}\)"),
    ],
)
def test_bad_values_name_the_field_and_the_fix(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(WorldConfig, None, overrides)


def test_bad_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("seed: 1\npretrain:\n  steps: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml line \d+: invalid YAML"):
        load_config(WorldConfig, path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(WorldConfig, tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(WorldConfig, tmp_path / "list.yaml")


def test_every_shipped_world_config_validates():
    paths = sorted((REPO / "jobs" / "configs").glob("world*.yaml"))
    assert paths, "jobs/configs/world*.yaml: no world configs found"
    for path in paths:
        load_config(WorldConfig, path)


def test_a_merged_section_is_merged_deeply_and_a_key_set_to_null_is_dropped(tmp_path):
    from sdftlab.config import read_yaml

    path = tmp_path / "c.yaml"
    path.write_text(
        "x-shared: &shared {steps: 100, rollout: {engine: vllm, max_new_tokens: 1024, "
        "dtype: bfloat16}, loss: {topk: 20}}\n"
        "a: {<<: *shared, rollout: {engine: hf}, loss: {}}\n"
        "b: {<<: *shared, steps: 5, loss: {topk: null}}\n"
    )
    data = read_yaml(path)
    assert data["a"] == {
        "steps": 100,
        "loss": {"topk": 20},
        "rollout": {"engine": "hf", "max_new_tokens": 1024, "dtype": "bfloat16"},
    }
    assert data["b"]["steps"] == 5 and data["b"]["loss"] == {"topk": None}
    assert data["b"]["rollout"]["engine"] == "vllm"  # the anchor itself is left as written


# What the shipped pipelines' reports set side by side: recoveries that differ only in the
# factor a config studies (teacher, its context, on/off-policy, seed, the degraded state, and
# the optimizer a QLoRA student needs), never in how they learn or sample.
COMPARED = ["loss", "steps", "prompts_per_step", "data", "live_cka"]
COMPARED_ROLLOUT = ["n", "temperature", "top_p", "max_new_tokens", "dtype"]


def _pipelines() -> list[Path]:
    from sdftlab.config_files import kind_of_file

    shipped = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
    return [path for path in shipped if kind_of_file(path) == "pipeline"]


@pytest.mark.parametrize("path", _pipelines(), ids=lambda p: p.name)
def test_the_recoveries_a_shipped_pipeline_compares_learn_and_sample_alike(path):
    from sdftlab.config_files import load_any

    _, cfg = load_any(str(path), "pipeline", [])
    recoveries = {name: s for name, s in cfg.stages.items() if s.kind == "sdft"}
    for field in COMPARED:
        values = {name: repr(getattr(s, field)) for name, s in recoveries.items()}
        assert len(set(values.values())) <= 1, (path.name, field, values)
    for field in COMPARED_ROLLOUT:
        values = {name: getattr(s.rollout, field) for name, s in recoveries.items()}
        assert len(set(values.values())) <= 1, (path.name, f"rollout.{field}", values)
