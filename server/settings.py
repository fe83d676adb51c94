"""The one configuration loader: flags > GOOSE_* environment > config.yaml > defaults, into frozen dataclasses.

Sections mirror dataclasses field for field (``model`` = ModelSettings, ``server`` = ServerSettings,
``engine`` = engine.EngineConfig, ``states`` = engine.StoreConfig); unknown sections, keys and
GOOSE_<SECTION>_<KEY> variables are errors.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from engine import EngineConfig, StoreConfig


class ConfigError(ValueError):
    """config.yaml, a GOOSE_* variable or a flag holds a wrong key or value; the message names where."""


@dataclass(frozen=True)
class ModelSettings:
    """Which model to load and how."""
    path: str = "models/rwkv7-austen"
    """Checkpoint: a .pth, a .safetensors, or a directory (Hugging Face layout, or model.safetensors + goose.json).
    Relative paths are taken from the directory of config.yaml."""
    tokenizer: str = "models/rwkv7-austen/tokenizer.json"
    """"world" for RWKV World models, or a path to tokenizer.json / rwkv_vocab_*.txt / a directory."""
    strategy: str = "cpu fp32"
    """Device and matmul dtype: cpu fp32, cpu bf16, cpu fp32i8, cpu bf16i8, cpu fp32i4, cpu bf16i4 (int8/int4 weights), cuda fp16, cuda bf16, cuda fp32, cuda fp16i8, cuda bf16i8 (int8 weights), cuda:N <dtype>."""
    wkv_backend: str = "chunked"
    """WKV-7 kernel where the native CPU kernels are off (CUDA, GOOSE_NATIVE_KERNELS=0): chunked or reference for prompts, the single-token step for decode; triton (CUDA, the cuda extra) runs kernels/wkv7_triton.py for both. reference and triton also turn the native kernels off."""
    initial_states: dict[str, str] = field(default_factory=dict)
    """Initial states (RWKV-LM / RWKV-PEFT state-tuning files, .pth or .safetensors) by name; each is served as the model `<model>:<name>`. In the environment: name=path,name2=path2."""


@dataclass(frozen=True)
class ServerSettings:
    """The HTTP server (config.yaml section `server`)."""
    host: str = "127.0.0.1"
    """Interface to bind. Loopback by default; 0.0.0.0 exposes the server to the network."""
    port: int = 8000
    """TCP port."""
    api_keys: tuple[str, ...] = ()
    """Accepted bearer tokens; empty (and no api_key_file) means no authentication."""
    api_key_file: str = ""
    """A file with one API key per line (blank lines and # comments ignored), added to api_keys."""
    served_model_name: str = ""
    """The model id clients send and /v1/models lists; empty: goose.json's name, else the checkpoint's stem."""
    ui: bool = True
    """Serve the chat page at / (its files under /ui/ load without an API key; the /v1 calls it makes still need
    one). false: / is 404."""
    cors_origins: tuple[str, ...] = ()
    """Origins allowed by CORS (exact, e.g. https://app.example); empty disables CORS."""
    allowed_hosts: tuple[str, ...] = ()
    """Accepted Host header names; empty: loopback names when bound to loopback (DNS-rebinding guard), else any.
    "*" accepts any."""
    max_body_bytes: int = 4 << 20
    """Largest request body; larger ones get 413 before they are read."""
    max_batch: int = 256
    """Most prompts in one completions request and inputs in one embeddings request."""
    request_timeout: float = 600.0
    """Wall-clock limit of one generation in seconds; sequences still running then end with finish_reason length."""
    shutdown_timeout: float = 30.0
    """On SIGTERM, seconds in-flight requests may take to finish before they are ended with an error event."""
    embedding_pooling: str = "last"
    """How /v1/embeddings pools the final hidden states: last (token) or mean."""
    log_level: str = "info"
    """Log level of the server and uvicorn: debug, info, warning, error."""

    def __post_init__(self):
        if not self.host:
            raise ValueError("server.host must not be empty")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"server.port must be in 0..65535, got {self.port}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"server.max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.max_batch < 1:
            raise ValueError(f"server.max_batch must be >= 1, got {self.max_batch}")
        for name in ("request_timeout", "shutdown_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"server.{name} must be > 0, got {getattr(self, name)}")
        if self.embedding_pooling not in ("last", "mean"):
            raise ValueError(f"server.embedding_pooling must be last or mean, got {self.embedding_pooling!r}")
        if self.log_level not in ("debug", "info", "warning", "error", "critical"):
            raise ValueError(f"server.log_level must be debug, info, warning, error or critical, "
                             f"got {self.log_level!r}")
        if "*" in self.cors_origins:
            raise ValueError("server.cors_origins must list exact origins, not '*'")

    @property
    def loopback(self) -> bool:
        """True when bound to a loopback interface only."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


@dataclass(frozen=True)
class Settings:
    model: ModelSettings = ModelSettings()
    server: ServerSettings = field(default_factory=ServerSettings)
    engine: EngineConfig = field(default_factory=EngineConfig)
    states: StoreConfig = field(default_factory=StoreConfig)


_SECTIONS = {"model": ModelSettings, "server": ServerSettings, "engine": EngineConfig, "states": StoreConfig}
_PATH_KEYS = {("model", "path"), ("model", "tokenizer"), ("model", "initial_states"), ("server", "api_key_file"),
              ("states", "disk_dir")}
ENV_PREFIX = "GOOSE_"
ENV_ALIASES = {"GOOSE_API_KEY": ("server", "api_keys")}   # comma-separated keys
ENV_NOT_SETTINGS = frozenset({"GOOSE_CONFIG"})             # read by `goose serve` to find the file


def load_settings(path: str | Path | None, *, env: Mapping[str, str] | None = None,
                  overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Settings:
    """Settings from config.yaml (None: defaults), then GOOSE_* variables of env, then overrides (from flags).

    Relative paths in the file are taken from its directory; from env and overrides, from the working directory.
    Every section, key, type and range is checked; errors raise ConfigError naming the source and key.
    """
    values: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    if path is not None:
        path = Path(path)
        for section, keys in _read_file(path).items():
            for key, value in keys.items():
                values[section][key] = _resolve(path.parent, value) if (section, key) in _PATH_KEYS else value
    for source, layer in (("environment", _from_env(env or {})), ("flags", overrides or {})):
        for section, keys in layer.items():
            _check_keys(source, section, keys)
            values[section].update(keys)
    where = str(path) if path is not None else "settings"
    built = {name: _build(where, name, cls, values[name]) for name, cls in _SECTIONS.items()}
    return Settings(**built)


def _read_file(path: Path) -> dict[str, dict]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections ({', '.join(_SECTIONS)}) at the top level")
    out = {}
    for name, section in data.items():
        section = {} if section is None else section
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: section {name!r} must be a mapping of keys to values")
        _check_keys(str(path), name, section)
        out[name] = section
    return out


def _check_keys(where: str, section: str, keys: Mapping) -> None:
    if section not in _SECTIONS:
        raise ConfigError(f"{where}: unknown section {section!r}; known sections: {', '.join(_SECTIONS)}")
    known = [f.name for f in fields(_SECTIONS[section])]
    for key in keys:
        if key not in known:
            raise ConfigError(f"{where}: unknown key {section}.{key}; known keys: {', '.join(known)}")


def _build(where: str, section: str, cls, values: dict[str, Any]):
    """cls(**values) after checking each value against the type of the field's default."""
    defaults = cls()
    checked = {}
    for key, value in values.items():
        expected = type(getattr(defaults, key))
        if expected is dict:
            if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                          for k, v in value.items()):
                raise ConfigError(f"{where}: {section}.{key} must be a mapping of names to strings, got {value!r}")
            value = dict(value)
        elif expected is tuple:
            if isinstance(value, str):
                value = (value,)
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where}: {section}.{key} must be a list of strings, got {value!r}")
            value = tuple(value)
        elif expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: {section}.{key} must be a {expected.__name__}, got {value!r}")
        checked[key] = value
    try:
        return replace(defaults, **checked)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _from_env(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """GOOSE_<SECTION>_<KEY>=value (and the aliases) parsed by the field's type."""
    out: dict[str, dict[str, Any]] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name in ENV_NOT_SETTINGS:
            continue
        if name in ENV_ALIASES:
            section, key = ENV_ALIASES[name]
        else:
            section, _, key = name[len(ENV_PREFIX):].lower().partition("_")
            if section not in _SECTIONS:
                continue          # not a settings variable (another tool's GOOSE_*)
            if key not in {f.name for f in fields(_SECTIONS[section])}:
                raise ConfigError(f"environment: {name} names no setting; known keys of {section}: "
                                  f"{', '.join(f.name for f in fields(_SECTIONS[section]))}")
        expected = type(getattr(_SECTIONS[section](), key))
        out.setdefault(section, {})[key] = _parse_env(name, raw, expected)
    return out


def _parse_env(name: str, raw: str, expected: type):
    try:
        if expected is bool:
            if raw.strip().lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if expected is tuple:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if expected is dict:
            pairs = [part.partition("=") for part in raw.split(",") if part.strip()]
            if any(not eq or not k.strip() for k, eq, _ in pairs):
                raise ValueError(raw)
            return {k.strip(): v.strip() for k, _, v in pairs}
        return expected(raw)
    except ValueError:
        raise ConfigError(f"environment: {name}={raw!r} is not a valid {expected.__name__}") from None


def _resolve(base: Path, value):
    if isinstance(value, Mapping):
        return {k: _resolve(base, v) for k, v in value.items()}
    if not isinstance(value, str) or not value or value == "world" or Path(value).is_absolute():
        return value
    return str(base / value)


def read_api_keys(server: ServerSettings) -> tuple[str, ...]:
    """server.api_keys plus the keys in server.api_key_file (one per line; blank lines and # comments skipped)."""
    keys = list(server.api_keys)
    if server.api_key_file:
        try:
            lines = Path(server.api_key_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"server.api_key_file {server.api_key_file}: cannot read: "
                              f"{exc.strerror or exc}") from None
        keys += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if any(not k or any(c.isspace() for c in k) for k in keys):
        raise ConfigError("API keys must be non-empty and contain no whitespace")
    return tuple(dict.fromkeys(keys))
