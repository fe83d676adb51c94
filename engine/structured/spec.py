"""Engine-native constraint specs: what a request asks the output to match, frozen and hashable (a cache key).

Each spec carries ``param``, the request field it came from, which errors name; it is not part of equality, so
the same schema sent through response_format or structured_outputs shares one compiled grammar.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal, Union

from engine.errors import InvalidRequest
from engine.text.tools import ToolFormat, ToolFunction

MAX_SPEC_CHARS = 256 * 1024
"""Largest schema, regex, grammar or tool list (as JSON text) a request may constrain with; compiling one this
size takes ~0.3 s of one core (bench/structured.py)."""
MAX_CHOICES = 4096


def _size_check(text: str, param: str, what: str) -> None:
    if len(text) > MAX_SPEC_CHARS:
        raise InvalidRequest(f"{param} is too large for structured outputs: the {what} has {len(text)} characters; "
                             f"the limit is {MAX_SPEC_CHARS}", param=param)


def schema_text(schema, param: str) -> str:
    """A JSON schema (a dict) as the compact JSON text specs hold; InvalidRequest when it is not an object."""
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{param} must be a JSON object (a JSON schema)", param=param)
    try:
        text = json.dumps(schema, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidRequest(f"{param} is not valid JSON: {e}", param=param) from None
    _size_check(text, param, "schema")
    return text


@dataclass(frozen=True)
class JsonSchema:
    """The output is one JSON value valid under ``schema`` (JSON text of a JSON Schema object)."""
    schema: str
    param: str = field(default="response_format.json_schema.schema", compare=False)

    @classmethod
    def of(cls, schema: dict, param: str) -> JsonSchema:
        return cls(schema_text(schema, param), param)


@dataclass(frozen=True)
class JsonObject:
    """The output is any JSON object (response_format {"type": "json_object"})."""
    param: str = field(default="response_format", compare=False)


@dataclass(frozen=True)
class Regex:
    """The whole output matches ``pattern`` (Rust regex syntax, no look-around; anchors are implied)."""
    pattern: str
    param: str = field(default="structured_outputs.regex", compare=False)

    def __post_init__(self):
        _size_check(self.pattern, self.param, "regex")


@dataclass(frozen=True)
class Choice:
    """The output is exactly one of ``options``."""
    options: tuple[str, ...]
    param: str = field(default="structured_outputs.choice", compare=False)

    def __post_init__(self):
        if not self.options:
            raise InvalidRequest(f"{self.param} must hold at least one string", param=self.param)
        if len(self.options) > MAX_CHOICES:
            raise InvalidRequest(f"{self.param} holds {len(self.options)} strings; the limit is {MAX_CHOICES}",
                                 param=self.param)
        _size_check("".join(self.options), self.param, "list of choices")


@dataclass(frozen=True)
class Grammar:
    """The output is a sentence of a context-free grammar in llguidance's Lark dialect (or llama.cpp's GBNF)."""
    text: str
    param: str = field(default="structured_outputs.grammar", compare=False)

    def __post_init__(self):
        _size_check(self.text, self.param, "grammar")


@dataclass(frozen=True)
class ToolCalls:
    """The output calls tools in ``fmt``: with mode "required" it is one call (or, with ``parallel``, several)
    and nothing else; with "auto" it is free text, or text followed by calls once the model writes the format's
    trigger. ``answer`` (auto only) constrains a text answer to a JSON schema or object instead of free text.
    Every call's name is one of ``tools`` and its arguments are valid under that tool's parameters."""
    tools: tuple[ToolFunction, ...]
    mode: Literal["auto", "required"] = "required"
    parallel: bool = True
    fmt: ToolFormat = ToolFormat()
    turn_end: str = "\n\n"
    """The chat template's turn separator: a reply may end with it after its calls (the stop string cuts it)."""
    answer: JsonSchema | JsonObject | None = None
    param: str = field(default="tools", compare=False)

    def __post_init__(self):
        if not self.tools:
            raise InvalidRequest("tools must hold at least one function to constrain calls", param=self.param)
        if self.mode not in ("auto", "required"):
            raise ValueError(f"ToolCalls.mode must be 'auto' or 'required', got {self.mode!r}")
        if self.answer is not None and self.mode != "auto":
            raise ValueError("ToolCalls.answer applies to mode 'auto' only")
        _size_check("".join(t.parameters for t in self.tools), self.param, "list of tools")


Constraint = Union[JsonSchema, JsonObject, Regex, Choice, Grammar, ToolCalls]
