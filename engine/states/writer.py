"""One background thread that runs store writes in order, so the engine's step thread never waits on disk or Redis."""
from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("goose.states")


@dataclass
class WriterStats:
    queued: int = 0
    queued_bytes: int = 0
    done: int = 0
    dropped: int = 0                 # refused because the queue held max_bytes already
    failed: int = 0                  # raised (logged with its traceback)


class BackgroundWriter:
    """A FIFO of write jobs under a byte budget, run by one daemon thread.

    submit() never blocks: when the queued jobs already hold ``max_bytes``, the job is dropped and counted (a
    state that is not stored is a later cache miss, never a wrong answer)."""

    def __init__(self, max_bytes: int, name: str = "goose-state-writer"):
        self.max_bytes = max_bytes
        self._jobs: deque[tuple[Callable[[], None], int]] = deque()
        self._cond = threading.Condition()
        self._stats = WriterStats()
        self._running = 0                # jobs taken off the queue and not finished
        self._closed = False
        self._warned = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None], nbytes: int) -> bool:
        """Queue ``job`` (called on the writer thread); False when it was dropped or the writer is closed."""
        with self._cond:
            if self._closed:
                return False
            if self._stats.queued_bytes + nbytes > self.max_bytes and self._jobs:
                self._stats.dropped += 1
                if not self._warned:
                    self._warned = True
                    log.warning("state store: the write queue holds %d bytes (limit %d); dropping writes until "
                                "it drains (disk or Redis too slow?)", self._stats.queued_bytes, self.max_bytes)
                return False
            self._jobs.append((job, nbytes))
            self._stats.queued += 1
            self._stats.queued_bytes += nbytes
            self._cond.notify_all()
            return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if not self._jobs:
                    return
                job, nbytes = self._jobs.popleft()
                self._running += 1
            try:
                job()
                failed = False
            except Exception:    # noqa: BLE001 - a dead writer thread would silently stop every later write
                log.exception("state store: a background write failed")
                failed = True
            with self._cond:
                self._running -= 1
                self._stats.queued -= 1
                self._stats.queued_bytes -= nbytes
                self._stats.failed += failed
                self._stats.done += not failed
                if not self._jobs:
                    self._warned = False
                self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued job has run; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._jobs and not self._running, timeout)

    def close(self, timeout: float | None = 10.0) -> bool:
        """Run what is queued, then stop the thread; False when it did not finish within ``timeout``."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stats(self) -> WriterStats:
        with self._cond:
            return WriterStats(**vars(self._stats))
