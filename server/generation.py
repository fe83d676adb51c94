"""The engine side of the shared generation path: running engine requests -> Deltas (text, tokens, finish).

Completions and chat both build a Generation in prepare.py; formatters.py turns its deltas into response chunks and
folds them into whole responses. Echo decoding runs in a worker thread, never on the event loop.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from engine import EngineDraining, FinishReason, RequestFailed, RequestOutput, TokenLogprob, ToolFormat

LOGPROB_FLOOR = -9999.0       # JSON has no -inf; vLLM clamps the same way


@dataclass
class TokenInfo:
    """One token as clients see it: its text piece (pieces join to the text), raw bytes, logprob, alternatives."""
    piece: str
    raw: bytes
    logprob: float | None
    top: list[tuple[str, bytes, float]] | None


@dataclass
class Delta:
    """What one choice gained in one engine update."""
    index: int
    text: str = ""
    tokens: list[TokenInfo] | None = None
    finish_reason: str | None = None


@dataclass
class Totals:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class _Choice:
    decoder: object
    tokens: int = 0
    last: float | None = None


@dataclass
class Generation:
    """The running engine requests of one HTTP request (one per prompt, n choices each)."""
    ctx: object                        # server.app.AppState
    id: str
    created: int
    streams: list
    prompts: list[list[int]]
    n: int
    echo: bool = False
    logprobs: int | None = None        # alternatives per token when logprobs are returned, else None
    tools: ToolFormat | None = None    # the template's tool-call format when replies are parsed for calls
    t0: float = field(default_factory=time.perf_counter)
    totals: Totals = field(default_factory=Totals)
    timed_out: bool = False
    keep: bool = False                 # collect each choice's token ids, text and the engine's kept states (below)
    token_ids: dict[int, list[int]] = field(default_factory=dict)
    texts: dict[int, str] = field(default_factory=dict)
    states: dict[int, object] = field(default_factory=dict)     # choice -> engine.ConvState (keep_state requests)
    on_done: object = None             # called with this Generation when every choice has finished

    @property
    def model(self) -> str:
        return self.ctx.info.name

    @property
    def fingerprint(self) -> str:
        return self.ctx.fingerprint

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n

    async def deltas(self) -> AsyncIterator[list[Delta]]:
        """Lists of deltas as the engine produces them; closing early aborts every request in the engine."""
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.ctx.settings.server.request_timeout, self._expire)
        tok = self.ctx.engine.tokenizer
        state = [_Choice(tok.stream_decoder()) for _ in range(self.choices)]
        seen: set[int] = set()
        try:
            async with contextlib.aclosing(self._merged()) as merged:
                async for p, out in merged:
                    batch = []
                    if p not in seen:
                        seen.add(p)
                        self.totals.prompt_tokens += out.prompt_tokens
                        self.totals.cached_tokens += out.cached_prompt_tokens
                        if self.echo:
                            batch += await asyncio.to_thread(self._echo, p, out.prompt_logprobs)
                    batch += [self._delta(p, so, state) for so in out.outputs]
                    if self.keep:
                        for so in out.outputs:
                            self.token_ids.setdefault(p * self.n + so.index, []).extend(so.token_ids)
                            self.texts[p * self.n + so.index] = self.texts.get(p * self.n + so.index, "") + so.text
                        if out.state is not None:
                            self.states[p * self.n] = out.state
                    yield batch
            self._finished(state)
            if self.on_done is not None:
                self.on_done(self)
        finally:
            timer.cancel()
            for stream in self.streams:
                await stream.aclose()

    async def _merged(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        if len(self.streams) == 1:
            async for out in self.streams[0]:
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(p, stream):
            try:
                async for out in stream:
                    queue.put_nowait((p, out, None))
                queue.put_nowait((p, None, None))
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
                queue.put_nowait((p, None, exc))

        tasks = [asyncio.ensure_future(pump(p, s)) for p, s in enumerate(self.streams)]
        try:
            live = len(tasks)
            while live:
                p, out, exc = await queue.get()
                if exc is not None:
                    raise exc
                if out is None:
                    live -= 1
                else:
                    yield p, out
        finally:
            for task in tasks:
                task.cancel()

    def _expire(self) -> None:
        """request_timeout passed: stop every sequence; they finish with "length"."""
        self.timed_out = True
        for stream in self.streams:
            self.ctx.engine.abort(stream.request_id)

    def _delta(self, p: int, so, state: list[_Choice]) -> Delta:
        index = p * self.n + so.index
        choice = state[index]
        finish = None
        if so.finish_reason is FinishReason.ABORT:
            finish = self._aborted()
        elif so.finish_reason is not None:
            finish = so.finish_reason.value
        tokens = None
        if self.logprobs is not None:
            tokens = [self._token(lp, choice.decoder.feed(lp.token_id)) for lp in (so.logprobs or [])]
            if finish and tokens:
                tokens[-1].piece += choice.decoder.flush()
        if so.token_ids:
            self._observe(choice)
        choice.tokens = max(choice.tokens, so.cumulative_tokens)
        if finish:
            self.ctx.metrics.request_success.labels(finish).inc()
        return Delta(index=index, text=so.text, tokens=tokens, finish_reason=finish)

    def _observe(self, choice: _Choice) -> None:
        now = time.perf_counter()
        if choice.last is None:
            self.ctx.metrics.ttft.observe(now - self.t0)
        else:
            self.ctx.metrics.itl.observe(now - choice.last)
        choice.last = now

    def _aborted(self) -> str:
        if self.timed_out:
            return "length"
        if self.ctx.engine.is_draining:
            raise EngineDraining("the server is shutting down; the request was stopped before it finished")
        raise RequestFailed("the request was aborted")

    def _finished(self, state: list[_Choice]) -> None:
        self.totals.completion_tokens = sum(c.tokens for c in state)
        m = self.ctx.metrics
        m.e2e.observe(time.perf_counter() - self.t0)
        m.prompt_tokens.inc(self.totals.prompt_tokens)
        m.cached_prompt_tokens.inc(self.totals.cached_tokens)
        m.generation_tokens.inc(self.totals.completion_tokens)

    def _echo(self, p: int, prompt_logprobs: list[TokenLogprob | None] | None) -> list[Delta]:
        """The prompt as the first delta of each of its choices (text, and its tokens' logprobs when asked)."""
        ids = self.prompts[p]
        tok = self.ctx.engine.tokenizer
        if self.logprobs is None:
            text, tokens = tok.decode(ids), None
        else:
            decoder = tok.stream_decoder()
            pieces = [decoder.feed(t) for t in ids]
            pieces[-1] += decoder.flush()
            lps = prompt_logprobs or [None] * len(ids)
            tokens = [TokenInfo(piece, tok.id_to_token_bytes(t), None, None) if lp is None else self._token(lp, piece)
                      for t, piece, lp in zip(ids, pieces, lps)]
            text = "".join(pieces)
        return [Delta(index=p * self.n + i, text=text, tokens=None if tokens is None else list(tokens))
                for i in range(self.n)]

    def _token(self, lp: TokenLogprob, piece: str) -> TokenInfo:
        tok = self.ctx.engine.tokenizer
        top = [(tok.id_to_token_bytes(t).decode("utf-8", "replace"), tok.id_to_token_bytes(t), _finite(v))
               for t, v in lp.top]
        return TokenInfo(piece, tok.id_to_token_bytes(lp.token_id), _finite(lp.logprob), top)


def _finite(x: float) -> float:
    return x if math.isfinite(x) else LOGPROB_FLOOR
