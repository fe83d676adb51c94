"""The state pool and the model calls of one engine step: the only place where a plan meets tensors.

The pool preallocates ``max_sessions`` state rows on the model's device (memory is fixed after start-up).
Decoding sequences are kept packed in rows [0, D) so a decode step runs the model in place on a view of
the pool, with no gather or scatter; when the decoding set changes, only the rows that move are copied.
"""
from __future__ import annotations

from collections.abc import Hashable

import torch

from engine.model.rwkv7 import RWKV7
from engine.model.state import RNNState


class StatePool:
    """Fixed rows of RNN state, each owned by one key (a sequence) or free."""

    def __init__(self, model: RWKV7, size: int):
        self.model = model
        self.size = size
        self.state = model.zero_state(size)                    # [S, ...] fp32, allocated once
        self._holder: list[Hashable | None] = [None] * size     # row -> key
        self._row: dict[Hashable, int] = {}                      # key -> row

    @property
    def used(self) -> int:
        return len(self._row)

    @property
    def bytes_per_row(self) -> int:
        return self.model.config.state_bytes

    @property
    def nbytes(self) -> int:
        return self.state.nbytes

    def alloc(self, key: Hashable) -> int:
        """Give ``key`` a zeroed row (the highest free one, leaving low rows for decoding sequences)."""
        if key in self._row:
            raise KeyError(f"{key!r} already holds a row")
        for row in range(self.size - 1, -1, -1):
            if self._holder[row] is None:
                self._assign(key, row)
                self._zero(row)
                return row
        raise RuntimeError("state pool exhausted")               # the scheduler never lets this happen

    def free(self, key: Hashable) -> None:
        row = self._row.pop(key, None)
        if row is not None:
            self._holder[row] = None

    def row_of(self, key: Hashable) -> int:
        return self._row[key]

    def view(self, key: Hashable) -> RNNState:
        """The key's state as a batch-of-one view: the model updates it in place."""
        return self._narrow(self._row[key], 1)

    def snapshot(self, key: Hashable) -> RNNState:
        return self.view(key).clone()

    def load(self, key: Hashable, state: RNNState) -> None:
        self.view(key).index_copy_(torch.tensor([0]), state.to(self.state.wkv[0].device))

    def copy(self, src: Hashable, dst: Hashable) -> None:
        """Make ``dst``'s row a copy of ``src``'s (n > 1: one prefill, n continuations)."""
        self._copy_row(self._row[src], self._row[dst])

    def pack(self, keys: list[Hashable]) -> RNNState:
        """Move ``keys`` into rows [0, len(keys)) (in that order) and return the view of those rows."""
        for target, key in enumerate(keys):
            row = self._row[key]
            if row == target:
                continue
            other = self._holder[target]
            if other is None:
                self._copy_row(row, target)
                self._holder[row] = None
                self._assign(key, target)
            else:
                self._swap_rows(row, target)
                self._assign(other, row)
                self._assign(key, target)
        return self._narrow(0, len(keys))

    def clear(self, start: int, end: int) -> bool:
        """Move every owner of rows [start, end) to a free row at or above ``end``, so a batch padded to ``end``
        rows (a CUDA graph's bucket) computes on free rows only; False, moving nothing, when too few are free."""
        owners = [row for row in range(start, end) if self._holder[row] is not None]
        free = [row for row in range(self.size - 1, end - 1, -1) if self._holder[row] is None]
        if len(owners) > len(free):
            return False
        for row, target in zip(owners, free):
            key = self._holder[row]
            self._copy_row(row, target)
            self._holder[row] = None
            self._assign(key, target)
        return True

    # ------------------------------------------------------------------------------------------ rows
    def _assign(self, key: Hashable, row: int) -> None:
        self._holder[row] = key
        self._row[key] = row

    def _tensors(self):
        return self.state.tensors()

    def _narrow(self, start: int, length: int) -> RNNState:
        return self.state.narrow(start, length)

    def _zero(self, row: int) -> None:
        for t in self._tensors():
            t[row].zero_()

    def _copy_row(self, src: int, dst: int) -> None:
        for t in self._tensors():
            t[dst].copy_(t[src])

    def _swap_rows(self, a: int, b: int) -> None:
        for t in self._tensors():            # row copies, no index tensor: no host-to-device copy, no sync
            held = t[a].clone()
            t[a].copy_(t[b])
            t[b].copy_(held)
