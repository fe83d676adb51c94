"""The recurrent state of RWKV-7: three named tensors per sequence, batched on dim 0, always fp32."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import ModelConfig


@dataclass
class RNNState:
    """Per-sequence state; row b of every tensor belongs to sequence b. Its size never grows with context."""
    att_x: torch.Tensor   # [B, L, C] fp32  ln1 output of the previous token (time-mix token shift)
    wkv: torch.Tensor     # [B, L, H, N, N] fp32  rows = value index, columns = key index
    ffn_x: torch.Tensor   # [B, L, C] fp32  ln2 output of the previous token (channel-mix token shift)

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch_size: int, device: torch.device | str = "cpu") -> "RNNState":
        if batch_size < 0:
            raise ValueError(f"batch_size must be >= 0, got {batch_size}")
        L, C, H, N = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size
        f32 = dict(dtype=torch.float32, device=device)
        return cls(att_x=torch.zeros(batch_size, L, C, **f32),
                   wkv=torch.zeros(batch_size, L, H, N, N, **f32),
                   ffn_x=torch.zeros(batch_size, L, C, **f32))

    @property
    def batch_size(self) -> int:
        return self.wkv.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.att_x, self.wkv, self.ffn_x))

    def clone(self) -> "RNNState":
        return RNNState(self.att_x.clone(), self.wkv.clone(), self.ffn_x.clone())

    def index_select(self, index: torch.Tensor) -> "RNNState":
        """A new state holding rows ``index`` (a copy)."""
        return RNNState(self.att_x.index_select(0, index), self.wkv.index_select(0, index),
                        self.ffn_x.index_select(0, index))

    def index_copy_(self, index: torch.Tensor, source: "RNNState") -> "RNNState":
        """Write ``source``'s rows into rows ``index`` of this state, in place."""
        self.att_x.index_copy_(0, index, source.att_x)
        self.wkv.index_copy_(0, index, source.wkv)
        self.ffn_x.index_copy_(0, index, source.ffn_x)
        return self

    @staticmethod
    def cat(states: list["RNNState"]) -> "RNNState":
        return RNNState(torch.cat([s.att_x for s in states]), torch.cat([s.wkv for s in states]),
                        torch.cat([s.ffn_x for s in states]))

    def to(self, device: torch.device | str) -> "RNNState":
        return RNNState(self.att_x.to(device), self.wkv.to(device), self.ffn_x.to(device))
