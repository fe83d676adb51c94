"""config.yaml loading: the shipped file, unknown keys, wrong types, relative paths."""
from pathlib import Path

import pytest

from server.settings import ConfigError, ModelSettings, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_config_loads_and_matches_defaults():
    s = load_settings(ROOT / "config.yaml")
    d = ModelSettings()
    assert s.model.strategy == d.strategy and s.model.wkv_backend == d.wkv_backend
    assert s.model.path == str(ROOT / d.path)


@pytest.mark.parametrize("text,message", [
    ("modle:\n  path: x\n", "unknown section 'modle'"),
    ("model:\n  strategy: 3\n", "model.strategy must be a str"),
    ("model:\n  weights: x\n", "unknown key model.weights"),
    ("model: [1, 2]\n", "must be a mapping"),
    ("- a\n- b\n", "expected a mapping"),
    ("model:\n  path: [unclosed\n", "invalid YAML"),
])
def test_bad_config_is_named(tmp_path, text, message):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_settings(f)
    assert str(f) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "none.yaml")


def test_relative_paths_follow_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  path: m/x.pth\n  tokenizer: world\n")
    s = load_settings(f)
    assert s.model.path == str(tmp_path / "m/x.pth") and s.model.tokenizer == "world"
