"""Random RWKV-7 x070 checkpoints with the official BlinkDL key names and shapes (tests and benchmarks)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CheckpointShape:
    """The dimensions of a random checkpoint; defaults are a tiny model."""
    n_layer: int = 2
    n_embd: int = 128
    head_size: int = 64
    vocab_size: int = 1024
    dim_ffn: int | None = None          # None: 4 * n_embd
    decay_lora: int = 32
    iclr_lora: int = 32
    value_lora: int = 32
    gate_lora: int = 64
    layer0_value_lora: bool = True      # some released files carry blocks.0.att.v0/v1/v2, some don't
    logit_scale: float = 1.0            # > 1 gives peaked next-token distributions, like trained models

    @property
    def ffn(self) -> int:
        return self.dim_ffn if self.dim_ffn is not None else 4 * self.n_embd


SHAPE_0B1 = CheckpointShape(n_layer=12, n_embd=768, head_size=64, vocab_size=65536,
                            decay_lora=64, iclr_lora=64, value_lora=32, gate_lora=128)


def random_state_dict(shape: CheckpointShape, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A state dict laid out exactly like a BlinkDL .pth, with weights scaled so activations stay sane.

    device: where the numbers are drawn ("cuda" makes a 7B-shaped model in seconds; the values differ
    from the CPU draw for the same seed)."""
    g = torch.Generator(device=device).manual_seed(seed)
    C, V, F, N = shape.n_embd, shape.vocab_size, shape.ffn, shape.head_size
    if C % N:
        raise ValueError(f"n_embd {C} is not a multiple of head_size {N}")
    H = C // N

    def randn(*size, std=1.0):
        return torch.randn(*size, generator=g, device=device) * std

    def unif(*size, lo=0.0, hi=1.0):
        return torch.rand(*size, generator=g, device=device) * (hi - lo) + lo

    def ln(prefix):
        return {f"{prefix}.weight": 1.0 + randn(C, std=0.1), f"{prefix}.bias": randn(C, std=0.1)}

    sd: dict[str, torch.Tensor] = {"emb.weight": randn(V, C, std=1.0)}
    sd.update(ln("blocks.0.ln0"))
    for i in range(shape.n_layer):
        p = f"blocks.{i}."
        sd.update(ln(p + "ln1"))
        sd.update(ln(p + "ln2"))
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            sd[p + "att." + name] = unif(1, 1, C)
        sd[p + "att.w0"] = unif(1, 1, C, lo=-6.0, hi=2.0)       # spread of time constants
        sd[p + "att.w1"] = randn(C, shape.decay_lora, std=0.1)
        sd[p + "att.w2"] = randn(shape.decay_lora, C, std=0.1)
        sd[p + "att.a0"] = randn(1, 1, C, std=0.5)
        sd[p + "att.a1"] = randn(C, shape.iclr_lora, std=0.1)
        sd[p + "att.a2"] = randn(shape.iclr_lora, C, std=0.1)
        if i > 0 or shape.layer0_value_lora:
            sd[p + "att.v0"] = randn(1, 1, C, std=0.5)
            sd[p + "att.v1"] = randn(C, shape.value_lora, std=0.1)
            sd[p + "att.v2"] = randn(shape.value_lora, C, std=0.1)
        sd[p + "att.g1"] = randn(C, shape.gate_lora, std=0.1)
        sd[p + "att.g2"] = randn(shape.gate_lora, C, std=0.1)
        sd[p + "att.k_k"] = unif(1, 1, C, lo=0.5, hi=1.5)
        sd[p + "att.k_a"] = unif(1, 1, C, lo=0.5, hi=1.5)
        sd[p + "att.r_k"] = randn(H, N, std=0.5)
        for name in ("receptance", "key", "value", "output"):
            sd[p + f"att.{name}.weight"] = randn(C, C, std=1 / math.sqrt(C))
        sd.update(ln(p + "att.ln_x"))
        sd[p + "ffn.x_k"] = unif(1, 1, C)
        sd[p + "ffn.key.weight"] = randn(F, C, std=1 / math.sqrt(C))
        sd[p + "ffn.value.weight"] = randn(C, F, std=1 / math.sqrt(F))
    sd.update(ln("ln_out"))
    sd["head.weight"] = randn(V, C, std=shape.logit_scale / math.sqrt(C))
    for k in sd:                                   # one tensor at a time: the peak is one fp32 copy, not two
        sd[k] = sd[k].to(dtype).contiguous()
    return sd


def write_checkpoint(path, shape: CheckpointShape, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
    """Write a random checkpoint as .pth (torch.save) or .safetensors, chosen by the file suffix."""
    sd = random_state_dict(shape, seed=seed, dtype=dtype)
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(sd, path)
    elif path.endswith(".pth"):
        torch.save(sd, path)
    else:
        raise ValueError(f"{path}: choose a .pth or .safetensors file name")
