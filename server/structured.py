"""A request's response_format, structured_outputs, tools and tool_choice -> one engine constraint spec and the tools
to offer in the prompt. Checks that the schema cannot express are made here, in plain words naming the field."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from engine import (ChatTemplate, Choice, Constraint, Grammar, InvalidRequest, JsonObject, JsonSchema, Regex,
                    ToolCalls, ToolFunction)
from server.protocol import ChatRequest, SamplingFields

TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_KINDS = ("json", "regex", "choice", "grammar", "json_object")
_UNSUPPORTED_KINDS = ("structural_tag",)
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class StructuredRequest:
    constraint: Constraint | None
    """What the output must match (None: free text). Compile it with GrammarCompiler.compile in a worker thread."""
    tools: tuple[ToolFunction, ...] = ()
    """Tools to offer in the prompt: render_chat(messages, template, tools=...)."""
    parse_tools: bool = False
    """Parse the reply for calls (ToolCallStream / parse_tool_calls with template.tools)."""


def structured_request(req: SamplingFields, template: ChatTemplate) -> StructuredRequest:
    """The constraint and tools of a completions or chat request; InvalidRequest when they conflict."""
    response = _response_constraint(req)
    if not isinstance(req, ChatRequest):
        return StructuredRequest(response)
    tools = _tools(req)
    choice = req.tool_choice
    if choice is not None and choice != "none" and not tools:
        raise InvalidRequest("tool_choice needs tools: the request lists none", param="tool_choice")
    if not tools or choice == "none":
        return StructuredRequest(response)
    calls = dict(fmt=template.tools, turn_end=template.separator, param="tools")
    if choice is not None and not isinstance(choice, str):
        named = [t for t in tools if t.name == choice.function.name]
        if not named:
            raise InvalidRequest(f"tool_choice names the function {choice.function.name[:64]!r}, which is not "
                                 f"among tools", param="tool_choice")
        spec = ToolCalls(tuple(named), "required", parallel=False, **calls)
    elif choice == "required":
        spec = ToolCalls(tools, "required", parallel=req.parallel_tool_calls is not False, **calls)
    else:
        if response is not None and not isinstance(response, (JsonSchema, JsonObject)):
            raise InvalidRequest(f"{response.param} cannot be combined with tools; a reply that does not call a "
                                 f"tool can be constrained to JSON only (response_format)", param=response.param)
        spec = ToolCalls(tools, "auto", parallel=req.parallel_tool_calls is not False, answer=response, **calls)
    return StructuredRequest(spec, tools, parse_tools=True)


def _response_constraint(req: SamplingFields) -> Constraint | None:
    fmt, so = req.response_format, req.structured_outputs
    from_format = _from_response_format(fmt) if fmt is not None else None
    from_outputs = _from_structured_outputs(so) if so is not None else None
    if from_format is not None and from_outputs is not None:
        raise InvalidRequest("response_format and structured_outputs both constrain the output; send only one",
                             param="structured_outputs")
    return from_format or from_outputs


def _from_response_format(fmt) -> Constraint | None:
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        schema = (fmt.model_extra or {}).get("schema")          # llama.cpp's {"type": "json_object", "schema"}
        return JsonSchema.of(schema, "response_format.schema") if schema is not None else JsonObject()
    if fmt.json_schema is None:
        raise InvalidRequest("response_format.json_schema is required when response_format.type is json_schema",
                             param="response_format.json_schema")
    if fmt.json_schema.schema_ is None:
        return JsonObject("response_format.json_schema")
    return JsonSchema.of(fmt.json_schema.schema_, "response_format.json_schema.schema")


def _from_structured_outputs(so) -> Constraint | None:
    for name in _UNSUPPORTED_KINDS:
        if (so.model_extra or {}).get(name) is not None:
            raise InvalidRequest(f"structured_outputs.{name} is not supported; use one of {', '.join(_KINDS)}",
                                 param=f"structured_outputs.{name}")
    values = {"json": so.json_, "regex": so.regex, "choice": so.choice, "grammar": so.grammar,
              "json_object": so.json_object or None}
    given = [k for k in _KINDS if values[k] is not None]
    if len(given) > 1:
        raise InvalidRequest(f"structured_outputs may hold only one of {', '.join(_KINDS)}; got "
                             f"{' and '.join(given)}", param="structured_outputs")
    if not given:
        return None
    kind, value, param = given[0], values[given[0]], f"structured_outputs.{given[0]}"
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise InvalidRequest(f"{param} is not valid JSON: {e}", param=param) from None
        return JsonSchema.of(value, param)
    if kind == "regex":
        return Regex(value, param)
    if kind == "choice":
        return Choice(tuple(value), param)
    if kind == "grammar":
        return Grammar(value, param)
    return JsonObject(param)


def _tools(req: ChatRequest) -> tuple[ToolFunction, ...]:
    out: list[ToolFunction] = []
    seen: set[str] = set()
    for i, tool in enumerate(req.tools or ()):
        fn = tool.function
        where = f"tools[{i}].function"
        if not TOOL_NAME.fullmatch(fn.name):
            raise InvalidRequest(f"{where}.name must be 1 to 64 letters, digits, underscores or dashes; got "
                                 f"{fn.name[:80]!r}", param=f"{where}.name")
        if fn.name in seen:
            raise InvalidRequest(f"{where}.name {fn.name!r} is used by an earlier tool; tool names must be unique",
                                 param=f"{where}.name")
        seen.add(fn.name)
        params = fn.parameters if fn.parameters is not None else NO_ARGUMENTS
        if "type" not in params:
            params = {"type": "object", **params}
        if params["type"] != "object":
            raise InvalidRequest(f"{where}.parameters must describe an object (type 'object'), got type "
                                 f"{str(params.get('type'))[:40]!r}", param=f"{where}.parameters")
        text = JsonSchema.of(params, f"{where}.parameters").schema
        out.append(ToolFunction(fn.name, fn.description, text, f"{where}.parameters"))
    return tuple(out)
