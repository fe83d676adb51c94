"""Specs as llguidance grammar text: JSON schemas, regexes, choice lists, Lark/GBNF and the tool-call grammars."""
from __future__ import annotations

import json

import llguidance

from engine.structured.spec import Choice, Constraint, Grammar, JsonObject, JsonSchema, Regex, ToolCalls

JSON_OPTIONS = {"whitespace_pattern": "[ ]?"}
"""llguidance's JSON options for every schema (a schema's own top-level "x-guidance" overrides them): at most one
space wherever JSON allows whitespace, so a small model cannot loop on whitespace, and no newline, so output
never contains a chat template's stop strings ("\\n\\n", "\\nUser:")."""
ANY_OBJECT = '{"type": "object"}'


def grammar_text(spec: Constraint) -> str:
    """The llguidance grammar (its JSON serialization) for a spec; not validated yet. ValueError when a GBNF
    grammar cannot be converted."""
    if isinstance(spec, JsonSchema):
        return llguidance.LLMatcher.grammar_from_json_schema(spec.schema, defaults=JSON_OPTIONS)
    if isinstance(spec, JsonObject):
        return llguidance.LLMatcher.grammar_from_json_schema(ANY_OBJECT, defaults=JSON_OPTIONS)
    if isinstance(spec, Regex):
        return llguidance.LLMatcher.grammar_from_regex(spec.pattern)
    if isinstance(spec, Choice):
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(map(_lit, spec.options)))
    if isinstance(spec, Grammar):
        return llguidance.grammar_from("grammar", spec.text)    # Lark as is; GBNF converted to Lark
    if isinstance(spec, ToolCalls):
        return llguidance.LLMatcher.grammar_from_lark(tools_lark(spec))
    raise TypeError(f"not a constraint spec: {type(spec).__name__}")


def _lit(text: str) -> str:
    """A Lark string literal (llguidance reads JSON string escapes)."""
    return json.dumps(text, ensure_ascii=False)


def closed(schema):
    """A copy of a schema whose objects that declare ``properties`` and say nothing of ``additionalProperties``
    take no others. For tool arguments: a function takes the arguments it declares, and left open a small model
    invents keys and values until max_tokens (JSON Schema's default, and what many chat UIs send)."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out \
            and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def _inline_json(schema_json: str, *, close: bool = False) -> str:
    """``%json {...}`` for a schema, with our JSON options unless the schema sets its own."""
    schema = json.loads(schema_json)
    if close:
        schema = closed(schema)
    if isinstance(schema, dict) and "x-guidance" not in schema:
        schema = {"x-guidance": JSON_OPTIONS, **schema}
    return "%json " + json.dumps(schema, ensure_ascii=False)


def tools_lark(spec: ToolCalls) -> str:
    """The Lark grammar of a reply that calls ``spec.tools`` in ``spec.fmt``.

    A call is ``begin {"name": "<name>", "arguments": <args>} end``: the wrapper is fixed text (as render_call
    writes it) and <args> is the tool's own schema as a separate %json, so its "$ref"s resolve against itself.
    In mode "auto" free text comes first: ``head`` is a lazy lexeme that ends at the first trigger, so once the
    model writes the trigger only calls may follow, and a reply without the trigger is plain text that may end
    anywhere (end-of-text or the engine's stop strings)."""
    fmt = spec.fmt
    lines = ["%llguidance {}"]
    names = []
    for i, tool in enumerate(spec.tools):
        prefix = '{"name": ' + json.dumps(tool.name, ensure_ascii=False) + ', "arguments": '
        lines.append(f"call_{i}: {_lit(prefix)} args_{i} " + _lit("}"))
        lines.append(f"args_{i}: {_inline_json(tool.parameters, close=True)}")
        names.append(f"call_{i}")
    lines.append("call: " + " | ".join(names))
    block = "call" + (f" {_lit(fmt.end)}" if fmt.end else "")
    lines.append(f"block: {block}")
    more = f'({_lit(fmt.separator)} {_lit(fmt.begin)} block)*' if fmt.separator else f"({_lit(fmt.begin)} block)*"
    calls = "block " + more if spec.parallel else "block"
    tail = f" {_lit(spec.turn_end)}?" if spec.turn_end else ""
    lines.append(f"calls: {calls}{tail}")
    if spec.mode == "required":
        lines.append(f'start: " "? {_lit(fmt.begin)} calls')
    elif spec.answer is not None:
        answer = ANY_OBJECT if isinstance(spec.answer, JsonObject) else spec.answer.schema
        lines.append(f'start: " "? answer | " "? {_lit(fmt.begin)} calls')
        lines.append(f"answer: {_inline_json(answer)}")
    else:
        trigger = fmt.trigger
        rest = fmt.begin[fmt.begin.index(trigger) + len(trigger):]
        lines.append("start: TEXT | head" + (f" {_lit(rest)}" if rest else "") + " calls")
        lines.append("TEXT: /(.|\\n)*/")
        lines.append(f"head[lazy]: TEXT {_lit(trigger)}")
    return "\n".join(lines) + "\n"
