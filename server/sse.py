"""The only SSE encoder: one ``data: {json}`` event per chunk, an in-stream error event, then ``data: [DONE]``,
served by sse-starlette (keep-alive pings, disconnect detection, a send timeout). The Responses API's events are
named instead (``event: <type>`` before each ``data:``) and end with their terminal event, no [DONE].

On a disconnect (or a send that never completes) the chunk generator is closed, and its ``finally`` blocks abort the
request in the engine.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable

from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import SendTimeoutError

from server.errors import INTERNAL, spec_for, stream_error_event

log = logging.getLogger("goose.server")
DONE = "[DONE]"
SEND_TIMEOUT = 60.0     # a client that reads nothing for this long is treated as gone (frozen, not closed)
PING_INTERVAL = 15.0    # a comment line this often keeps idle proxies (nginx: 60 s) from closing a slow stream


def payload(data: BaseModel | dict) -> str:
    """One event's data: compact JSON on one line."""
    return data.model_dump_json() if isinstance(data, BaseModel) else json.dumps(data, ensure_ascii=False,
                                                                                  separators=(",", ":"))


async def encode(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    """Event payloads of chunks; a failure after the stream started becomes an error event; always ends with
    [DONE]."""
    async with contextlib.aclosing(chunks):
        try:
            async for chunk in chunks:
                yield payload(chunk)
        except Exception as exc:      # CancelledError is a BaseException and passes: the client is gone
            if spec_for(exc) is INTERNAL:
                log.error("stream failed: %s", type(exc).__name__, exc_info=exc)
            yield payload(stream_error_event(exc))
    yield DONE


async def encode_named(events: AsyncIterator[dict]) -> AsyncIterator[ServerSentEvent]:
    """Named events (each a dict with its "type"); a failure that escapes them becomes an ``error`` event."""
    async with contextlib.aclosing(events):
        try:
            async for event in events:
                yield ServerSentEvent(data=payload(event), event=event["type"])
        except Exception as exc:      # CancelledError is a BaseException and passes: the client is gone
            if spec_for(exc) is INTERNAL:
                log.error("stream failed: %s", type(exc).__name__, exc_info=exc)
            error = stream_error_event(exc)["error"]
            yield ServerSentEvent(data=payload({"type": "error", **error}), event="error")


class SSEResponse(EventSourceResponse):
    """A text/event-stream response (sse-starlette) over an async iterator of chunks: keep-alive comments every
    PING_INTERVAL s for proxies, the client's disconnect watched, a send blocked for SEND_TIMEOUT s (a client that
    stopped reading) treated as gone. Either way the chunk generator is closed, and its ``finally`` blocks abort the
    request in the engine."""

    def __init__(self, chunks: AsyncIterator[BaseModel | dict], *, on_disconnect: Callable[[], None] | None = None,
                 named: bool = False):
        super().__init__(encode_named(chunks) if named else encode(chunks), ping=PING_INTERVAL, sep="\n", send_timeout=SEND_TIMEOUT,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                         client_close_handler_callable=self._client_closed)
        self.media_type = "text/event-stream"
        self._on_disconnect = on_disconnect
        self._gone = False

    async def _client_closed(self, message) -> None:
        self._mark_gone()

    def _mark_gone(self) -> None:
        if not self._gone and self._on_disconnect is not None:
            self._on_disconnect()
        self._gone = True

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except (SendTimeoutError, OSError):         # a frozen client, or one whose socket closed mid-send
            self._mark_gone()
        finally:
            await self.body_iterator.aclose()


async def _wait_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(receive, work, on_disconnect: Callable[[], None] | None = None):
    """Await work (a coroutine) unless the client disconnects first; then cancel it and return None."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    if on_disconnect is not None:
        on_disconnect()
    return None
