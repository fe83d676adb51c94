"""Prefix-state cache: snapshots of the RNN state keyed by the exact token prefix, LRU under a byte budget."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from engine.model.state import RNNState

_MOD = (1 << 61) - 1
_BASE = 1_000_003


def prefix_hashes(tokens: list[int], upto: int) -> list[int]:
    """h[i] = polynomial hash of tokens[:i] for i in 0..upto (one O(upto) pass)."""
    h = [0] * (upto + 1)
    acc = 0
    for i in range(upto):
        acc = (acc * _BASE + tokens[i] + 1) % _MOD
        h[i + 1] = acc
    return h


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    state: RNNState          # batch of one, on the cache's device
    nbytes: int


class PrefixCache:
    """Exact-prefix lookup: a new prompt resumes from the longest cached prefix (at most len - 1 tokens,
    so at least one token is always run to produce the logits of the last position)."""

    def __init__(self, max_bytes: int, device: str = "cpu"):
        self.max_bytes = max_bytes
        self.device = device
        self._entries: OrderedDict[tuple[int, int], _Entry] = OrderedDict()   # (length, hash) -> entry
        self._lengths: dict[int, int] = {}                                     # length -> number of entries
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.tokens_saved = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def lookup(self, tokens: list[int]) -> tuple[int, RNNState | None]:
        """(cached length, a copy of its state) for the longest cached proper prefix, else (0, None)."""
        if not self.enabled or len(tokens) < 2:
            return 0, None
        candidates = sorted((n for n in self._lengths if n < len(tokens)), reverse=True)
        if candidates:
            hashes = prefix_hashes(tokens, candidates[0])
            for n in candidates:
                entry = self._entries.get((n, hashes[n]))
                if entry is not None and list(entry.tokens) == tokens[:n]:
                    self._entries.move_to_end((n, hashes[n]))
                    self.hits += 1
                    self.tokens_saved += n
                    return n, entry.state.clone()
        self.misses += 1
        return 0, None

    def insert(self, tokens: list[int], state: RNNState) -> None:
        """Store a snapshot (copied to the cache's device) of ``state`` after exactly ``tokens``."""
        if not self.enabled or not tokens:
            return
        key = (len(tokens), prefix_hashes(tokens, len(tokens))[-1])
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        snap = state.to(self.device) if str(state.wkv[0].device) != self.device else state.clone()
        nbytes = snap.nbytes + 8 * len(tokens)
        if nbytes > self.max_bytes:
            return
        while self.bytes + nbytes > self.max_bytes and self._entries:
            self._evict_oldest()
        self._entries[key] = _Entry(tuple(tokens), snap, nbytes)
        self._lengths[key[0]] = self._lengths.get(key[0], 0) + 1
        self.bytes += nbytes

    def _evict_oldest(self) -> None:
        (n, _), entry = self._entries.popitem(last=False)
        self.bytes -= entry.nbytes
        self._lengths[n] -= 1
        if not self._lengths[n]:
            del self._lengths[n]
