"""Responses streaming events, checked by the official openai SDK: its event union, and its stream helpers
reading our events as SSE from a mock transport (the helpers assemble the response and reject bad orders)."""
import json

import httpx
import pytest
from openai import OpenAI
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from server.responses_events import TERMINAL, ResponseEvents, response_events
from server.responses_items import response_skeleton
from server.responses_protocol import InputTokensDetails, ResponsesRequest, ResponseUsage

EVENTS = TypeAdapter(ResponseStreamEvent)
USAGE = ResponseUsage(input_tokens=12, input_tokens_details=InputTokensDetails(cached_tokens=8), output_tokens=3,
                      total_tokens=15)
TEXT_ORDER = ["response.created", "response.in_progress", "response.output_item.added",
              "response.content_part.added", "response.output_text.delta", "response.output_text.delta",
              "response.output_text.delta", "response.output_text.done", "response.content_part.done",
              "response.output_item.done"]


def skeleton(**body):
    req = ResponsesRequest.model_validate({"input": "Hello", **body})
    return response_skeleton(req, response_id="resp_1", model="rwkv7-test", temperature=1.0, top_p=1.0)


def sdk_parse(events: list[dict]) -> list:
    parsed = [EVENTS.validate_python(e) for e in events]
    for event, model in zip(events, parsed):
        assert model.type == event["type"] and type(model).__name__.endswith("Event"), (event, model)
    return parsed


def check_sequence(events):
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert sum(e["type"] in TERMINAL for e in events) == 1 and events[-1]["type"] in TERMINAL


def test_text_stream_in_order_and_sdk_parsed():
    events = response_events(skeleton(), ["Good ", "morning", "."], "stop", USAGE)
    assert [e["type"] for e in events] == TEXT_ORDER + ["response.completed"]
    check_sequence(events)
    parsed = sdk_parse(events)
    assert parsed[0].response.status == "in_progress" and parsed[0].response.output == []
    assert parsed[2].item.status == "in_progress" and parsed[2].item.content == []
    assert "".join(p.delta for p in parsed if p.type == "response.output_text.delta") == "Good morning."
    assert parsed[7].text == "Good morning." and parsed[8].part.text == "Good morning."
    final = parsed[-1].response
    assert final.status == "completed" and final.output_text == "Good morning." and final.completed_at
    assert final.usage.input_tokens_details.cached_tokens == 8 and final.output[0].status == "completed"
    item_ids = {e.get("item_id") for e in events if "item_id" in e}
    assert item_ids == {final.output[0].id} and final.output[0].id.startswith("msg_")


def test_length_finish_is_incomplete():
    events = response_events(skeleton(max_output_tokens=3), ["a", "b", "c"], "length", USAGE)
    assert events[-1]["type"] == "response.incomplete"
    check_sequence(events)
    final = sdk_parse(events)[-1].response
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"
    assert final.output[0].status == "incomplete" and final.output_text == "abc" and final.max_output_tokens == 3


def test_empty_output_still_has_a_message():
    events = response_events(skeleton(), [], "stop", USAGE)
    types = [e["type"] for e in events]
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", "response.output_text.done", "response.content_part.done",
                     "response.output_item.done", "response.completed"]
    assert sdk_parse(events)[-1].response.output_text == ""


def test_text_then_function_call():
    ev = ResponseEvents(skeleton(tools=[{"type": "function", "name": "get_weather"}]))
    events = ev.start() + ev.text("Checking.") + ev.function_call("get_weather", '{"city":', call_id="call_9")
    events += ev.arguments(' "Bath"}') + ev.finish("stop", USAGE)
    check_sequence(events)
    types = [e["type"] for e in events]
    assert types[types.index("response.output_text.done"):] == [
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    parsed = sdk_parse(events)
    final = parsed[-1].response
    assert [o.type for o in final.output] == ["message", "function_call"]
    call = final.output[1]
    assert (call.name, call.call_id, call.arguments, call.status) == ("get_weather", "call_9", '{"city": "Bath"}',
                                                                      "completed")
    done = next(p for p in parsed if p.type == "response.function_call_arguments.done")
    assert done.arguments == '{"city": "Bath"}' and done.output_index == 1
    assert ev.final.model_dump(mode="json", by_alias=True) == events[-1]["response"]    # the fold


def test_failure_event_and_misuse():
    ev = ResponseEvents(skeleton())
    events = ev.start() + ev.text("par") + ev.fail("the engine stopped")
    check_sequence(events)
    final = sdk_parse(events)[-1].response
    assert final.status == "failed" and final.error.code == "server_error" and final.error.message
    with pytest.raises(RuntimeError):
        ev.text("more")
    with pytest.raises(ValueError):
        ResponseEvents(skeleton()).finish("abort", USAGE)
    with pytest.raises(RuntimeError):
        ResponseEvents(skeleton()).arguments("{}")


def sse(events: list[dict]) -> bytes:
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


def sdk_client(events: list[dict]) -> OpenAI:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/responses"
        return httpx.Response(200, content=sse(events), headers={"content-type": "text/event-stream"})
    return OpenAI(base_url="http://goose.test/v1", api_key="none",
                  http_client=httpx.Client(transport=httpx.MockTransport(handler)))


def test_the_sdk_streams_our_events():
    events = response_events(skeleton(), ["It is ", "a truth."], "stop", USAGE)
    client = sdk_client(events)
    got = list(client.responses.create(model="rwkv7-test", input="Hello", stream=True))
    assert [e.type for e in got] == [e["type"] for e in events]
    with client.responses.stream(model="rwkv7-test", input="Hello") as stream:     # the accumulating helper
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert deltas == ["It is ", "a truth."] and final.output_text == "It is a truth."
    assert final.id == "resp_1" and final.usage.total_tokens == 15


def test_the_sdk_stream_helper_assembles_a_function_call():
    ev = ResponseEvents(skeleton(tools=[{"type": "function", "name": "f"}]))
    events = ev.start() + ev.function_call("f", '{"a"') + ev.arguments(": 1}") + ev.finish("stop", USAGE)
    with sdk_client(events).responses.stream(model="rwkv7-test", input="Hello") as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    assert final.output[0].type == "function_call" and final.output[0].arguments == '{"a": 1}'
