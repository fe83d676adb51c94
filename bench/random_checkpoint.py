"""Random RWKV-7 x070 checkpoints with the official BlinkDL key names and shapes (tests and benchmarks)."""
from __future__ import annotations

import math
from collections.abc import Callable
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


SHAPE_2B9 = CheckpointShape(n_layer=32, n_embd=2560, head_size=64, vocab_size=65536,
                            decay_lora=96, iclr_lora=96, value_lora=64, gate_lora=320)


def random_tensors(shape: CheckpointShape, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> list[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]]:
    """The plan of a random checkpoint: (key, shape, draw) in the official BlinkDL order, where draw() makes the
    tensor. The draws share one generator, so they must be called in list order (random_state_dict, or
    write_checkpoint's streaming writer, which needs every shape before the first tensor exists).

    device: where the numbers are drawn ("cuda" makes a 7B-shaped model in seconds; the values differ
    from the CPU draw for the same seed)."""
    g = torch.Generator(device=device).manual_seed(seed)
    C, V, F, N = shape.n_embd, shape.vocab_size, shape.ffn, shape.head_size
    if C % N:
        raise ValueError(f"n_embd {C} is not a multiple of head_size {N}")
    H = C // N
    plan = []

    def randn(key, *size, std=1.0):
        plan.append((key, size, lambda: (torch.randn(*size, generator=g, device=device) * std).to(dtype)))

    def unif(key, *size, lo=0.0, hi=1.0):
        plan.append((key, size, lambda: (torch.rand(*size, generator=g, device=device) * (hi - lo) + lo).to(dtype)))

    def ln(prefix):
        plan.append((f"{prefix}.weight", (C,),
                     lambda: (1.0 + torch.randn(C, generator=g, device=device) * 0.1).to(dtype)))
        randn(f"{prefix}.bias", C, std=0.1)

    randn("emb.weight", V, C, std=1.0)
    ln("blocks.0.ln0")
    for i in range(shape.n_layer):
        p = f"blocks.{i}."
        ln(p + "ln1")
        ln(p + "ln2")
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            unif(p + "att." + name, 1, 1, C)
        unif(p + "att.w0", 1, 1, C, lo=-6.0, hi=2.0)       # spread of time constants
        randn(p + "att.w1", C, shape.decay_lora, std=0.1)
        randn(p + "att.w2", shape.decay_lora, C, std=0.1)
        randn(p + "att.a0", 1, 1, C, std=0.5)
        randn(p + "att.a1", C, shape.iclr_lora, std=0.1)
        randn(p + "att.a2", shape.iclr_lora, C, std=0.1)
        if i > 0 or shape.layer0_value_lora:
            randn(p + "att.v0", 1, 1, C, std=0.5)
            randn(p + "att.v1", C, shape.value_lora, std=0.1)
            randn(p + "att.v2", shape.value_lora, C, std=0.1)
        randn(p + "att.g1", C, shape.gate_lora, std=0.1)
        randn(p + "att.g2", shape.gate_lora, C, std=0.1)
        unif(p + "att.k_k", 1, 1, C, lo=0.5, hi=1.5)
        unif(p + "att.k_a", 1, 1, C, lo=0.5, hi=1.5)
        randn(p + "att.r_k", H, N, std=0.5)
        for name in ("receptance", "key", "value", "output"):
            randn(p + f"att.{name}.weight", C, C, std=1 / math.sqrt(C))
        ln(p + "att.ln_x")
        unif(p + "ffn.x_k", 1, 1, C)
        randn(p + "ffn.key.weight", F, C, std=1 / math.sqrt(C))
        randn(p + "ffn.value.weight", C, F, std=1 / math.sqrt(F))
    ln("ln_out")
    randn("head.weight", V, C, std=shape.logit_scale / math.sqrt(C))
    return plan


def random_state_dict(shape: CheckpointShape, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A state dict laid out exactly like a BlinkDL .pth, with weights scaled so activations stay sane
    (device: see random_tensors)."""
    return {key: draw().contiguous() for key, _, draw in random_tensors(shape, seed=seed, dtype=dtype, device=device)}


def write_checkpoint(path, shape: CheckpointShape, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
    """Write a random checkpoint as .pth (torch.save) or .safetensors, chosen by the file suffix. A .safetensors
    file is streamed one tensor at a time (a 2.9B shape never exists whole in memory); a .pth is built whole."""
    path = str(path)
    if path.endswith(".safetensors"):
        from engine.formats.convert import write_safetensors
        plan = random_tensors(shape, seed=seed, dtype=dtype)
        draws = iter(plan)

        def produce(key: str) -> torch.Tensor:          # write_safetensors asks in plan order
            name, _, draw = next(draws)
            assert name == key, (name, key)
            return draw()
        write_safetensors(path, [(key, size, dtype) for key, size, _ in plan], produce)
    elif path.endswith(".pth"):
        torch.save(random_state_dict(shape, seed=seed, dtype=dtype), path)
    else:
        raise ValueError(f"{path}: choose a .pth or .safetensors file name")
