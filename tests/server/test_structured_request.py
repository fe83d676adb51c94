"""server/structured.py and the protocol's structured-output and tool fields: request -> engine constraint spec."""
from __future__ import annotations

import json

import openai.types.chat as oa
import pytest

from engine import (ChatTemplate, Choice, Grammar, InvalidRequest, JsonObject, JsonSchema, Regex, ToolCalls,
                    ToolFormat)
from server.protocol import ChatRequest, CompletionRequest
from server.output import ChatChunk, ChatChunkChoice, ChatDelta, ChatMessageOut, ChatResponse, ChatChoice, FunctionCallOut, FunctionDelta, ToolCallDelta, ToolCallOut, Usage
from server.structured import structured_request

CHAT = [{"role": "user", "content": "Hi"}]
TEMPLATE = ChatTemplate()


def tool(name, parameters=None, description=None):
    fn = {"name": name}
    if parameters is not None:
        fn["parameters"] = parameters
    if description:
        fn["description"] = description
    return {"type": "function", "function": fn}


def chat(**fields):
    return structured_request(ChatRequest.model_validate({"messages": CHAT, **fields}), TEMPLATE)


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def test_response_format_and_structured_outputs_become_specs():
    assert chat().constraint is None and chat(response_format={"type": "text"}).constraint is None
    assert chat(response_format={"type": "json_object"}).constraint == JsonObject()
    spec = chat(response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA,
                                                                         "strict": True}}).constraint
    assert spec == JsonSchema(json.dumps(SCHEMA)) and spec.param == "response_format.json_schema.schema"
    llama = chat(response_format={"type": "json_object", "schema": SCHEMA}).constraint
    assert isinstance(llama, JsonSchema) and json.loads(llama.schema) == SCHEMA
    assert chat(structured_outputs={"json": json.dumps(SCHEMA)}).constraint == spec
    assert chat(structured_outputs={"regex": "[0-9]+"}).constraint == Regex("[0-9]+")
    assert chat(structured_outputs={"choice": ["a", "b"]}).constraint == Choice(("a", "b"))
    assert chat(structured_outputs={"grammar": 'start: "x"'}).constraint == Grammar('start: "x"')
    req = CompletionRequest.model_validate({"prompt": "x", "response_format": {"type": "json_object"}})
    assert structured_request(req, TEMPLATE).constraint == JsonObject()
    req = CompletionRequest.model_validate({"prompt": "x", "structured_outputs": {"choice": ["y"]}})
    assert structured_request(req, TEMPLATE).constraint == Choice(("y",))


def test_tools_and_tool_choice():
    tools = [tool("get_weather", {"type": "object", "properties": {"city": {"type": "string"}}}, "Weather"),
             tool("ping")]
    auto = chat(tools=tools)
    assert auto.parse_tools and [t.name for t in auto.tools] == ["get_weather", "ping"]
    assert isinstance(auto.constraint, ToolCalls) and auto.constraint.mode == "auto" and auto.constraint.parallel
    assert auto.constraint.fmt == ToolFormat() and auto.constraint.turn_end == "\n\n"
    assert json.loads(auto.tools[1].parameters) == {"type": "object", "properties": {}, "additionalProperties": False}
    assert auto.tools[0].param == "tools[0].function.parameters"
    required = chat(tools=tools, tool_choice="required", parallel_tool_calls=False).constraint
    assert required.mode == "required" and not required.parallel and len(required.tools) == 2
    named = chat(tools=tools, tool_choice={"type": "function", "function": {"name": "ping"}})
    assert [t.name for t in named.constraint.tools] == ["ping"] and len(named.tools) == 2
    none = chat(tools=tools, tool_choice="none")
    assert none.constraint is None and none.tools == () and not none.parse_tools
    with_json = chat(tools=tools, response_format={"type": "json_object"}).constraint
    assert with_json.mode == "auto" and with_json.answer == JsonObject()
    assert chat(tool_choice="none").constraint is None


