"""Prefix-state cache: snapshots of the RNN state named by (initial state, digest of the token prefix), LRU under a
byte budget, in the step thread's memory. A snapshot at the end of a prompt keeps that position's logits too, so an
identical prompt starts sampling without running a token."""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from engine.model.state import RNNState
from engine.prefix_hash import PrefixHashes


@dataclass
class _Entry:
    length: int
    state: RNNState                  # batch of one, on the cache's device
    logits: torch.Tensor | None      # [1, V] float32 at the last position, or None
    nbytes: int


@dataclass
class Hit:
    """A lookup's answer: ``tokens`` of the request's prompt are covered by ``state`` (a copy); ``logits`` when
    the whole prompt is."""
    tokens: int
    state: RNNState
    logits: torch.Tensor | None = None


class PrefixCache:
    """Longest-prefix lookup by digest (engine/prefix_hash.py): a prompt resumes from the longest cached prefix,
    its whole length only when that entry holds the logits of its last position. Thread-safe."""

    def __init__(self, max_bytes: int, device: str = "cpu"):
        self.max_bytes = max_bytes
        self.device = device
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()   # (initial, digest) -> entry
        self._lengths: dict[int, int] = {}                                     # prefix length -> entries
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.tokens_saved = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def lookup(self, initial: str, hashes: PrefixHashes) -> Hit | None:
        """The longest cached prefix of hashes.start + hashes.tokens that covers at least one of the tokens,
        or None (counted as a miss)."""
        if not self.enabled or not hashes.tokens:
            return None
        base, total = hashes.start.length, len(hashes.tokens)
        with self._lock:
            lengths = sorted((n for n in self._lengths if base < n <= base + total), reverse=True)
        for n in lengths:
            key = (initial, hashes.digest(n - base))
            with self._lock:
                entry = self._entries.get(key)
                if entry is None or (n == base + total and entry.logits is None):
                    continue
                self._entries.move_to_end(key)
                self.hits += 1
                self.tokens_saved += n - base
                state, logits = entry.state.clone(), entry.logits
            return Hit(n - base, state, None if logits is None else logits.clone())
        with self._lock:
            self.misses += 1
        return None

    def has(self, initial: str, digest: str) -> bool:
        with self._lock:
            return (initial, digest) in self._entries

    def get(self, initial: str, digest: str) -> RNNState | None:
        """A copy of the state stored under exactly this name, or None."""
        with self._lock:
            entry = self._entries.get((initial, digest))
            if entry is None:
                return None
            self._entries.move_to_end((initial, digest))
            return entry.state.clone()

    def remove(self, initial: str, digest: str) -> None:
        with self._lock:
            self._drop((initial, digest))

    def insert(self, initial: str, digest: str, length: int, state: RNNState,
               logits: torch.Tensor | None = None) -> None:
        """Keep a copy of ``state`` (a batch of one) after the ``length`` tokens named ``digest``, with the logits of
        the last position when given."""
        if not self.enabled or length <= 0:
            return
        key = (initial, digest)
        with self._lock:
            old = self._entries.get(key)
            if old is not None and (logits is None or old.logits is not None):
                self._entries.move_to_end(key)
                return
        snap = state.to(self.device) if str(state.wkv[0].device) != self.device else state.clone()
        kept = None if logits is None else logits.detach().reshape(1, -1).float().to(self.device, copy=True)
        nbytes = snap.nbytes + (kept.numel() * 4 if kept is not None else 0) + 200
        if nbytes > self.max_bytes:
            return
        with self._lock:
            self._drop(key)
            while self.bytes + nbytes > self.max_bytes and self._entries:
                self._drop(next(iter(self._entries)))
            self._entries[key] = _Entry(length, snap, kept, nbytes)
            self._lengths[length] = self._lengths.get(length, 0) + 1
            self.bytes += nbytes

    def _drop(self, key) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self.bytes -= entry.nbytes
        self._lengths[entry.length] -= 1
        if not self._lengths[entry.length]:
            del self._lengths[entry.length]
