"""Tool calling as text: how tools, calls and results appear in the prompt (the model's tool format).

RWKV chat models have no single official tool format (G1 was trained on glaive, xlam and hermes data), so the
format is data: goose.json's "tools" object overrides the defaults of ``ToolFormat``. The default is hermes-like,
which the World tokenizer encodes in a few common tokens::

    System: <system message>
    You can call tools. Each tool is a JSON object on its own line:
    {"name": "get_weather", "description": "...", "parameters": {...}}
    To call a tool, reply with:
    <tool_call>
    {"name": "<tool name>", "arguments": <the arguments, a JSON object>}
    </tool_call>

    User: What is the weather in Paris?

    Assistant: <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

    Tool: {"temperature": 21}

    Assistant:

Calls are one-line JSON (``json.dumps``), so a call never contains the blank line that ends a turn.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

DEFAULT_SYSTEM = ("You can call tools. Each tool is a JSON object on its own line:\n{tools}\n"
                  "To call a tool, reply with:\n{example}")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_EXAMPLE_ARGUMENTS = "<the arguments, a JSON object>"


@dataclass(frozen=True)
class ToolFunction:
    """One function the model may call (an OpenAI ``tools[i].function``), engine-native and hashable."""
    name: str
    description: str | None = None
    parameters: str = '{"type": "object"}'
    """The JSON schema of the arguments, as JSON text."""
    param: str = field(default="tools", compare=False)
    """The request field holding ``parameters`` (e.g. "tools[2].function.parameters"), named in errors."""

    def definition(self) -> dict:
        """The definition shown to the model: name, description (when given) and parameters."""
        out: dict = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["parameters"] = json.loads(self.parameters)
        return out


@dataclass(frozen=True)
class ToolFormat:
    """How a model reads and writes tool calls; goose.json's "tools" object overrides any of these."""
    role: str = "Tool"
    """Role name of a tool-result turn ("Tool: <result>")."""
    begin: str = "<tool_call>\n"
    """Opens a call. Its text without surrounding whitespace is the trigger: once the model writes it, the rest
    of the reply is constrained to calls."""
    end: str = "\n</tool_call>"
    """Closes a call (may be empty: the call's JSON object then ends it)."""
    separator: str = "\n"
    """Between two calls of one reply."""
    system: str = DEFAULT_SYSTEM
    """Added to the system turn when tools are offered: {tools} becomes one JSON definition per line, {example}
    a call of the form this format expects."""
    result: str = "{content}"
    """The text of a tool-result turn: {content} is the tool's output, {name} the function that was called."""

    @classmethod
    def from_metadata(cls, meta: Mapping | None, turn_separator: str = "\n\n") -> ToolFormat:
        """The format described by goose.json's "tools" object; ValueError naming the key when it is unusable."""
        if not meta:
            return cls()
        if not isinstance(meta, Mapping):
            raise ValueError("goose.json: 'tools' must be an object")
        known = {f.name for f in fields(cls)}
        unknown = set(meta) - known
        if unknown:
            raise ValueError(f"goose.json: unknown tools keys {sorted(unknown)}; known: {sorted(known)}")
        for key, value in meta.items():
            if not isinstance(value, str):
                raise ValueError(f"goose.json: tools.{key} must be a string, got {value!r}")
        out = cls(**meta)
        out.check(turn_separator)
        return out

    def check(self, turn_separator: str) -> None:
        """ValueError naming the goose.json key when this format cannot work with the chat template."""
        if not self.begin.strip():
            raise ValueError("goose.json: tools.begin must contain a marker, not only whitespace")
        if not self.role.strip():
            raise ValueError("goose.json: tools.role must not be empty")
        for key in ("begin", "end", "separator", "system", "result"):
            if turn_separator and turn_separator in getattr(self, key):
                raise ValueError(f"goose.json: tools.{key} must not contain the turn separator "
                                 f"{turn_separator!r}, which ends the assistant's reply")
        _check_placeholders("system", self.system, {"tools", "example"}, required="tools")
        _check_placeholders("result", self.result, {"content", "name"}, required="content")

    @property
    def trigger(self) -> str:
        """The marker that starts a call: ``begin`` without surrounding whitespace."""
        return self.begin.strip()

    def render_call(self, name: str, arguments) -> str:
        """One call as the model writes it; ``arguments`` is a JSON-able value (normally a dict)."""
        return self.begin + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + self.end

    def render_calls(self, calls: Sequence[tuple[str, object]]) -> str:
        return self.separator.join(self.render_call(name, args) for name, args in calls)

    def system_text(self, tools: Sequence[ToolFunction]) -> str:
        """The tool block of the system turn."""
        lines = "\n".join(json.dumps(t.definition(), ensure_ascii=False) for t in tools)
        example = (self.begin + '{"name": "<tool name>", "arguments": ' + _EXAMPLE_ARGUMENTS + "}" + self.end)
        return _fill(self.system, {"tools": lines, "example": example})

    def result_text(self, content: str, name: str) -> str:
        return _fill(self.result, {"content": content, "name": name})


def _fill(template: str, values: dict[str, str]) -> str:
    """Placeholders replaced in one pass: text substituted in is never scanned again."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def _check_placeholders(key: str, template: str, allowed: set[str], required: str) -> None:
    names = set(_PLACEHOLDER.findall(template))
    if required not in names:
        raise ValueError(f"goose.json: tools.{key} must contain {{{required}}}")
    unknown = names - allowed
    if unknown:
        raise ValueError(f"goose.json: tools.{key} has unknown placeholders {sorted(unknown)}; "
                         f"known: {sorted(allowed)}")
