"""Frozen configuration objects of the engine; ModelConfig is always inferred from tensor shapes."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    """Dimensions of an RWKV-7 x070 model, read from the checkpoint's tensor shapes (never from names)."""
    n_layer: int          # L
    n_embd: int           # C, the residual width
    n_head: int           # H
    head_size: int        # N (64 in every released model)
    vocab_size: int       # V
    dim_ffn: int          # F, ffn.key.weight is [F, C]
    decay_lora: int       # Dw, att.w1 is [C, Dw]
    iclr_lora: int        # Da, att.a1 is [C, Da]
    value_lora: int       # Dv, att.v1 is [C, Dv] (layers >= 1); 0 for a one-layer model
    gate_lora: int        # Dg, att.g1 is [C, Dg]

    def __post_init__(self):
        for name in ("n_layer", "n_embd", "n_head", "head_size", "vocab_size", "dim_ffn",
                     "decay_lora", "iclr_lora", "gate_lora"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.value_lora < 0 or (self.n_layer > 1 and self.value_lora == 0):
            raise ValueError(f"ModelConfig.value_lora must be positive, got {self.value_lora}")

    @property
    def dim_att(self) -> int:
        """Width of r, k, v (H * N); equals n_embd in released models."""
        return self.n_head * self.head_size

    @property
    def state_bytes(self) -> int:
        """Bytes of one sequence's recurrent state (fp32 shifts and wkv)."""
        return self.n_layer * (2 * self.n_embd + self.n_head * self.head_size ** 2) * 4
