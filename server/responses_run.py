"""One POST /v1/responses: the conversation it continues, the engine request, its events, and what it stores.

With previous_response_id the request starts from that response's stored conversation state and prefills only
its new input, whatever the history's length. OpenAI's semantics win where a state cannot follow them: the state
holds the instructions and tools the conversation started with, so a request whose instructions or tools differ
(instructions are not carried over), or whose state is gone (expired, evicted, damaged, another model's), runs
the whole conversation rebuilt from the stored items instead: correct, and as fast as the prefix cache allows.
A stored response (store=true) keeps the state after its turn (server/conversation.py) and a record
(server/responses_store.py), both written before its terminal event is sent.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from engine import (Choice, ConvState, GenerateRequest, Grammar, InvalidRequest, Regex, SamplingParams,
                    ToolCallStream)
from engine import ArgumentsDelta, CallStart, ContentDelta
from server.conversation import ChatPrompt, chat_prompt, close_turn
from server.errors import NotFound, describe
from server.generation import Generation
from server.prepare import check_model, precheck
from server.protocol import ChatRequest
from server.responses_events import ResponseEvents
from server.responses_items import chat_messages, response_skeleton, response_usage, stored_input_items
from server.responses_protocol import ResponseObject, ResponsesRequest, new_id
from server.responses_store import ResponseStore, StoredResponse
from server.structured import StructuredRequest, structured_request

log = logging.getLogger("goose.server")


def records(ctx) -> ResponseStore:
    """The app's stored responses (in the engine's StateStore; none without one)."""
    states = getattr(ctx.engine, "states", None)
    return ResponseStore(states.store if states is not None else None)


@dataclass
class ResponseRun:
    """A response on its way: what it continues, what it prefilled, and where its outputs go."""
    ctx: object
    req: ResponsesRequest
    events: ResponseEvents
    gen: Generation
    messages: list[dict]                 # the whole conversation, as chat messages
    skip: int                            # messages the start state holds
    prompt: ChatPrompt
    start: ConvState | None
    initial: str
    history: list                        # StoredItem: the earlier turns
    new_items: list                      # StoredItem: this request's input
    tools: tuple                         # engine.ToolFunction offered in the prompt
    tool_dumps: list[dict]
    parse_tools: bool
    keep: bool                           # store the state and the record


def _structured(req: ResponsesRequest, template) -> StructuredRequest:
    """text.format, tools and tool_choice as the chat path's constraint (server/structured.py), errors renamed
    to this endpoint's fields."""
    body: dict = {"messages": [{"role": "user", "content": ""}], "parallel_tool_calls": req.parallel_tool_calls}
    if req.tools:
        body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                         for t in req.tools]
    choice = req.tool_choice
    if req.tools or choice != "auto":        # "auto" is the default, with or without tools
        body["tool_choice"] = choice if isinstance(choice, str) else {"type": "function",
                                                                      "function": {"name": choice.name}}
    fmt = req.text.format if req.text is not None else None
    if fmt is not None and fmt.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": fmt.model_dump(
            by_alias=True, exclude={"type"}, exclude_none=True)}
    try:
        return structured_request(ChatRequest.model_validate(body), template)
    except InvalidRequest as exc:
        rename = {"response_format.json_schema.": "text.format.", "response_format": "text.format",
                  ".function.": "."}
        for old, new in rename.items():
            exc.param = exc.param.replace(old, new) if exc.param else exc.param
            exc.args = (str(exc).replace(old, new),)
        raise


def _params(ctx, req: ResponsesRequest, structured: StructuredRequest) -> SamplingParams:
    own_form = isinstance(structured.constraint, (Regex, Choice, Grammar))
    return SamplingParams(
        max_tokens=ctx.engine.config.default_max_tokens if req.max_output_tokens is None else req.max_output_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, min_p=req.min_p or 0.0,
        presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
        penalty_decay=1.0 if req.penalty_decay is None else req.penalty_decay, seed=req.seed,
        stop=() if own_form else ctx.info.template.stop)


async def start_response(ctx, req: ResponsesRequest) -> ResponseRun:
    """Check the request, find what it continues, and submit it to the engine (raises before any event)."""
    initial = check_model(ctx, req.model)
    if req.top_logprobs:
        raise InvalidRequest("top_logprobs is not supported on /v1/responses; use /v1/chat/completions",
                             param="top_logprobs")
    template = ctx.info.template
    structured = _structured(req, template)
    store = records(ctx)
    prev = None
    if req.previous_response_id is not None:
        prev = await store.get(req.previous_response_id)
        if prev is None:
            raise NotFound(f"previous response {req.previous_response_id[:100]!r} not found (it expired, was "
                           f"deleted, or was created with store=false)", param="previous_response_id")
    history = prev.conversation if prev is not None else []
    new_items = stored_input_items(req)
    messages = chat_messages(req.instructions, history + new_items)
    tool_dumps = [t.model_dump(mode="json", exclude_none=True) for t in req.tools]
    start, skip = await _continue_from(ctx, prev, messages, initial, req.instructions, tool_dumps)
    prompt = await asyncio.to_thread(chat_prompt, ctx.engine.tokenizer, template, messages, structured.tools,
                                     skip=skip)
    precheck(ctx, 1)
    params = _params(ctx, req, structured)
    rid = new_id("resp")
    skeleton = response_skeleton(req, response_id=rid, model=req.model or ctx.info.name, temperature=params.temperature,
                                 top_p=params.top_p)
    keep = req.store and store.enabled
    gen = Generation(ctx, rid, skeleton.created_at, [], [prompt.tokens], 1, keep=keep)
    try:
        gen.streams.append(await ctx.engine.submit(GenerateRequest(
            prompt.tokens, params, request_id=rid, constraint=structured.constraint, initial=initial, start=start,
            boundaries=prompt.boundaries, keep_state=keep)))
    except InvalidRequest as exc:
        if exc.param == "prompt":
            exc.param = "input"
        raise
    return ResponseRun(ctx, req, ResponseEvents(skeleton), gen, messages, skip, prompt, start, initial, history,
                       new_items, structured.tools, tool_dumps, structured.parse_tools, keep)