OPEN_WEBUI_TOOLS = [tool(f"tool_{i}", {"type": "object", "properties": {"query": {"type": "string",
                                                                                 "description": "what to look up"},
                                                                       "limit": {"type": "integer", "default": 5}},
                                       "required": ["query"]}, f"Tool number {i}") for i in range(36)]


def test_many_tools_like_open_webui_compile():
    from engine import GrammarCompiler
    from engine.text.tokenizer import WorldTokenizer
    spec = chat(tools=OPEN_WEBUI_TOOLS).constraint
    assert len(spec.tools) == 36
    GrammarCompiler(WorldTokenizer()).compile(spec).matcher()


@pytest.mark.parametrize("fields,param,words", [
    ({"tools": [tool("a"), tool("a")]}, "tools[1].function.name", "unique"),
    ({"tools": [tool("bad name!")]}, "tools[0].function.name", "letters, digits"),
    ({"tools": [tool("x" * 65)]}, "tools[0].function.name", "1 to 64"),
    ({"tools": [tool("a", {"type": "string"})]}, "tools[0].function.parameters", "must describe an object"),
    ({"tools": [tool("a")], "tool_choice": {"type": "function", "function": {"name": "b"}}}, "tool_choice",
     "not among tools"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tool_choice": "auto"}, "tool_choice", "needs tools"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "x"}}, "structured_outputs",
     "only one"),
    ({"structured_outputs": {"regex": "x", "choice": ["a"]}}, "structured_outputs", "regex and choice"),
    ({"structured_outputs": {"structural_tag": {"x": 1}}}, "structured_outputs.structural_tag", "not supported"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json", "not valid JSON"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "required"),
    ({"tools": [tool("a")], "structured_outputs": {"regex": "x"}}, "structured_outputs.regex", "combined"),
])
def test_conflicts_are_invalid_requests_naming_the_field(fields, param, words):
    with pytest.raises(InvalidRequest) as info:
        chat(**fields)
    assert info.value.param == param and words in str(info.value), str(info.value)


def test_messages_with_calls_and_results_validate():
    req = ChatRequest.model_validate({"messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "w", "arguments": '{"c": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]})
    assert req.messages[1].tool_calls[0].function.name == "w" and req.messages[2].tool_call_id == "call_1"


def test_responses_match_the_openai_types():
    call = ToolCallOut(id="call_1", function=FunctionCallOut(name="w", arguments='{"c": 1}'))
    resp = ChatResponse(id="chatcmpl-1", created=1, model="m", system_fingerprint="fp_0", usage=Usage(prompt_tokens=1, completion_tokens=2,
                                                                          total_tokens=3),
                        choices=[ChatChoice(index=0, message=ChatMessageOut(content=None, tool_calls=[call]),
                                            finish_reason="tool_calls")])
    parsed = oa.ChatCompletion.model_validate(resp.model_dump())
    assert parsed.choices[0].message.tool_calls[0].function.arguments == '{"c": 1}'
    assert parsed.choices[0].finish_reason == "tool_calls" and parsed.choices[0].message.content is None
    assert "tool_calls" not in ChatMessageOut(content="hi").model_dump()
    first = ToolCallDelta(index=0, id="call_1", type="function", function=FunctionDelta(name="w", arguments=""))
    later = ToolCallDelta(index=0, function=FunctionDelta(arguments='{"c"'))
    chunk = ChatChunk(id="c", created=1, model="m", system_fingerprint="fp_0", choices=[ChatChunkChoice(index=0, delta=ChatDelta(
        tool_calls=[first, later]))])
    body = json.loads(chunk.model_dump_json())
    assert body["choices"][0]["delta"]["tool_calls"] == [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "w", "arguments": ""}},
        {"index": 0, "function": {"arguments": '{"c"'}}]
    oa.ChatCompletionChunk.model_validate(body)


def test_an_empty_choice_list_is_refused_by_the_schema():
    """structured_outputs.choice needs a string to choose: the request schema says so (OpenAPI shows it)."""
    import pydantic
    with pytest.raises(pydantic.ValidationError):
        ChatRequest.model_validate({"messages": CHAT, "structured_outputs": {"choice": []}})
