"""Responses API models: lenient requests, and response objects the official openai SDK's own types accept."""
import pytest
from openai.types.responses import (FunctionTool as SDKFunctionTool, Response, ResponseFunctionToolCall,
                                    ResponseItemList, ResponseOutputMessage, ResponseUsage)
from pydantic import ValidationError

from server.responses_items import (chat_messages, page_input_items, response_skeleton, response_usage,
                                    stored_input_items)
from server.responses_protocol import (FunctionCall, FunctionCallOutputOut, InputItemsQuery, InputMessageOut,
                                       OutputMessage, OutputText, ResponseDeleted, ResponseError,
                                       ResponsesRequest)

FULL = {
    "model": "rwkv7-test", "instructions": "Be brief.", "previous_response_id": "resp_abc", "store": False,
    "max_output_tokens": 64, "temperature": 0.7, "top_p": 0.9, "metadata": {"user": "u1", "topic": "darcy"},
    "stream": True, "truncation": "auto", "parallel_tool_calls": False, "seed": 3, "top_k": 20,
    "text": {"format": {"type": "json_schema", "name": "answer", "schema": {"type": "object"}, "strict": True}},
    "tools": [{"type": "function", "name": "get_weather", "description": "Weather for a city",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}, "strict": True}],
    "tool_choice": {"type": "function", "name": "get_weather"},
    "input": [
        {"role": "user", "content": "What is the weather in Bath?"},                          # EasyInputMessage
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Use tools."}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Let me check.", "annotations": []}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Bath\"}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "{\"temp\": 12}"},
    ],
    "reasoning": {"effort": "low"}, "prompt_cache_key": "k",                                    # lenient extras
}


def skeleton(req, **kw):
    return response_skeleton(req, response_id="resp_1", model="rwkv7-test", temperature=0.7, top_p=0.9,
                             created_at=1_700_000_000, **kw)


def test_full_request_parses():
    req = ResponsesRequest.model_validate(FULL)
    items = req.input_items()
    assert [type(i).__name__ for i in items] == ["MessageItem", "MessageItem", "MessageItem", "FunctionCallItem",
                                                  "FunctionCallOutputItem"]
    assert items[0].text == "What is the weather in Bath?" and items[2].text == "Let me check."
    assert req.text.format.schema_ == {"type": "object"} and req.tool_choice.name == "get_weather"
    assert req.model_extra == {"reasoning": {"effort": "low"}, "prompt_cache_key": "k"}


def test_string_input_and_defaults():
    req = ResponsesRequest.model_validate({"input": "Hello"})
    assert req.store is True and req.stream is False and req.tool_choice == "auto" and req.tools == []
    (item,) = req.input_items()
    assert item.role == "user" and item.text == "Hello"


