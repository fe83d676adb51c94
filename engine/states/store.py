"""StateStore: RNN states and small JSON records by (model identity, initial state, key), in up to three tiers.

Lookups try memory, then the local directory, then Redis, and copy a hit into the faster tiers (records live only
in Redis when it is configured, so no replica reads a stale copy). Writes go
through to every tier; put_state(background=True) costs the caller one copy of the state (the snapshot),
and a writer thread encodes and writes it, while lookups already see it. Anything wrong with a stored copy
(damaged, truncated, another model's, expired) is a miss and the copy is deleted.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.config import ModelConfig
from engine.model.state import RNNState
from engine.states.codec import (KIND_RECORD, KIND_STATE, BlobError, StateKey, decode_record, decode_state,
                                 encode_record, encode_state, peek)
from engine.states.tiers import DiskTier, MemoryTier, RedisTier, TierStats
from engine.states.writer import BackgroundWriter, WriterStats

log = logging.getLogger("goose.states")


@dataclass(frozen=True)
class StoreConfig:
    """Where stored states and records live and for how long."""
    memory_bytes: int = 256 << 20
    """Process memory for the most recently used states and records (LRU); 0 turns the memory tier off."""
    disk_dir: str | None = ""
    """A local directory (created if missing) that keeps states and records across restarts; empty: no disk tier."""
    disk_bytes: int = 8 << 30
    """Byte budget of disk_dir; the least recently used files are deleted beyond it."""
    redis_url: str | None = ""
    """redis://host:port/db shared by replicas (needs the `redis` extra); empty: no Redis tier."""
    redis_prefix: str = "goose:"
    """Prefix of every Redis key this store writes."""
    ttl_s: float = 30 * 24 * 3600.0
    """Seconds a state or record lives after it was written, in every tier; 0 keeps it until evicted."""
    redis_timeout_s: float = 0.5
    """Connect and command timeout for Redis; a slower Redis counts as down."""
    redis_retry_s: float = 5.0
    """After a Redis failure, seconds during which Redis is skipped (every read a miss) before trying again."""
    write_queue_bytes: int = 512 << 20
    """Bytes of states waiting for the background writer; beyond it writes are dropped (and counted)."""
    fsync: bool = True
    """fsync each disk file and its directory before it counts as written (off: faster, lost on power failure)."""

    def __post_init__(self):
        for name in ("memory_bytes", "disk_bytes", "write_queue_bytes", "ttl_s", "redis_retry_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"states.{name} must be >= 0, got {getattr(self, name)}")
        if self.redis_timeout_s <= 0:
            raise ValueError(f"states.redis_timeout_s must be > 0, got {self.redis_timeout_s}")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"states.redis_url must be a redis://, rediss:// or unix:// URL, got {self.redis_url!r}")


@dataclass
class StoreStats:
    """A snapshot of the store's counters (the server exports them as metrics)."""
    tiers: dict[str, TierStats]
    writer: WriterStats
    pending: int = 0
    """Writes accepted and not yet in every tier."""
    expired: int = 0
    corrupt: int = 0
    """Copies found damaged or mismatched (and deleted)."""


@dataclass(eq=False)
class _Pending:
    """A write on its way to the tiers; lookups read it meanwhile."""
    kind: int
    key: StateKey
    created: float
    state: RNNState | None = None              # a state snapshot, encoded on the writer thread
    blob: bytes | None = None
    tiers: tuple = field(default=())           # the tiers it goes to