async def _continue_from(ctx, prev: StoredResponse | None, messages: list[dict], initial: str,
                         instructions: str | None, tool_dumps: list[dict]) -> tuple[ConvState | None, int]:
    """(the stored state to start from, how many of ``messages`` it holds), or (None, 0) to run them all."""
    states = getattr(ctx.engine, "states", None)
    if prev is None or prev.state is None or states is None:
        return None, 0
    if (prev.identity != states.identity or prev.initial != initial or prev.instructions != instructions
            or prev.tools != tool_dumps):
        return None, 0
    held = chat_messages(prev.instructions, prev.conversation)
    if messages[:len(held)] != held:        # the new input would change a message the state already holds
        return None, 0
    conv = await asyncio.to_thread(states.load, initial, prev.state)
    return (conv, len(held)) if conv is not None else (None, 0)


async def run_events(run: ResponseRun, *, catch: bool) -> AsyncIterator[dict]:
    """The response's events in order. A failure after the start ends it as response.failed when ``catch`` (a
    stream); otherwise it is raised (a JSON response answers with the error's status)."""
    ev = run.events
    for event in ev.start():
        yield event
    parser = ToolCallStream(run.ctx.info.template.tools) if run.parse_tools else None
    finish = "stop"
    try:
        async with contextlib.aclosing(run.gen.deltas()) as deltas:
            async for batch in deltas:
                for d in batch:
                    for event in _delta_events(ev, parser, d.text, d.finish_reason is not None):
                        yield event
                    finish = d.finish_reason or finish
    except Exception as exc:                       # CancelledError passes: the client is gone
        if not catch:
            raise
        spec, body, _ = describe(exc)
        for event in ev.fail(body["error"]["message"], "rate_limit_exceeded" if spec.status == 429 else
                             "server_error"):
            yield event
        return
    t = run.gen.totals
    usage = response_usage(t.prompt_tokens, t.completion_tokens, t.cached_tokens)
    final = ev.finish("length" if finish == "length" else "stop", usage)
    if run.keep:
        await _save(run, ev.final)
    for event in final:
        yield event


def _delta_events(ev: ResponseEvents, parser, text: str, finished: bool) -> list[dict]:
    if parser is None:
        return ev.text(text) if text else []
    events = []
    for e in (parser.feed(text) if text else []) + (parser.finish() if finished else []):
        if isinstance(e, ContentDelta):
            events += ev.text(e.text) if e.text else []
        elif isinstance(e, CallStart):
            events += ev.function_call(e.name, call_id=e.id)
        elif isinstance(e, ArgumentsDelta):
            events += ev.arguments(e.text)
    return events


async def _save(run: ResponseRun, final: ResponseObject) -> None:
    """The state after this turn (as the next prompt will hold it) and the record, before the terminal event."""
    ctx, gen = run.ctx, run.gen
    prefix = None
    kept = gen.states.get(0)
    if kept is not None:
        reply = chat_messages(None, list(final.output))
        turn = await asyncio.to_thread(chat_prompt, ctx.engine.tokenizer, ctx.info.template, run.messages + reply,
                                       run.tools, skip=run.skip, generation=False)
        conv = await close_turn(ctx.engine, initial=run.initial, start=run.start, prompt=run.prompt.tokens,
                                output=gen.token_ids.get(0, []), kept=kept, turn=turn.tokens)
        if conv is not None:
            ctx.engine.states.save(conv)
            prefix = conv.prefix
    record = StoredResponse(final, input=run.new_items, history=run.history, instructions=run.req.instructions,
                            tools=run.tool_dumps, identity=ctx.engine.states.identity, initial=run.initial,
                            state=prefix)
    await records(ctx).put(record)


async def collect_response(events: AsyncIterator[dict]) -> ResponseObject:
    """A non-streaming response: the one its terminal event carries."""
    last = None
    async with contextlib.aclosing(events):
        async for event in events:
            last = event
    return ResponseObject.model_validate(last["response"])


async def delete_response(ctx, response_id: str) -> None:
    """Delete the record and its conversation state; NotFound when there is none."""
    store = records(ctx)
    record = await store.get(response_id)
    if record is None:
        raise NotFound(f"response {response_id[:100]!r} not found", param="response_id")
    await store.delete(response_id)
    states = getattr(ctx.engine, "states", None)
    if record.state is not None and states is not None and record.identity == states.identity:
        await asyncio.to_thread(states.delete, record.initial, record.state)


async def get_record(ctx, response_id: str) -> StoredResponse:
    record = await records(ctx).get(response_id)
    if record is None:
        raise NotFound(f"response {response_id[:100]!r} not found", param="response_id")
    return record
