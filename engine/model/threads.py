"""Keep multi-threaded torch work on one thread: the engine's step loop.

torch's CPU build runs its intra-op parallelism on GNU OpenMP, which gives every thread that opens a parallel
region its own team of worker threads, kept alive as long as that thread lives. Team workers wait for the
next region by spinning briefly, which matters for decode (hundreds of small regions per token), but libgomp
cuts the spin to almost nothing as soon as it manages more threads than there are CPUs. A model loaded on one
long-lived thread (the main thread, or a pool thread of asyncio.to_thread) and then run on the engine's thread
leaves two teams alive, and on these 2-core machines the engine's B=64 decode step went from ~145 ms to
~200 ms that way (median of 10 steps, 4 processes each). A team is released when its thread exits, so:

- the engine's thread sets its own thread count when it starts (``EngineConfig.threads``, 0 = torch's);
- work that must run torch in parallel before the engine starts, such as loading a model, runs on a thread
  that exits afterwards: ``call_in_new_thread`` / ``acall_in_new_thread``.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def call_in_new_thread(fn: Callable[..., T], *args: Any, name: str = "goose-load", **kwargs: Any) -> T:
    """Run ``fn`` on a fresh thread that exits when it returns; return its result or raise its exception."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:   # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


async def acall_in_new_thread(fn: Callable[..., T], *args: Any, name: str = "goose-load", **kwargs: Any) -> T:
    """``call_in_new_thread`` without blocking the event loop: the pool thread of asyncio.to_thread only waits
    for the fresh thread, so it never opens a parallel region of its own."""
    return await asyncio.to_thread(call_in_new_thread, fn, *args, name=name, **kwargs)
