"""The three places a blob can live: process memory, a local directory, Redis. Each maps a digest to bytes.

Tiers know nothing of keys, kinds, TTLs or formats (the store checks blobs); they keep their own counters.
Every method is thread-safe. Disk and Redis failures never raise into a request: they are logged, counted
and read as misses.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("goose.states")
_SUFFIX = ".gst"
_STALE_TMP_S = 3600.0           # temporary files older than this are leftovers of a crash
_DOWN = object()                # RedisTier._call's answer when Redis failed


@dataclass
class TierStats:
    """Counters of one tier. entries/bytes are None where the tier cannot know them cheaply (Redis)."""
    hits: int = 0
    misses: int = 0
    writes: int = 0
    evictions: int = 0
    errors: int = 0                  # I/O or connection failures, and blobs found corrupt or mismatched
    entries: int | None = 0
    bytes: int | None = 0


class MemoryTier:
    """An LRU of blobs under a byte budget."""
    name = "memory"

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._blobs: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._stats = TierStats()

    def get(self, digest: str) -> bytes | None:
        with self._lock:
            blob = self._blobs.get(digest)
            if blob is not None:
                self._blobs.move_to_end(digest)
            return blob

    def put(self, digest: str, blob: bytes, ttl_s: float | None = None) -> None:
        if len(blob) > self.max_bytes:
            self.delete(digest)                          # never leave an older version behind
            return
        with self._lock:
            old = self._blobs.pop(digest, None)
            self._bytes -= len(old) if old is not None else 0
            while self._blobs and self._bytes + len(blob) > self.max_bytes:
                _, evicted = self._blobs.popitem(last=False)
                self._bytes -= len(evicted)
                self._stats.evictions += 1
            self._blobs[digest] = blob
            self._bytes += len(blob)
            self._stats.writes += 1

    def delete(self, digest: str) -> None:
        with self._lock:
            old = self._blobs.pop(digest, None)
            self._bytes -= len(old) if old is not None else 0

    def stats(self) -> TierStats:
        with self._lock:
            return TierStats(**{**vars(self._stats), "entries": len(self._blobs), "bytes": self._bytes})

    def count(self, field: str) -> None:
        with self._lock:
            setattr(self._stats, field, getattr(self._stats, field) + 1)


class DiskTier:
    """Blob files under ``root/<2 hex>/<digest>.gst`` with a byte budget, evicting the least recently used
    (by mtime, which a read refreshes, so the order survives restarts). Writes are atomic: a temporary file in
    ``root/tmp``, fsync, rename, fsync of the directory. The index is this process's view of the directory;
    files another process deletes read as misses."""
    name = "disk"

    def __init__(self, root: str | Path, max_bytes: int, *, fsync: bool = True):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.fsync = fsync
        self._tmp = self.root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._stats = TierStats()
        self._index: OrderedDict[str, int] = OrderedDict()    # digest -> size, least recently used first
        self._bytes = 0
        self._scan()
        self._evict(0)

    def _path(self, digest: str) -> Path:
        return self.root / digest[:2] / (digest + _SUFFIX)

    def _scan(self) -> None:
        found = []
        for sub in self.root.iterdir():
            if sub == self._tmp:
                self._remove_stale_tmp()
            elif sub.is_dir() and len(sub.name) == 2:
                for entry in os.scandir(sub):
                    if entry.name.endswith(_SUFFIX) and entry.is_file():
                        st = entry.stat()
                        found.append((st.st_mtime, entry.name[:-len(_SUFFIX)], st.st_size))
        for _, digest, size in sorted(found):
            self._index[digest] = size
            self._bytes += size

    def _remove_stale_tmp(self) -> None:
        cutoff = time.time() - _STALE_TMP_S
        for entry in os.scandir(self._tmp):
            try:
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
            except OSError:
                pass                                     # another process took it

    def get(self, digest: str) -> bytes | None:
        path = self._path(digest)
        try:
            blob = path.read_bytes()
            os.utime(path)                               # LRU order by mtime, across restarts
        except FileNotFoundError:
            self._forget(digest)
            return None
        except OSError as exc:
            self._failed("read", path, exc)
            return None
        with self._lock:
            if digest in self._index:
                self._index.move_to_end(digest)
            else:                                        # written by another process since the scan
                self._index[digest] = len(blob)
                self._bytes += len(blob)
        return blob

    def put(self, digest: str, blob: bytes, ttl_s: float | None = None) -> None:
        if len(blob) > self.max_bytes:
            self.delete(digest)                          # never leave an older version behind
            return
        path = self._path(digest)
        tmp = self._tmp / f"{digest}.{uuid.uuid4().hex}.tmp"
        try:
            path.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(blob)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
            if self.fsync:
                _fsync_dir(path.parent)
        except OSError as exc:
            self._failed("write", path, exc)
            tmp.unlink(missing_ok=True)
            return
        with self._lock:
            self._bytes -= self._index.pop(digest, 0)
            self._index[digest] = len(blob)
            self._bytes += len(blob)
            self._stats.writes += 1
        self._evict(0)

    def delete(self, digest: str) -> None:
        try:
            self._path(digest).unlink(missing_ok=True)
        except OSError as exc:
            self._failed("delete", self._path(digest), exc)
        self._forget(digest)

    def _forget(self, digest: str) -> None:
        with self._lock:
            self._bytes -= self._index.pop(digest, 0)

    def _evict(self, incoming: int) -> None:
        while True:
            with self._lock:
                if not self._index or self._bytes + incoming <= self.max_bytes:
                    return
                digest, size = self._index.popitem(last=False)
                self._bytes -= size
                self._stats.evictions += 1
            try:
                self._path(digest).unlink(missing_ok=True)
            except OSError as exc:
                self._failed("evict", self._path(digest), exc)

    def _failed(self, what: str, path: Path, exc: OSError) -> None:
        self.count("errors")
        log.warning("state store: cannot %s %s: %s", what, path, exc)

    def stats(self) -> TierStats:
        with self._lock:
            return TierStats(**{**vars(self._stats), "entries": len(self._index), "bytes": self._bytes})

    def count(self, field: str) -> None:
        with self._lock:
            setattr(self._stats, field, getattr(self._stats, field) + 1)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RedisTier:
    """Blobs in Redis under ``prefix + digest`` with SET EX, shared by every replica that uses the same server.

    redis-py is imported here, only when a URL is configured. After a failure the tier stays off for
    ``retry_s`` seconds (every call a quick miss) instead of paying a connection timeout per request."""
    name = "redis"

    def __init__(self, url: str, *, prefix: str = "goose:", timeout_s: float = 0.5, retry_s: float = 5.0):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
        self.url, self.prefix, self.retry_s = url, prefix, retry_s
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        # reads of 1 MiB: redis-py's Python parser takes ~4x longer for a 2.4 MB state at its default 64 KiB
        self._client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                            retry=Retry(NoBackoff(), 0), socket_read_size=1 << 20)
        self._lock = threading.Lock()
        self._stats = TierStats(entries=None, bytes=None)
        self._down_until = 0.0

    def _call(self, what: str, fn, *args, **kwargs):
        """fn's result, or _DOWN when Redis failed (logged once per outage, counted, then skipped a while)."""
        if time.monotonic() < self._down_until:
            return _DOWN
        try:
            result = fn(*args, **kwargs)
        except self._errors as exc:
            with self._lock:
                self._stats.errors += 1
                first = self._down_until == 0.0
                self._down_until = time.monotonic() + self.retry_s
            if first:
                log.warning("state store: Redis at %s failed (%s: %s); its reads are misses, retried every %.0f s",
                            _redacted(self.url), what, exc, self.retry_s)
            return _DOWN
        if self._down_until:
            with self._lock:
                self._down_until = 0.0
            log.info("state store: Redis at %s answers again", _redacted(self.url))
        return result

    def get(self, digest: str) -> bytes | None:
        blob = self._call("GET", self._client.get, self.prefix + digest)
        return None if blob is _DOWN else blob

    def put(self, digest: str, blob: bytes, ttl_s: float | None = None) -> None:
        ex = max(1, int(ttl_s)) if ttl_s is not None else None
        if self._call("SET", self._client.set, self.prefix + digest, blob, ex=ex) is not _DOWN:
            self.count("writes")

    def delete(self, digest: str) -> None:
        self._call("DEL", self._client.delete, self.prefix + digest)

    def stats(self) -> TierStats:
        with self._lock:
            return TierStats(**vars(self._stats))

    def count(self, field: str) -> None:
        with self._lock:
            setattr(self._stats, field, getattr(self._stats, field) + 1)

    def close(self) -> None:
        self._client.close()


def _redacted(url: str) -> str:
    """The URL without a password (redis://user:secret@host -> redis://user:***@host)."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"