class StateStore:
    """Tiered store of batch-of-one states and JSON records. Thread-safe; close() it when done."""

    def __init__(self, config: StoreConfig, *, clock: Callable[[], float] = time.time):
        self.config = config
        self._clock = clock
        self.memory = MemoryTier(config.memory_bytes) if config.memory_bytes > 0 else None
        self.disk = (DiskTier(config.disk_dir, config.disk_bytes, fsync=config.fsync)
                     if config.disk_dir and config.disk_bytes > 0 else None)
        self.redis = (RedisTier(config.redis_url, prefix=config.redis_prefix, timeout_s=config.redis_timeout_s,
                                retry_s=config.redis_retry_s) if config.redis_url else None)
        self.tiers = [t for t in (self.memory, self.disk, self.redis) if t is not None]
        self.record_tiers = [self.redis] if self.redis is not None else self.tiers
        """Records live only in Redis when there is one: replicas then never read a stale local copy of a record
        another replica deleted or replaced."""
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()            # guards _pending and the counters below
        self._write_lock = threading.Lock()      # orders tier writes against deletes
        self._expired = self._corrupt = 0
        self.writer = BackgroundWriter(config.write_queue_bytes)

    # ------------------------------------------------------------------------------------------ states
    def get_state(self, key: StateKey, config: ModelConfig) -> RNNState | None:
        """The stored state (batch of one, fp32, CPU, a fresh copy) for ``key``, or None."""
        def from_pending(p: _Pending):
            if p.state is not None:
                return p.state.clone() if _fits(p.state, config) else None
            return decode_state(p.blob, key, config, verify=False)
        return self._get(KIND_STATE, key, lambda blob, verify: decode_state(blob, key, config, verify=verify),
                         from_pending)

    def put_state(self, key: StateKey, state: RNNState, *, background: bool = True) -> None:
        """Store a batch-of-one state (on any device) in every tier.

        background=True: the caller pays one copy (the snapshot); encoding and the tier writes run on the
        writer thread, and get_state sees the state at once. background=False writes every tier before returning."""
        if state.batch_size != 1:
            raise ValueError(f"put_state takes a batch of one, got {state.batch_size} sequences")
        created = self._clock()
        if not background:
            self._write_now(KIND_STATE, key, encode_state(key, state, created=created), created)
            return
        on_cpu = state.wkv[0].device.type == "cpu"
        snapshot = state.clone() if on_cpu else state.to("cpu")
        self._submit(_Pending(KIND_STATE, key, created, state=snapshot, tiers=tuple(self.tiers)), snapshot.nbytes)

    def delete_state(self, key: StateKey) -> None:
        self._delete(KIND_STATE, key)

    # ------------------------------------------------------------------------------------------ records
    def get_record(self, key: StateKey) -> dict | None:
        """The stored JSON object for ``key`` (a fresh copy), or None."""
        return self._get(KIND_RECORD, key, lambda blob, verify: decode_record(blob, key, verify=verify),
                         lambda p: decode_record(p.blob, key, verify=False))

    def put_record(self, key: StateKey, record: dict, *, background: bool = False) -> None:
        """Store a JSON-serializable dict in every tier (before returning, unless background)."""
        created = self._clock()
        blob = encode_record(key, record, created=created)
        if background:
            self._submit(_Pending(KIND_RECORD, key, created, blob=blob, tiers=tuple(self.record_tiers)), len(blob))
        else:
            self._write_now(KIND_RECORD, key, blob, created)

    def delete_record(self, key: StateKey) -> None:
        self._delete(KIND_RECORD, key)

    # ------------------------------------------------------------------------------------------ common
    def _get(self, kind: int, key: StateKey, decode, from_pending):
        digest = key.digest(kind)
        with self._lock:
            pending = self._pending.get(digest)
        if pending is not None:
            return from_pending(pending)
        tiers = self.record_tiers if kind == KIND_RECORD else self.tiers
        for i, tier in enumerate(tiers):
            blob = tier.get(digest)
            if blob is None:
                tier.count("misses")
                continue
            try:
                created = peek(blob).created
                if self._expired_at(created):
                    self._discard(tier, digest, "expired")
                    continue
                value = decode(blob, tier is not self.memory)    # memory holds only blobs checked or made here
            except BlobError as exc:
                log.warning("state store: %s copy of %s is unusable, deleted: %s", tier.name, key, exc)
                tier.count("errors")
                self._discard(tier, digest, "corrupt")
                continue
            tier.count("hits")
            self._promote(kind, key, digest, blob, created, tiers[:i])
            return value
        return None

    def _expired_at(self, created: float) -> bool:
        return self.config.ttl_s > 0 and self._clock() - created >= self.config.ttl_s

    def _ttl_left(self, created: float) -> float | None:
        return max(1.0, self.config.ttl_s - (self._clock() - created)) if self.config.ttl_s > 0 else None

    def _discard(self, tier, digest: str, why: str) -> None:
        tier.count("misses")
        tier.delete(digest)
        with self._lock:
            if why == "expired":
                self._expired += 1
            else:
                self._corrupt += 1

    def _promote(self, kind, key, digest, blob, created, faster: list) -> None:
        """Copy a hit into the faster tiers: memory now, disk through the writer."""
        if self.memory in faster:
            self.memory.put(digest, blob)
        slow = tuple(t for t in faster if t is not self.memory)
        if slow:
            with self._lock:
                if digest in self._pending:        # a newer write is on its way
                    return
            self._submit(_Pending(kind, key, created, blob=blob, tiers=slow), len(blob))

    def _submit(self, pending: _Pending, nbytes: int) -> None:
        digest = pending.key.digest(pending.kind)
        with self._lock:
            self._pending[digest] = pending
        if not self.writer.submit(lambda: self._write_pending(digest, pending), nbytes):
            with self._lock:
                if self._pending.get(digest) is pending:
                    del self._pending[digest]

    def _write_pending(self, digest: str, pending: _Pending) -> None:
        """On the writer thread: encode if needed, then write, unless a delete or a newer write came first."""
        try:
            if pending.blob is None:
                pending.blob = encode_state(pending.key, pending.state, created=pending.created)
            with self._write_lock:
                with self._lock:
                    if self._pending.get(digest) is not pending:
                        return
                self._write_tiers(digest, pending.blob, pending.created, pending.tiers)
        finally:                                   # written, superseded, or failed: lookups go to the tiers
            with self._lock:
                if self._pending.get(digest) is pending:
                    del self._pending[digest]

    def _write_now(self, kind: int, key: StateKey, blob: bytes, created: float) -> None:
        digest = key.digest(kind)
        with self._write_lock:
            with self._lock:
                self._pending.pop(digest, None)    # an older queued write must not land after this one
            self._write_tiers(digest, blob, created, self.record_tiers if kind == KIND_RECORD else self.tiers)

    def _write_tiers(self, digest: str, blob: bytes, created: float, tiers) -> None:
        ttl = self._ttl_left(created)
        for tier in tiers:
            tier.put(digest, blob, ttl)

    def _delete(self, kind: int, key: StateKey) -> None:
        digest = key.digest(kind)
        with self._write_lock:
            with self._lock:
                self._pending.pop(digest, None)
            for tier in self.tiers:
                tier.delete(digest)

    def stats(self) -> StoreStats:
        with self._lock:
            pending, expired, corrupt = len(self._pending), self._expired, self._corrupt
        return StoreStats(tiers={t.name: t.stats() for t in self.tiers}, writer=self.writer.stats(),
                          pending=pending, expired=expired, corrupt=corrupt)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every background write is in its tiers; False on timeout."""
        return self.writer.flush(timeout)

    def close(self, timeout: float | None = 10.0) -> None:
        """Finish the queued writes (up to ``timeout``), then release Redis."""
        if not self.writer.close(timeout):
            log.warning("state store: closing with background writes still running")
        if self.redis is not None:
            self.redis.close()

    def __enter__(self) -> "StateStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fits(state: RNNState, cfg: ModelConfig) -> bool:
    _, H, N, _ = state.wkv[0].shape
    return (state.n_layer, state.att_x[0].shape[1], H, N) == (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size)

