"""Responses API conversions: a request's echo into a response, input into stored items, stored items into
chat messages (one prompt path with /v1/chat/completions), and pages of GET .../input_items."""
from __future__ import annotations

import time

from server.responses_protocol import (FormatOut, FunctionCall, FunctionCallItem, FunctionCallOutputItem,
                                       FunctionCallOutputOut, FunctionToolOut, InputItemList, InputItemsQuery,
                                       InputMessageOut, InputTextOut, MessageItem, OutputMessage, OutputText,
                                       InputTokensDetails, ResponseObject, ResponsesRequest, ResponseUsage,
                                       StoredItem, TextConfigOut, ToolChoiceFunction, ToolChoiceFunctionOut, new_id)

_FORMAT_FIELDS = ("type", "name", "schema", "description", "strict")


def response_skeleton(req: ResponsesRequest, *, response_id: str, model: str, temperature: float, top_p: float,
                      created_at: int | None = None) -> ResponseObject:
    """The in-progress response a request starts (what response.created carries): the request's settings
    echoed, with the sampling values the server resolved; no output, no usage."""
    text = TextConfigOut()
    if req.text is not None:
        if req.text.format is not None:
            fields = req.text.format.model_dump(by_alias=True, exclude_none=True)    # with any extra fields
            text = TextConfigOut(format=FormatOut.model_validate({k: fields[k] for k in _FORMAT_FIELDS if k in fields}))
        if req.text.verbosity is not None:
            text = TextConfigOut(format=text.format, verbosity=req.text.verbosity)
    choice = req.tool_choice
    return ResponseObject(
        id=response_id, created_at=int(time.time()) if created_at is None else created_at, status="in_progress",
        instructions=req.instructions, max_output_tokens=req.max_output_tokens, metadata=dict(req.metadata or {}),
        model=model, parallel_tool_calls=req.parallel_tool_calls, previous_response_id=req.previous_response_id,
        store=req.store, temperature=temperature, top_p=top_p, text=text,
        tool_choice=ToolChoiceFunctionOut(name=choice.name) if isinstance(choice, ToolChoiceFunction) else choice,
        tools=[FunctionToolOut(name=t.name, description=t.description, parameters=t.parameters, strict=t.strict)
               for t in req.tools],
        top_logprobs=req.top_logprobs or 0, truncation=req.truncation, user=req.user)


def response_usage(input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> ResponseUsage:
    """usage of a response; cached_tokens are input tokens a stored state or cached prefix saved running."""
    return ResponseUsage(input_tokens=input_tokens, output_tokens=output_tokens,
                         input_tokens_details=InputTokensDetails(cached_tokens=cached_tokens),
                         total_tokens=input_tokens + output_tokens)


def stored_input_items(req: ResponsesRequest) -> list[StoredItem]:
    """The request's input as the items GET .../input_items lists, each with an id (kept if the client sent one)."""
    out: list[StoredItem] = []
    for item in req.input_items():
        if isinstance(item, MessageItem):
            if item.role == "assistant":
                out.append(OutputMessage(id=item.id or new_id("msg"), status="completed",
                                         content=[OutputText(text=item.text)]))
            else:
                out.append(InputMessageOut(id=item.id or new_id("msg"), role=item.role,
                                           content=[InputTextOut(text=item.text)]))
        elif isinstance(item, FunctionCallItem):
            out.append(FunctionCall(id=item.id or new_id("fc"), call_id=item.call_id, name=item.name,
                                    arguments=item.arguments, status="completed"))
        elif isinstance(item, FunctionCallOutputItem):
            out.append(FunctionCallOutputOut(id=item.id or new_id("fco"), call_id=item.call_id, output=item.text))
    return out


def page_input_items(items: list[StoredItem], query: InputItemsQuery) -> InputItemList:
    """One page of a response's input items: ``order`` desc lists the newest first; ``after`` is an item id
    (items after it in that order); an unknown ``after`` gives an empty page."""
    ordered = list(reversed(items)) if query.order == "desc" else list(items)
    if query.after is not None:
        ids = [item.id for item in ordered]
        ordered = ordered[ids.index(query.after) + 1:] if query.after in ids else []
    page = ordered[:query.limit]
    return InputItemList(data=page, first_id=page[0].id if page else None, last_id=page[-1].id if page else None,
                         has_more=len(ordered) > len(page))


def chat_messages(instructions: str | None, items: list[StoredItem]) -> list[dict]:
    """Chat Completions-shaped messages for a conversation (instructions first, as a system message).

    function_call items become an assistant message's tool_calls (consecutive calls share one message, which
    also takes the assistant text just before them); function_call_output items become tool messages."""
    messages: list[dict] = [{"role": "system", "content": instructions}] if instructions else []
    for item in items:
        if isinstance(item, InputMessageOut):
            messages.append({"role": item.role, "content": "".join(p.text for p in item.content)})
        elif isinstance(item, OutputMessage):
            messages.append({"role": "assistant", "content": "".join(p.text for p in item.content)})
        elif isinstance(item, FunctionCall):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputOut):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
    return messages
