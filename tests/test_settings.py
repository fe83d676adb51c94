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


def test_states_section_and_initial_states(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  initial_states: {poet: s/poet.pth}\nstates:\n  disk_dir: st\n  ttl_s: 60\n")
    s = load_settings(f, env={"GOOSE_STATES_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert s.model.initial_states == {"poet": str(tmp_path / "s/poet.pth")}
    assert s.states.disk_dir == str(tmp_path / "st") and s.states.ttl_s == 60.0
    assert s.states.redis_url == "redis://127.0.0.1:1/0"
    s = load_settings(None, env={"GOOSE_MODEL_INITIAL_STATES": "a=x.pth, b=y.pth"})
    assert s.model.initial_states == {"a": "x.pth", "b": "y.pth"}
    for text, message in [("model:\n  initial_states: [a]\n", "mapping of names"),
                          ("states:\n  redis_url: http://x\n", "redis://"),
                          ("states:\n  ttl_s: -1\n", "states.ttl_s must be >= 0")]:
        f.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_settings(f)
    with pytest.raises(ConfigError, match="GOOSE_MODEL_INITIAL_STATES"):
        load_settings(None, env={"GOOSE_MODEL_INITIAL_STATES": "novalue"})