@pytest.mark.parametrize("body, param", [
    ({}, "input"),
    ({"input": []}, "input"),
    ({"input": [{"type": "input_image", "image_url": "x"}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
    ({"input": [{"role": "robot", "content": "hi"}]}, "input"),
    ({"input": "x", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"input": "x", "metadata": {"k": "v" * 513}}, "metadata"),
    ({"input": "x", "metadata": {"k": 1}}, "metadata"),
    ({"input": "x", "temperature": 3}, "temperature"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
    ({"input": "x", "tools": [{"type": "function", "name": "bad name"}]}, "tools"),
    ({"input": "x", "tool_choice": "sometimes"}, "tool_choice"),
    ({"input": "x", "text": {"format": {"type": "xml"}}}, "text"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "conversation": "conv_1"}, "conversation"),
    ({"input": "x", "store": "yes"}, "store"),
])
def test_invalid_requests_name_the_field(body, param):
    with pytest.raises(ValidationError) as err:
        ResponsesRequest.model_validate(body)
    assert err.value.errors()[0]["loc"][0] == param


def test_response_object_is_what_the_sdk_parses():
    req = ResponsesRequest.model_validate(FULL)
    resp = skeleton(req)
    resp.output = [OutputMessage(id="msg_1", status="completed", content=[OutputText(text="It is 12 degrees.")]),
                   FunctionCall(id="fc_1", call_id="call_2", name="get_weather", arguments="{}", status="completed")]
    resp.status, resp.completed_at = "completed", 1_700_000_001
    resp.usage = response_usage(40, 7, cached_tokens=32)
    data = resp.model_dump(mode="json")
    sdk = Response.model_validate(data)
    assert sdk.output_text == "It is 12 degrees." and sdk.usage.input_tokens_details.cached_tokens == 32
    assert sdk.usage.output_tokens_details.reasoning_tokens == 0
    assert sdk.instructions == "Be brief." and sdk.previous_response_id == "resp_abc"
    assert sdk.metadata == {"user": "u1", "topic": "darcy"} and sdk.max_output_tokens == 64
    assert sdk.text.format.type == "json_schema" and sdk.text.format.schema_ == {"type": "object"}
    assert sdk.tool_choice.name == "get_weather" and isinstance(sdk.tools[0], SDKFunctionTool)
    assert isinstance(sdk.output[0], ResponseOutputMessage) and isinstance(sdk.output[1], ResponseFunctionToolCall)
    # exact: every key we send is a field the SDK knows (nothing lands in its extras), except "store"
    unknown = set(data) - set(Response.model_fields)
    assert unknown == {"store"}, unknown
    assert data["text"]["format"] == {"type": "json_schema", "name": "answer", "schema": {"type": "object"},
                                      "strict": True}


def test_incomplete_and_failed_shapes():
    req = ResponsesRequest.model_validate({"input": "x"})
    resp = skeleton(req)
    resp.status = "failed"
    resp.error = ResponseError(code="server_error", message="the engine stopped")
    sdk = Response.model_validate(resp.model_dump(mode="json"))
    assert sdk.error.code == "server_error" and sdk.text.format.type == "text" and sdk.tool_choice == "auto"
    assert resp.model_dump(mode="json")["text"] == {"format": {"type": "text"}, "verbosity": "medium"}
    assert ResponseUsage.model_validate(response_usage(1, 2).model_dump()).total_tokens == 3


def test_stored_input_items_and_pages_parse_as_the_sdk_item_list():
    req = ResponsesRequest.model_validate(FULL)
    items = stored_input_items(req)
    assert [type(i) for i in items] == [InputMessageOut, InputMessageOut, OutputMessage, FunctionCall,
                                        FunctionCallOutputOut]
    assert all(i.id for i in items) and len({i.id for i in items}) == 5
    page = page_input_items(items, InputItemsQuery(order="asc", limit=3))
    sdk = ResponseItemList.model_validate(page.model_dump(mode="json"))
    assert [d.type for d in sdk.data] == ["message", "message", "message"] and sdk.has_more
    assert sdk.first_id == items[0].id and sdk.last_id == items[2].id
    rest = page_input_items(items, InputItemsQuery(order="asc", limit=3, after=page.last_id))
    assert [d.id for d in rest.data] == [items[3].id, items[4].id] and not rest.has_more
    newest = page_input_items(items, InputItemsQuery())                      # default: desc, 20
    assert [d.id for d in newest.data] == [i.id for i in reversed(items)]
    ResponseItemList.model_validate(newest.model_dump(mode="json"))
    empty = page_input_items(items, InputItemsQuery(after="msg_unknown"))
    assert empty.data == [] and empty.first_id is None and not empty.has_more


def test_input_items_query_limits():
    assert InputItemsQuery.model_validate({"limit": 100}).limit == 100
    for bad in ({"limit": 0}, {"limit": 101}, {"order": "up"}):
        with pytest.raises(ValidationError):
            InputItemsQuery.model_validate(bad)


def test_chat_messages_for_the_prompt():
    req = ResponsesRequest.model_validate(FULL)
    msgs = chat_messages(req.instructions, stored_input_items(req))
    assert msgs == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the weather in Bath?"},
        {"role": "developer", "content": "Use tools."},
        {"role": "assistant", "content": "Let me check.",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": "{\"city\":\"Bath\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 12}"},
    ]
    assert chat_messages(None, stored_input_items(ResponsesRequest.model_validate({"input": "hi"}))) == \
        [{"role": "user", "content": "hi"}]


def test_deleted_object():
    assert ResponseDeleted(id="resp_1").model_dump() == {"id": "resp_1", "object": "response", "deleted": True}
