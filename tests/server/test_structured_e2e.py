"""Structured outputs and tool calls end to end: the official `openai` client, the real engine, the default model.

A 3.5M-parameter model trained on Jane Austen knows nothing of JSON or tools: whatever it emits here is shaped by
the grammar alone, which is the point. Every output must parse and validate, for every seed tried. (Strings in the
schemas have a maxLength: left unbounded, this model fills a string with Austen until max_tokens.)"""
from __future__ import annotations

import asyncio
import json
import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Literal, Optional

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from server.serve import load_engine
from server.settings import load_settings
from tests.server.conftest import openai_client, serve

ROOT = Path(__file__).resolve().parents[2]
MODEL = "rwkv7-austen"
SEEDS = range(4)


def run(fn):
    """fn(client) against the app over the default model (the real engine, in-process)."""
    async def main():
        settings = load_settings(ROOT / "config.yaml")
        engine, info = load_engine(settings)
        async with serve(engine, settings, info=info) as http:
            return await fn(openai_client(http))
    return asyncio.run(main())


# ------------------------------------------------------------------------------------------------ schemas

class Mood(str, Enum):
    calm = "calm"
    vexed = "vexed"
    merry = "merry"


class Letter(BaseModel):
    """Nested objects, an enum, an optional field, bounded numbers and a patterned string."""
    class Sender(BaseModel):
        name: str = Field(max_length=12)
        age: int = Field(ge=16, le=90)

    sender: Sender
    mood: Mood
    postscript: Optional[str] = Field(default=None, max_length=10)
    date: str = Field(pattern=r"^1[78][0-9]{2}-[01][0-9]-[0-3][0-9]$")


class Ball(BaseModel):
    """Arrays with bounds, numbers with a minimum and maximum, a literal."""
    guests: list[Annotated[str, Field(max_length=12)]] = Field(min_length=1, max_length=3)
    dances: list[Annotated[int, Field(ge=1, le=32)]] = Field(min_length=2, max_length=4)
    rating: float = Field(ge=0, le=10)
    venue: Literal["Netherfield", "Pemberley", "Bath"]


class Estate(BaseModel):
    owner: str = Field(max_length=16)
    income: int = Field(ge=0, le=100000)
    tenants: list["Estate.Tenant"] = Field(max_length=2)

    class Tenant(BaseModel):
        name: str = Field(max_length=10)
        paid: bool


@pytest.mark.parametrize("model_type", [Letter, Ball, Estate], ids=lambda m: m.__name__)
def test_parse_gives_valid_objects_for_every_seed(model_type):
    async def body(client):
        out = []
        for seed in SEEDS:
            done = await client.chat.completions.parse(
                model=MODEL, messages=[{"role": "user", "content": "Describe it as JSON."}],
                response_format=model_type, seed=seed, temperature=1.0, max_tokens=400)
            choice = done.choices[0]
            assert choice.finish_reason == "stop", choice
            out.append(choice.message.parsed)
        return out
    parsed = run(body)
    assert len(parsed) == len(SEEDS) and all(isinstance(p, model_type) for p in parsed)
    schema = model_type.model_json_schema()
    for p in parsed:
        jsonschema.validate(json.loads(p.model_dump_json()), schema)


# ------------------------------------------------------------------------------------------------ tools

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a town",
    "parameters": {"type": "object", "properties": {
        "town": {"type": "string", "enum": ["Bath", "London", "Meryton"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["town", "days"], "additionalProperties": False}}}
LETTER = {"type": "function", "function": {
    "name": "send_letter", "description": "Send a short letter",
    "parameters": {"type": "object", "properties": {
        "to": {"type": "string", "maxLength": 12}, "urgent": {"type": "boolean"}},
        "required": ["to", "urgent"], "additionalProperties": False}}}
TOOLS = [WEATHER, LETTER]
ASK = [{"role": "user", "content": "Will it rain in Bath this week?"}]


def _check_calls(calls, allowed=("get_weather", "send_letter")):
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), by_name[call.function.name])


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "send_letter"}}],
                         ids=["required", "named"])
def test_forced_calls_validate_and_stream_assembles_to_the_same_call(tool_choice):
    async def body(client):
        results = []
        for seed in SEEDS:
            args = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=tool_choice, seed=seed,
                        temperature=1.0, max_tokens=200)
            whole = await client.chat.completions.create(**args)
            async with client.chat.completions.stream(**args) as stream:
                async for _ in stream:
                    pass
                streamed = await stream.get_final_completion()
            results.append((whole.choices[0], streamed.choices[0]))
        return results
    allowed = ("send_letter",) if isinstance(tool_choice, dict) else ("get_weather", "send_letter")
    for whole, streamed in run(body):
        assert whole.finish_reason == "tool_calls" and whole.message.content is None
        _check_calls(whole.message.tool_calls, allowed)
        assert streamed.finish_reason == "tool_calls"
        assert [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls] == \
               [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]


def test_a_follow_up_turn_with_the_tool_result_completes():
    async def body(client):
        first = await client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER],
                                                     tool_choice="required", seed=3, max_tokens=200)
        call = first.choices[0].message.tool_calls[0]
        history = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id, "content": "Rain on Tuesday."}]
        second = await client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER],
                                                      seed=3, max_tokens=60, temperature=0.8)
        return second.choices[0]
    answer = run(body)
    assert answer.finish_reason in ("stop", "tool_calls", "length")
    assert answer.message.content or answer.message.tool_calls


