"""config.yaml, parsed in exactly one function into frozen dataclasses; unknown keys are errors."""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """config.yaml is unreadable or holds a wrong key or value; the message names the file and key."""


@dataclass(frozen=True)
class ModelSettings:
    """Which model to load and how."""
    path: str = "models/rwkv7-austen"
    """Checkpoint: a .pth, a .safetensors, or a Hugging Face directory. Relative paths are taken from the
    directory of config.yaml."""
    tokenizer: str = "models/rwkv7-austen/tokenizer.json"
    """"world" for RWKV World models, or a path to tokenizer.json / rwkv_vocab_*.txt / a directory."""
    strategy: str = "cpu fp32"
    """Device and matmul dtype: cpu fp32, cpu bf16, cuda fp16, cuda bf16, cuda fp32, cuda:N <dtype>."""
    wkv_backend: str = "chunked"
    """WKV-7 kernel for prompts (chunked or reference); decode always uses the single-token step."""


@dataclass(frozen=True)
class Settings:
    model: ModelSettings = ModelSettings()


_SECTIONS = {"model": ModelSettings}


def load_settings(path: str | Path | None) -> Settings:
    """Read config.yaml (or return the defaults for None), checking every section, key and value type."""
    if path is None:
        return Settings()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections ({', '.join(_SECTIONS)}) at the top level")
    sections = {}
    for name, section in data.items():
        if name not in _SECTIONS:
            raise ConfigError(f"{path}: unknown section {name!r}; known sections: {', '.join(_SECTIONS)}")
        sections[name] = _section(path, name, _SECTIONS[name], section or {})
    model = sections.get("model", ModelSettings())
    base = path.parent
    resolved = {k: _resolve(base, getattr(model, k)) for k in ("path", "tokenizer")}
    return Settings(model=ModelSettings(**{**model.__dict__, **resolved}))


def _section(path: Path, name: str, cls, values) -> object:
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: section {name!r} must be a mapping of keys to values")
    known = {f.name: f for f in fields(cls)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{path}: unknown key {name}.{key}; known keys: {', '.join(known)}")
        expected = type(known[key].default)
        if not isinstance(value, expected):
            raise ConfigError(f"{path}: {name}.{key} must be a {expected.__name__}, got {value!r}")
    return cls(**values)


def _resolve(base: Path, value: str) -> str:
    if value == "world" or Path(value).is_absolute():
        return value
    return str(base / value)
