"""Conversations as token sequences and states: chat prompts tokenized message by message (so message ends are
token boundaries the prefix cache can name), and the state a turn leaves behind.

The state kept after a turn must be the state after the tokens a later prompt will hold for that turn: its
messages and the reply as the chat template renders them ("Assistant: <reply>\\n\\n"). The engine hands back the
state after the prompt and the reply's tokens but the last (sampled, never fed); close_turn runs what is missing
(usually the turn's closing separator), or, when the model's tokens are not the ones the rendered reply tokenizes
to, runs the rendered turn again from the turn's start. Either way the stored state is exactly what a cold replay of
the whole conversation computes.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from engine import ConvState, GenerateRequest, SamplingParams, render_segments

log = logging.getLogger("goose.server")
_closing: set[asyncio.Task] = set()      # chat turns being closed in the background (kept from the GC)


@dataclass
class ChatPrompt:
    tokens: list[int]
    boundaries: tuple[int, ...]
    """Where messages end inside tokens (never at its end)."""


def chat_prompt(tokenizer, template, messages: list[dict], tools=(), *, skip: int = 0,
                generation: bool = True) -> ChatPrompt:
    """The tokens of a rendered conversation after its first ``skip`` messages (which a start state already
    holds; the template's leading end-of-text too), piece by piece; with ``generation`` the generation prompt
    ends it. Blocking: tokenizing is CPU work."""
    tokens = [tokenizer.eot_id] if template.bos and skip == 0 else []
    ends = []
    for seg in render_segments(messages, template, tools):
        if seg.index >= len(messages) and not generation:
            break
        if seg.index < skip:
            continue
        tokens += tokenizer.encode(seg.text, allow_special=False)
        if seg.end:
            ends.append(len(tokens))
    return ChatPrompt(tokens, tuple(e for e in ends if 0 < e < len(tokens)))


async def close_turn(engine, *, initial: str, start: ConvState | None, prompt: list[int], output: list[int],
                     kept: ConvState, turn: list[int]) -> ConvState | None:
    """The state after ``turn`` (the turn's messages and its reply as a later prompt tokenizes them), from the
    state ``kept`` after prompt + output[:-1]; None when the engine could not run it (logged: the conversation
    then continues by re-running its text)."""
    fed = prompt + output[:-1]
    if turn[:len(fed)] == fed:
        rest, begin = turn[len(fed):], kept
    else:                          # the model's tokens differ from the rendered reply's: run the turn again
        rest, begin = turn, start
    if not rest:
        return kept
    request = GenerateRequest(rest, SamplingParams(max_tokens=0), initial=initial, start=begin, keep_state=True)
    try:
        final = None
        async with contextlib.aclosing(engine.generate(request)) as outputs:
            async for out in outputs:
                final = out
        return final.state if final is not None else None
    except Exception as exc:  # noqa: BLE001 - an optimisation failed (overload, shutdown): the text path remains
        log.warning("closing a turn's state failed: %s: %s", type(exc).__name__, exc)
        return None


def close_chat_later(ctx, *, messages: list[dict], tools, prompt: list[int], initial: str):
    """An on_done for a chat Generation (n = 1, keep=True): store the state after its reply in the background,
    so a client that resends the whole conversation to any replica sharing the store resumes after the reply."""
    def done(gen) -> None:
        kept, text = gen.states.get(0), gen.texts.get(0)
        if kept is None or text is None:
            return
        task = asyncio.ensure_future(_close_chat(ctx, messages, tools, prompt, initial, gen, kept, text))
        _closing.add(task)
        task.add_done_callback(_closing.discard)
    return done


async def _close_chat(ctx, messages, tools, prompt, initial, gen, kept, text) -> None:
    reply = messages + [{"role": "assistant", "content": text}]
    turn = await asyncio.to_thread(chat_prompt, ctx.engine.tokenizer, ctx.info.template, reply, tools,
                                   generation=False)
    conv = await close_turn(ctx.engine, initial=initial, start=None, prompt=prompt, output=gen.token_ids.get(0, []),
                            kept=kept, turn=turn.tokens)
    if conv is not None:
        ctx.engine.states.save(conv)