def _ui_tools(count: int = 36) -> list[dict]:
    """Tools as a chat UI sends them with every message (Open WebUI sends its 36 built-ins, no tool_choice)."""
    return [{"type": "function", "function": {
        "name": f"tool_{i}", "description": f"Built-in tool number {i}",
        "parameters": {"type": "object", "properties": {"query": {"type": "string", "maxLength": 20}},
                       "required": ["query"]}}} for i in range(count)]


@pytest.mark.parametrize("tool_choice", [None, "auto"], ids=["absent", "auto"])
def test_auto_with_many_tools_answers_in_text_or_a_valid_call(tool_choice):
    tools = _ui_tools()

    async def body(client):
        out = []
        for seed in SEEDS:
            extra = {} if tool_choice is None else {"tool_choice": tool_choice}
            r = await client.chat.completions.create(model=MODEL, messages=[
                {"role": "user", "content": "What do you think of Mr. Darcy?"}], tools=tools, seed=seed,
                temperature=0.8, max_tokens=80, **extra)
            out.append(r.choices[0])
        return out
    names = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    texts = 0
    for choice in run(body):
        if choice.message.tool_calls:
            assert choice.finish_reason in ("tool_calls", "length")
            for call in choice.message.tool_calls:
                jsonschema.validate(json.loads(call.function.arguments), names[call.function.name])
        else:
            texts += 1
            assert choice.message.content and "<tool_call>" not in choice.message.content
            assert choice.finish_reason in ("stop", "length")
    assert texts >= 1          # an Austen model asked about Darcy mostly just talks


# ------------------------------------------------------------------------------------------------ regex, choice

def test_regex_and_choice_on_both_endpoints():
    async def body(client):
        out = []
        for seed in SEEDS:
            r = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "A date?"}], seed=seed, max_tokens=30,
                extra_body={"structured_outputs": {"regex": r"1[78][0-9]{2}-(0[1-9]|1[0-2])"}})
            c = await client.completions.create(
                model=MODEL, prompt="Elizabeth said", seed=seed, max_tokens=10,
                extra_body={"structured_outputs": {"choice": ["yes", "no", "perhaps"]}})
            s = await client.completions.create(
                model=MODEL, prompt="The year was", seed=seed, max_tokens=10,
                extra_body={"structured_outputs": {"regex": r" 1[78][0-9]{2}"}})
            out.append((r.choices[0], c.choices[0], s.choices[0]))
        return out
    for chat, choice, completion in run(body):
        assert re.fullmatch(r"1[78][0-9]{2}-(0[1-9]|1[0-2])", chat.message.content) and chat.finish_reason == "stop"
        assert choice.text in ("yes", "no", "perhaps")
        assert re.fullmatch(r" 1[78][0-9]{2}", completion.text)


def test_a_mixed_batch_gives_each_seed_its_solo_output():
    """Constrained and free requests at once: each equals the same request sent alone."""
    def requests(client):
        return [
            client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", seed=1,
                                           temperature=1.0, max_tokens=120),
            client.chat.completions.create(model=MODEL, messages=ASK, seed=2, temperature=1.0, max_tokens=40),
            client.chat.completions.create(model=MODEL, messages=ASK, seed=3, temperature=1.0, max_tokens=200,
                                           response_format={"type": "json_schema", "json_schema": {
                                               "name": "w", "schema": WEATHER["function"]["parameters"]}}),
            client.completions.create(model=MODEL, prompt="It is a truth", seed=4, temperature=1.0, max_tokens=40),
        ]

    def key(r):
        c = r.choices[0]
        if hasattr(c, "text"):
            return c.text
        return c.message.content, [(t.function.name, t.function.arguments) for t in c.message.tool_calls or []]

    async def body(client):
        alone = [key(await coro) for coro in requests(client)]
        together = [key(r) for r in await asyncio.gather(*requests(client))]
        return alone, together
    alone, together = run(body)
    assert alone == together
    assert isinstance(json.loads(alone[2][0]), dict)


# ------------------------------------------------------------------------------------------------ bad input

BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                                         "properties": 5}}}},
     "response_format.json_schema.schema"),
    ({"extra_body": {"structured_outputs": {"regex": "([a-z"}}}, "structured_outputs.regex"),
    ({"extra_body": {"structured_outputs": {"grammar": "start: ("}}}, "structured_outputs.grammar"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"messages": ASK + [{"role": "tool", "tool_call_id": "call_nope", "content": "x"}]}, "messages[1].tool_call_id"),
    ({"extra_body": {"structured_outputs": {"json": {"allOf": [         # 8^8 alternatives: over the work bound
        {"anyOf": [{"type": "object", "properties": {f"p{i}_{k}": {"type": "integer"}}, "required": [f"p{i}_{k}"]}
                   for k in range(8)]} for i in range(8)]}}}}, "structured_outputs.json"),
]


@pytest.mark.parametrize("fields,param", BAD, ids=[p for _, p in BAD])
def test_bad_structured_input_is_a_400_naming_the_field(fields, param):
    async def body(client):
        args = {"model": MODEL, "messages": ASK, "max_tokens": 5, **fields}
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(**args)
        ok = await client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3)
        return info.value, ok
    error, ok = run(body)
    assert error.status_code == 400 and error.param == param, (error.param, error.message)
    message = error.message
    assert "validation error" not in message.lower() and "pydantic" not in message.lower() and "Input should" \
        not in message, message
    assert ok.choices[0].message.content is not None
