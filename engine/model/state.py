"""The recurrent state of RWKV-7: per layer, three named tensors batched on dim 0, always fp32.

Each layer's tensors are separate and contiguous, so a batch of rows [0, B) of a larger state (a view
into the engine's pool) is still contiguous per layer and the decode kernels update it in place
without copies.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import ModelConfig


@dataclass
class RNNState:
    """Per-sequence state; row b of every tensor belongs to sequence b. Its size never grows with context."""
    att_x: list[torch.Tensor]   # L x [B, C] fp32  ln1 output of the previous token (time-mix token shift)
    wkv: list[torch.Tensor]     # L x [B, H, N, N] fp32  rows = value index, columns = key index
    ffn_x: list[torch.Tensor]   # L x [B, C] fp32  ln2 output of the previous token (channel-mix token shift)

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch_size: int, device: torch.device | str = "cpu") -> "RNNState":
        if batch_size < 0:
            raise ValueError(f"batch_size must be >= 0, got {batch_size}")
        B, C, H, N = batch_size, cfg.n_embd, cfg.n_head, cfg.head_size
        f32 = dict(dtype=torch.float32, device=device)
        return cls(att_x=[torch.zeros(B, C, **f32) for _ in range(cfg.n_layer)],
                   wkv=[torch.zeros(B, H, N, N, **f32) for _ in range(cfg.n_layer)],
                   ffn_x=[torch.zeros(B, C, **f32) for _ in range(cfg.n_layer)])

    @property
    def n_layer(self) -> int:
        return len(self.wkv)

    @property
    def batch_size(self) -> int:
        return self.wkv[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        return [*self.att_x, *self.wkv, *self.ffn_x]

    def _map(self, fn) -> "RNNState":
        return RNNState([fn(t) for t in self.att_x], [fn(t) for t in self.wkv], [fn(t) for t in self.ffn_x])

    def clone(self) -> "RNNState":
        return self._map(torch.clone)

    def to(self, device: torch.device | str) -> "RNNState":
        return self._map(lambda t: t.to(device))

    def narrow(self, start: int, length: int) -> "RNNState":
        """Rows [start, start + length) as a view: updating it updates this state."""
        return self._map(lambda t: t.narrow(0, start, length))

    def index_select(self, index: torch.Tensor) -> "RNNState":
        """A new state holding rows ``index`` (a copy)."""
        return self._map(lambda t: t.index_select(0, index.to(t.device)))

    def index_copy_(self, index: torch.Tensor, source: "RNNState") -> "RNNState":
        """Write ``source``'s rows into rows ``index`` of this state, in place."""
        for dst, src in zip(self.tensors(), source.tensors()):
            dst.index_copy_(0, index.to(dst.device), src.to(dst.device))
        return self

    @staticmethod
    def cat(states: list["RNNState"]) -> "RNNState":
        L = states[0].n_layer
        return RNNState([torch.cat([s.att_x[i] for s in states]) for i in range(L)],
                        [torch.cat([s.wkv[i] for s in states]) for i in range(L)],
                        [torch.cat([s.ffn_x[i] for s in states]) for i in range(L)])
