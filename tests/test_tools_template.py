"""engine/text/tools.py and tool_parser.py: tools in the prompt, goose.json's tool format, replies -> calls."""
from __future__ import annotations

import json
import random

import pytest

from engine import InvalidRequest
from engine.text.chat import ChatTemplate, render_chat
from engine.text.tool_parser import (ArgumentsDelta, CallStart, ContentDelta, ToolCallStream, parse_tool_calls)
from engine.text.tools import ToolFormat, ToolFunction

WEATHER = ToolFunction("get_weather", "Current weather", json.dumps({"type": "object", "properties": {
    "city": {"type": "string"}}, "required": ["city"]}))
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def test_tools_calls_and_results_render_in_the_rwkv_format():
    text = render_chat([{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Weather in Paris?"},
                        {"role": "assistant", "content": None, "tool_calls": [CALL]},
                        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp":\n\n21}'}], tools=[WEATHER])
    assert text == (
        "System: Be brief.\nYou can call tools. Each tool is a JSON object on its own line:\n"
        '{"name": "get_weather", "description": "Current weather", "parameters": {"type": "object", "properties": '
        '{"city": {"type": "string"}}, "required": ["city"]}}\n'
        "To call a tool, reply with:\n<tool_call>\n"
        '{"name": "<tool name>", "arguments": <the arguments, a JSON object>}\n</tool_call>\n\n'
        "User: Weather in Paris?\n\n"
        'Assistant: <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n\n'
        'Tool: {"temp":\n21}\n\n'
        "Assistant:")


def test_without_a_system_message_the_tools_get_their_own_turn_and_content_precedes_calls():
    second = {"id": "call_2", "function": {"name": "get_weather", "arguments": "not json"}}
    text = render_chat([{"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Checking.", "tool_calls": [CALL, second]},
                        {"role": "tool", "tool_call_id": "call_2", "content": "sunny"}], tools=[WEATHER])
    assert text.startswith("System: You can call tools.") and text.count("System:") == 1
    assert ('Assistant: Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
            '\n<tool_call>\n{"name": "get_weather", "arguments": "not json"}\n</tool_call>\n\nTool: sunny\n\n') in text
    assert render_chat([{"role": "user", "content": "Hi"}]) == "User: Hi\n\nAssistant:"      # no tools, no block


@pytest.mark.parametrize("messages,param", [
    ([{"role": "tool", "content": "x"}], "messages[0].tool_call_id"),
    ([{"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "tool_call_id": "call_9", "content": "x"}],
     "messages[1].tool_call_id"),
    ([{"role": "tool", "tool_call_id": "call_1", "content": "x"}, {"role": "assistant", "tool_calls": [CALL]}],
     "messages[0].tool_call_id"),
    ([{"role": "assistant", "tool_calls": [{"id": "c", "function": {"arguments": "{}"}}]}],
     "messages[0].tool_calls[0].function.name"),
    ([{"role": "assistant", "tool_calls": {"id": "c"}}], "messages[0].tool_calls"),
])
def test_tool_messages_must_answer_an_earlier_call(messages, param):
    with pytest.raises(InvalidRequest) as info:
        render_chat(messages)
    assert info.value.param == param


def test_tool_format_from_goose_json():
    meta = {"chat": {"user": "Q", "assistant": "A", "generation_prompt": "A:"},
            "tools": {"role": "Observation", "begin": "<functioncall> ", "end": "", "result": "{name} -> {content}",
                      "system": "Functions:\n{tools}"}}
    t = ChatTemplate.from_metadata(meta)
    assert t.tools.role == "Observation" and t.tools.trigger == "<functioncall>"
    text = render_chat([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [CALL]},
                        {"role": "tool", "tool_call_id": "call_1", "content": "21"}], t, tools=[WEATHER])
    assert text.startswith('System: Functions:\n{"name": "get_weather"')
    assert '\n\nA: <functioncall> {"name": "get_weather", "arguments": {"city": "Paris"}}\n\n' \
           "Observation: get_weather -> 21\n\nA:" in text
    assert ChatTemplate.from_metadata({"tools": {}}).tools == ToolFormat()


@pytest.mark.parametrize("tools,words", [
    ({"start": "<x>"}, "unknown tools keys"),
    ({"begin": 5}, "tools.begin must be a string"),
    ({"begin": " \n"}, "tools.begin must contain a marker"),
    ({"end": "\n\n</x>"}, "tools.end must not contain the turn separator"),
    ({"system": "no placeholder"}, "tools.system must contain {tools}"),
    ({"result": "{content} {id}"}, "unknown placeholders ['id']"),
    ({"role": ""}, "tools.role"),
    ("<tool>", "'tools' must be an object"),
])
def test_bad_tool_formats_name_the_goose_json_key(tools, words):
    with pytest.raises(ValueError) as info:
        ChatTemplate.from_metadata({"tools": tools})
    assert words in str(info.value) and "goose.json" in str(info.value)


REPLIES = [
    " Hello there.",
    "",
    "   ",
    ' <tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa\\"ris}"}}\n</tool_call>',
    ' Let me check. <tool_call>\n{"name": "a", "arguments": {"x": [1, {"y": "}"}]}}\n</tool_call>\n<tool_call>\n'
    '{"name": "b", "arguments": {}}\n</tool_call>\n\n',
    ' <tool_call>\n{"arguments": {"x": 1}, "name": "b"}\n</tool_call>',
    ' <tool_call>\nnot json\n</tool_call> after',
    ' <tool_call>\n{"name": "a", "arguments": {"x": "trunc',
    "a <tool_ca",
    "x < y and <tool_calls> are words",
]


@pytest.mark.parametrize("text", REPLIES)
def test_streamed_fragments_parse_like_the_whole_reply(text):
    whole = parse_tool_calls(text)
    for seed in range(40):
        rng = random.Random(seed)
        stream, i, events = ToolCallStream(), 0, []
        while i < len(text):
            j = i + rng.randint(1, 6)
            events += stream.feed(text[i:j])
            i = j
        events += stream.finish()
        got = stream.result()
        assert got.content == whole.content
        assert [(c.name, c.arguments) for c in got.calls] == [(c.name, c.arguments) for c in whole.calls]
        # the events assemble to the same reply: content deltas, then per call its name before its arguments
        content = "".join(e.text for e in events if isinstance(e, ContentDelta))
        assert content == (whole.content or "")
        starts = [e for e in events if isinstance(e, CallStart)]
        assert [(s.index, s.name) for s in starts] == [(k, c.name) for k, c in enumerate(whole.calls)]
        for k, call in enumerate(got.calls):
            first = events.index(starts[k])
            args = [e for e in events[first:] if isinstance(e, ArgumentsDelta) and e.index == k]
            assert "".join(a.text for a in args) == call.arguments and starts[k].id == call.id


def test_parse_results_and_finish_reason():
    ids = iter(["call_a", "call_b"])
    reply = parse_tool_calls(REPLIES[4], new_id=lambda: next(ids))
    assert reply.content == " Let me check."
    assert [(c.id, c.name, c.arguments) for c in reply.calls] == [
        ("call_a", "a", '{"x": [1, {"y": "}"}]}'), ("call_b", "b", "{}")]
    assert reply.finish_reason("stop") == "tool_calls" and reply.finish_reason("length") == "length"
    assert parse_tool_calls(REPLIES[3]).content is None
    plain = parse_tool_calls(" Just text")
    assert plain.content == " Just text" and not plain.calls and plain.finish_reason("stop") == "stop"
    assert parse_tool_calls(REPLIES[6]).content == "<tool_call>\nnot json\n</tool_call> after"
    assert parse_tool_calls(REPLIES[5]).calls[0].arguments == '{"x": 1}'
    assert parse_tool_calls(" <tool_call>\n{}").calls == [] and parse_tool_calls(" <tool_call>\n{}").content
    first, again = parse_tool_calls(REPLIES[3]).calls[0].id, parse_tool_calls(REPLIES[3]).calls[0].id
    assert first.startswith("call_") and len(first) == 29 and first != again


def test_other_formats_parse_too():
    fmt = ToolFormat(begin="<functioncall> ", end="", separator="\n")
    reply = parse_tool_calls('Sure. <functioncall> {"name": "f", "arguments": {"a": 1}}\n'
                             '<functioncall> {"name": "g", "arguments": {}}', fmt)
    assert reply.content == "Sure." and [(c.name, c.arguments) for c in reply.calls] == [("f", '{"a": 1}'),
                                                                                        ("g", "{}")]
