"""The asyncio side of engine outputs: a sink per consumer, one hand-over per event loop per step, and the
RequestStream a caller iterates. The step thread only appends to the Outbox; flush() wakes each loop once."""
from __future__ import annotations

import asyncio
from collections.abc import Callable

from engine.request import RequestOutput


class Sink:
    """One asyncio consumer's queue. The engine thread puts items into its outbox; the outbox hands a whole
    step's items to each event loop in one call, so a step wakes the loop once, not once per request."""

    def __init__(self, loop: asyncio.AbstractEventLoop, outbox: Outbox):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self._outbox = outbox

    def put(self, item) -> None:
        self._outbox.items.append((self, item))


class Outbox:
    """Items produced by the engine thread since the last flush (touched by the engine thread only)."""

    def __init__(self):
        self.items: list[tuple[Sink, object]] = []

    def flush(self) -> None:
        if not self.items:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for sink, item in self.items:
            by_loop.setdefault(sink.loop, []).append((sink, item))
        self.items = []
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_hand_over, batch)
            except RuntimeError:      # the event loop is closed: nobody is listening any more
                pass


def _hand_over(batch) -> None:
    for sink, item in batch:
        sink.queue.put_nowait(item)


class RequestStream:
    """Async iterator of RequestOutput for one request; closing it early aborts the request."""

    def __init__(self, request_id: str, sink: Sink, abort: Callable[[str], None]):
        self.request_id = request_id
        self._sink = sink
        self._abort = abort
        self._done = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        item = await self._sink.queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finished:
            self._done = True
        return item

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._abort(self.request_id)
