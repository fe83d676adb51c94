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


@dataclass(frozen=True)
class EngineConfig:
    """Scheduler and memory settings of the continuous-batching engine (config.yaml section `engine`)."""
    max_sessions: int = 64
    """State slots preallocated on the model's device: the most sequences decoding at once."""
    max_waiting: int = 256
    """Requests (counting each of n) queued beyond the running ones; more are refused with Overloaded."""
    prefill_chunk: int = 512
    """Prompt tokens one sequence may prefill in one engine step."""
    step_token_budget: int = 1024
    """Tokens (decode + prefill) one engine step may process; bounds how long running streams wait."""
    prefix_cache_bytes: int = 1 << 30
    """Host memory for prefix-state snapshots (LRU); 0 disables the cache."""
    prefix_cache_interval: int = 256
    """Also snapshot the state every this many prompt tokens (besides the end of each prompt)."""
    default_max_tokens: int = 256
    """max_tokens when a request gives none."""
    max_max_tokens: int = 8192
    """Upper bound accepted for max_tokens."""
    max_prompt_tokens: int = 131072
    """Longest prompt accepted, in tokens (RWKV has no context limit; this bounds time, not memory)."""
    threads: int = 0
    """CPU threads for the engine's model calls (0: torch's default, one per CPU this process may use)."""
    cuda_graphs: str = "auto"
    """Decode over static buffers captured as CUDA graphs, one per batch-size bucket: auto (on for CUDA), on, off."""

    def __post_init__(self):
        for name in ("max_sessions", "max_waiting", "prefill_chunk", "step_token_budget",
                     "prefix_cache_interval", "default_max_tokens", "max_max_tokens", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"engine.{name} must be >= 1, got {getattr(self, name)}")
        if self.cuda_graphs not in ("auto", "on", "off"):
            raise ValueError(f"engine.cuda_graphs must be auto, on or off, got {self.cuda_graphs!r}")
        if self.threads < 0:
            raise ValueError(f"engine.threads must be >= 0 (0 = one per CPU), got {self.threads}")
        if self.prefix_cache_bytes < 0:
            raise ValueError(f"engine.prefix_cache_bytes must be >= 0, got {self.prefix_cache_bytes}")
        if self.default_max_tokens > self.max_max_tokens:
            raise ValueError(f"engine.default_max_tokens ({self.default_max_tokens}) exceeds "
                             f"engine.max_max_tokens ({self.max_max_tokens})")
        if self.step_token_budget < self.max_sessions:
            raise ValueError(f"engine.step_token_budget ({self.step_token_budget}) must be >= "
                             f"engine.max_sessions ({self.max_sessions}) so every running stream decodes each step")
