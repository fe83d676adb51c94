"""Settings layering for `goose serve`: flags > GOOSE_* environment > config.yaml > defaults; unknown keys fail."""
import pytest

from engine import EngineConfig
from server.serve import build_parser, settings_from_args
from server.settings import ConfigError, ServerSettings, load_settings, read_api_keys


def _settings(tmp_path, text, argv=(), env=None):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    return settings_from_args(build_parser().parse_args(["--config", str(cfg), *argv]), env=env or {})


def test_defaults():
    s = load_settings(None)
    assert s.server == ServerSettings() and s.engine == EngineConfig()
    assert (s.server.host, s.server.port) == ("127.0.0.1", 8000) and s.server.loopback


def test_shipped_config_documents_the_defaults():
    from pathlib import Path
    s = load_settings(Path(__file__).resolve().parents[2] / "config.yaml")
    assert s.server == ServerSettings() and s.engine == EngineConfig()


def test_precedence(tmp_path):
    text = "server:\n  port: 9001\n  host: 127.0.0.2\nengine:\n  max_sessions: 8\n  step_token_budget: 64\n"
    assert _settings(tmp_path, text).server.port == 9001
    env = {"GOOSE_SERVER_PORT": "9002", "GOOSE_ENGINE_MAX_SESSIONS": "4", "GOOSE_API_KEY": "k1,k2",
           "GOOSE_UNRELATED": "x"}
    s = _settings(tmp_path, text, env=env)
    assert (s.server.port, s.engine.max_sessions, s.server.api_keys) == (9002, 4, ("k1", "k2"))
    assert s.server.host == "127.0.0.2"
    s = _settings(tmp_path, text, ["--port", "9003", "--api-key", "k3", "--set", "engine.max_waiting=7"], env)
    assert (s.server.port, s.server.api_keys, s.engine.max_waiting, s.engine.max_sessions) == (9003, ("k3",), 7, 4)


@pytest.mark.parametrize("text,env,argv,message", [
    ("server:\n  prot: 1\n", {}, [], "unknown key server.prot"),
    ("engine:\n  max_sessions: 0\n", {}, [], "max_sessions must be >= 1"),
    ("server:\n  port: '80'\n", {}, [], "server.port must be a int"),
    ("server:\n  embedding_pooling: max\n", {}, [], "embedding_pooling"),
    ("", {"GOOSE_SERVER_PROT": "1"}, [], "GOOSE_SERVER_PROT names no setting"),
    ("", {"GOOSE_SERVER_PORT": "eighty"}, [], "not a valid int"),
    ("", {}, ["--set", "server.nope=1"], "unknown key server.nope"),
    ("", {}, ["--set", "oops"], "SECTION.KEY=VALUE"),
    ("", {}, ["--cors-origin", "*"], "exact origins"),
])
def test_errors_name_the_source(tmp_path, text, env, argv, message):
    with pytest.raises(ConfigError, match=message):
        _settings(tmp_path, text, argv, env)


def test_api_key_file(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# comment\nalpha\n\nbeta\n")
    s = _settings(tmp_path, "server:\n  api_keys: [gamma]\n  api_key_file: keys\n")
    assert read_api_keys(s.server) == ("gamma", "alpha", "beta")


def test_model_flag_brings_its_tokenizer(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "tokenizer.json").write_text("{}")
    s = _settings(tmp_path, "", ["--model", str(d)])
    assert (s.model.path, s.model.tokenizer) == (str(d), str(d))
    s = _settings(tmp_path, "", ["--model", str(tmp_path / "x.pth")])
    assert s.model.tokenizer == "world"
    s = _settings(tmp_path, "", ["--model", str(d), "--tokenizer", "world"])
    assert s.model.tokenizer == "world"
