from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from imagineerd import config as config_mod
from imagineerd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def load_text(tmp_path: Path, text: str) -> config_mod.Config:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return config_mod.load(path)


def test_shipped_config_is_valid_and_equals_the_defaults():
    config = config_mod.load(ROOT / "config.yaml")
    assert config.data == config_mod.DEFAULTS


def test_every_default_key_is_documented_in_shipped_config():
    shipped = yaml.safe_load((ROOT / "config.yaml").read_text())
    for section, values in config_mod.DEFAULTS.items():
        assert set(values) == set(shipped[section]), section


def test_paths_are_relative_to_the_config_file(tmp_path: Path):
    config = load_text(tmp_path, "paths: {outputs: out}\n")
    assert config.path_for("outputs") == tmp_path / "out"
    assert config.path_for("state") == tmp_path / "state"
    assert config.model_settings()["cache_dir"] == str(tmp_path / "state" / "models")


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ("server: {port: 70000}\n", "server.port", "0 to 65535"),
        ("server: {port: '5000'}\n", "server.port", "whole number"),
        ("server: {host: ''}\n", "server.host", "empty"),
        ("paths: {outputs: 3}\n", "paths.outputs", "text"),
        ("model: {arch: sd3}\n", "model.arch", "sd15, sdxl"),
        ("model: {device: tpu}\n", "model.device", "cuda:N"),
        ("model: {dtype: int8}\n", "model.dtype", "float16"),
        ("model: {name: ''}\n", "model.name", "empty"),
        ("generation: {steps: 0}\n", "generation.steps", "1 to 150"),
        ("generation: {width: 500}\n", "generation.width", "divisible by 8"),
        ("generation: {guidance_scale: 31}\n", "generation.guidance_scale", "0 to 30"),
        ("generation: {scheduler: fast}\n", "generation.scheduler", "euler"),
        ("generation: {negative_prompt: 5}\n", "generation.negative_prompt", "text"),
        ("generation: {seed: 5}\n", "generation.seed", "known keys"),
        ("inbox: {enabled: 'yes'}\n", "inbox.enabled", "true or false"),
        ("inbox: {settle_seconds: -1}\n", "inbox.settle_seconds", "number"),
        ("queue: {max_attempts: 0}\n", "queue.max_attempts", "1 to 100"),
        ("modle: {name: x}\n", "modle", "known sections"),
        ("server: [1, 2]\n", "server", "mapping"),
    ],
)
def test_every_invalid_key_names_the_key_and_the_problem(tmp_path, text, field, words):
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    assert info.value.field == field
    assert field in info.value.message and words in info.value.message
    assert str(tmp_path / "config.yaml") in info.value.message


def test_bad_yaml_and_missing_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_text(tmp_path, "server: {port: 5000\n")
    with pytest.raises(ConfigError, match="not found"):
        config_mod.load(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_text(tmp_path, "- a\n- b\n")


def test_save_is_atomic_and_keeps_comments(tmp_path: Path):
    original = "# my settings\ngeneration:\n  steps: 20  # fast\nserver:\n  port: 5001\n"
    config = load_text(tmp_path, original)
    config.data["generation"]["steps"] = 42
    config.data["generation"]["scheduler"] = "ddim"
    config_mod.save(config)
    text = (tmp_path / "config.yaml").read_text()
    assert "# my settings" in text and "# fast" in text
    again = config_mod.load(tmp_path / "config.yaml")
    assert again["generation"]["steps"] == 42
    assert again["generation"]["scheduler"] == "ddim"
    assert again["server"]["port"] == 5001
    assert "guidance_scale" not in text  # defaults are not written out
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temp file left
