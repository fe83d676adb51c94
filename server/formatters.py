"""Deltas -> OpenAI stream chunks per endpoint, and collect(): a whole response is the fold of its chunks."""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from engine import CallStart, ContentDelta, ToolCallStream
from server.generation import Delta, Generation, Totals
from server.output import ChatChoice, ChatChunk, ChatChunkChoice, ChatDelta, ChatLogprobs, ChatMessageOut, ChatResponse, CompletionChoice, CompletionLogprobs, CompletionResponse, FunctionCallOut, FunctionDelta, PromptTokensDetails, TokenLogprobOut, ToolCallDelta, ToolCallOut, TopLogprob, Usage


def usage(t: Totals) -> Usage:
    return Usage(prompt_tokens=t.prompt_tokens, completion_tokens=t.completion_tokens,
                 total_tokens=t.prompt_tokens + t.completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=t.cached_tokens))


def _moved(d: Delta) -> bool:
    return bool(d.text or d.tokens or d.finish_reason)


# ------------------------------------------------------------------------------------------------ completions

async def completion_chunks(gen: Generation, include_usage: bool) -> AsyncIterator[CompletionResponse]:
    offsets = [0] * gen.choices          # text_offset: cumulative characters of each choice's text
    head = {"id": gen.id, "created": gen.created, "model": gen.model, "system_fingerprint": gen.fingerprint}
    async with contextlib.aclosing(gen.deltas()) as deltas:
        async for batch in deltas:
            for d in batch:
                if _moved(d):
                    yield CompletionResponse(**head, choices=[CompletionChoice(
                        index=d.index, text=d.text, finish_reason=d.finish_reason,
                        logprobs=None if gen.logprobs is None else _completion_logprobs(d, offsets))])
    if include_usage:
        yield CompletionResponse(**head, choices=[], usage=usage(gen.totals))


def _completion_logprobs(d: Delta, offsets: list[int]) -> CompletionLogprobs:
    """The legacy format; top_logprobs holds the k alternatives plus the chosen token (keyed by its piece)."""
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for t in d.tokens or []:
        out.tokens.append(t.piece)
        out.token_logprobs.append(t.logprob)
        if t.top is None:
            out.top_logprobs.append(None)
        else:
            top: dict[str, float] = {}
            for text, _, lp in [*t.top, (t.piece, t.raw, t.logprob)]:
                if text not in top or lp > top[text]:
                    top[text] = lp
            out.top_logprobs.append(top)
        out.text_offset.append(offsets[d.index])
        offsets[d.index] += len(t.piece)
    return out


async def collect_completion(chunks: AsyncIterator[CompletionResponse]) -> CompletionResponse:
    head, acc, final_usage = None, {}, None
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            head = head or chunk
            final_usage = chunk.usage or final_usage
            for c in chunk.choices:
                a = acc.setdefault(c.index, CompletionChoice(index=c.index, text="", logprobs=None))
                a.text += c.text
                a.finish_reason = c.finish_reason or a.finish_reason
                if c.logprobs is not None:
                    if a.logprobs is None:
                        a.logprobs = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[],
                                                        text_offset=[])
                    for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                        getattr(a.logprobs, name).extend(getattr(c.logprobs, name))
    return CompletionResponse(id=head.id, created=head.created, model=head.model,
                              system_fingerprint=head.system_fingerprint,
                              choices=[acc[i] for i in sorted(acc)], usage=final_usage)


# ------------------------------------------------------------------------------------------------ chat

async def chat_chunks(gen: Generation, include_usage: bool) -> AsyncIterator[ChatChunk]:
    head = {"id": gen.id, "created": gen.created, "model": gen.model, "system_fingerprint": gen.fingerprint}
    parsers = [ToolCallStream(gen.tools) if gen.tools is not None else None for _ in range(gen.choices)]
    for i in range(gen.choices):
        yield ChatChunk(**head, choices=[ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
    async with contextlib.aclosing(gen.deltas()) as deltas:
        async for batch in deltas:
            for d in batch:
                if not _moved(d):
                    continue
                delta, finish = _chat_delta(d, parsers[d.index])
                yield ChatChunk(**head, choices=[ChatChunkChoice(
                    index=d.index, delta=delta, finish_reason=finish,
                    logprobs=None if gen.logprobs is None else ChatLogprobs(content=_chat_logprobs(d)))])
    if include_usage:
        yield ChatChunk(**head, choices=[], usage=usage(gen.totals))


def _chat_delta(d: Delta, parser: ToolCallStream | None) -> tuple[ChatDelta, str | None]:
    """A choice's text delta as chat content, or, when replies may call tools, as content and call fragments
    (a call's index, id, type and name first, then its arguments' JSON text in pieces, as OpenAI streams them)."""
    if parser is None:
        return ChatDelta(content=d.text or None), d.finish_reason
    events = parser.feed(d.text) if d.text else []
    if d.finish_reason:
        events += parser.finish()
    content, calls = "", []
    for e in events:
        if isinstance(e, ContentDelta):
            content += e.text
        elif isinstance(e, CallStart):
            calls.append(ToolCallDelta(index=e.index, id=e.id, type="function",
                                       function=FunctionDelta(name=e.name, arguments="")))
        else:
            calls.append(ToolCallDelta(index=e.index, function=FunctionDelta(arguments=e.text)))
    finish = parser.result().finish_reason(d.finish_reason) if d.finish_reason else None
    return ChatDelta(content=content or None, tool_calls=calls or None), finish


def _chat_logprobs(d: Delta) -> list[TokenLogprobOut]:
    return [TokenLogprobOut(token=t.piece, logprob=t.logprob, bytes=list(t.raw),
                            top_logprobs=[TopLogprob(token=s, logprob=lp, bytes=list(raw)) for s, raw, lp in t.top])
            for t in d.tokens or []]


async def collect_chat(chunks: AsyncIterator[ChatChunk]) -> ChatResponse:
    """The whole response folded from the stream: content, calls assembled by index, finish reasons."""
    head, texts, logprobs, finish, calls, final_usage = None, {}, {}, {}, {}, None
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            head = head or chunk
            final_usage = chunk.usage or final_usage
            for c in chunk.choices:
                texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
                finish[c.index] = c.finish_reason or finish.get(c.index)
                for t in c.delta.tool_calls or []:
                    call = calls.setdefault(c.index, {}).setdefault(t.index, {"id": "", "name": "", "args": ""})
                    call["id"] = t.id or call["id"]
                    call["name"] = (t.function.name if t.function and t.function.name else call["name"])
                    call["args"] += t.function.arguments or "" if t.function else ""
                if c.logprobs is not None:
                    logprobs.setdefault(c.index, []).extend(c.logprobs.content or [])
    choices = [ChatChoice(index=i, message=_message(texts[i], calls.get(i)), finish_reason=finish[i],
                          logprobs=ChatLogprobs(content=logprobs[i]) if i in logprobs else None)
               for i in sorted(texts)]
    return ChatResponse(id=head.id, created=head.created, model=head.model, choices=choices, usage=final_usage,
                        system_fingerprint=head.system_fingerprint)


def _message(text: str, calls: dict | None) -> ChatMessageOut:
    if not calls:
        return ChatMessageOut(content=text)
    out = [ToolCallOut(id=c["id"], function=FunctionCallOut(name=c["name"], arguments=c["args"]))
           for _, c in sorted(calls.items())]
    return ChatMessageOut(content=text if text.strip() else None, tool_calls=out)
