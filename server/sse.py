"""The only SSE encoder: ``data: {json}\\n\\n`` frames, an in-stream error event, then ``data: [DONE]\\n\\n``.

SSEResponse watches for the client's disconnect while it streams; on disconnect (or a failed send) it cancels the
producer and closes the frame generator, whose ``finally`` blocks abort the request in the engine.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable

from pydantic import BaseModel
from starlette.responses import Response

from server.errors import INTERNAL, spec_for, stream_error_event

log = logging.getLogger("goose.server")
DONE = b"data: [DONE]\n\n"
SEND_TIMEOUT = 60.0     # a client that reads nothing for this long is treated as gone (frozen, not closed)


def frame(data: BaseModel | dict) -> bytes:
    text = data.model_dump_json() if isinstance(data, BaseModel) else json.dumps(data, ensure_ascii=False,
                                                                                   separators=(",", ":"))
    return b"data: " + text.encode("utf-8") + b"\n\n"


async def encode(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[bytes]:
    """Frames of chunks; a failure after the stream started becomes an error event; always ends with [DONE]."""
    async with contextlib.aclosing(chunks):
        try:
            async for chunk in chunks:
                yield frame(chunk)
        except Exception as exc:      # CancelledError is a BaseException and passes: the client is gone
            if spec_for(exc) is INTERNAL:
                log.error("stream failed: %s", type(exc).__name__, exc_info=exc)
            yield frame(stream_error_event(exc))
    yield DONE


class SSEResponse(Response):
    """A text/event-stream response over an async iterator of frames, cancelled when the client disconnects."""

    media_type = "text/event-stream"

    def __init__(self, frames: AsyncIterator[bytes], *, on_disconnect: Callable[[], None] | None = None):
        super().__init__(content=None, status_code=200, headers={
            "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}, media_type="text/event-stream; charset=utf-8")
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.frames = frames
        self.on_disconnect = on_disconnect

    async def __call__(self, scope, receive, send) -> None:
        self._sending_since = None
        sender = asyncio.ensure_future(self._send_all(send))
        watchers = {asyncio.ensure_future(_wait_disconnect(receive)), asyncio.ensure_future(self._watch_stall())}
        try:
            await asyncio.wait({sender, *watchers}, return_when=asyncio.FIRST_COMPLETED)
            gone = not sender.done()
            if gone:
                sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                gone |= await sender is False
        finally:
            for task in (sender, *watchers):
                task.cancel()
            await asyncio.gather(sender, *watchers, return_exceptions=True)
            await self.frames.aclose()
        if gone and self.on_disconnect is not None:
            self.on_disconnect()

    async def _send_all(self, send) -> bool:
        """True when every frame was sent, False when the client went away."""
        loop = asyncio.get_running_loop()
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for data in self.frames:
                self._sending_since = loop.time()
                await send({"type": "http.response.body", "body": data, "more_body": True})
                self._sending_since = None
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:               # ASGI 2.4 servers raise on send to a closed connection
            return False
        return True

    async def _watch_stall(self) -> None:
        """Returns when one send has been blocked for SEND_TIMEOUT (the client stopped reading)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SEND_TIMEOUT / 4)
            since = self._sending_since
            if since is not None and loop.time() - since > SEND_TIMEOUT:
                return


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
