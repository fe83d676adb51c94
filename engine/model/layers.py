"""One RWKV-7 block's tensors as the model holds them (engine/model/rwkv7.py): named, laid out and typed once at
load."""
from __future__ import annotations

from dataclasses import dataclass

import torch

Lora = tuple[torch.Tensor, torch.Tensor]   # (plain [out, in] for F.linear, the same prepared for the backend)


@dataclass
class LayerWeights:
    """One block's tensors, prepared once: vectors fp32, matrices in the matmul dtype laid out [out, in] for
    ``linear(x, W)`` (the checkpoint's own layout for projections; the LoRA factors are transposed once).
    LoRA factors are (plain, prepared) pairs: see RWKV7._lora."""
    ln1: tuple[torch.Tensor, torch.Tensor]
    ln2: tuple[torch.Tensor, torch.Tensor]
    att_mix: torch.Tensor                 # [6, C] fp32: x_r, x_k, x_v, x_w, x_a, x_g
    w_r: torch.Tensor                     # [A, C] receptance
    w_k: torch.Tensor                     # [A, C] key
    w_v: torch.Tensor                     # [A, C] value
    w_out: torch.Tensor                   # [C, A]
    w0: torch.Tensor                      # [A] fp32
    w1: Lora                              # [Dw, C]
    w2: Lora                              # [A, Dw]
    a0: torch.Tensor
    a1: Lora
    a2: Lora
    v0: torch.Tensor | None               # value residual, None at layer 0
    v1: Lora | None
    v2: Lora | None
    g1: Lora
    g2: Lora
    k_k: torch.Tensor                     # [A] fp32
    k_a: torch.Tensor                     # [A] fp32
    r_k: torch.Tensor                     # [H, N] fp32
    ln_x: tuple[torch.Tensor, torch.Tensor]
    ffn_mix: torch.Tensor                 # [1, C] fp32
    ffn_key: torch.Tensor                 # [F, C]
    ffn_value: torch.Tensor               # [C, F]


def owned(t: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """t, copied if it still shares memory with the loaded checkpoint: the vectors are small, and once no
    model tensor refers to the memory-mapped file, the mapping (the whole file) is released after loading."""
    return t.clone() if t.untyped_storage().data_ptr() == source.untyped_storage().data_ptr() else t


def prepare_layer(i: int, f32, mat, lora) -> LayerWeights:
    """Block i from the checkpoint's keys through the model's preparers: f32 (vectors), mat (the big matrices,
    kept [out, in] as stored) and lora (factors stored [in, out], transposed once)."""
    p = f"blocks.{i}."
    vec = lambda key: f32(p + key).reshape(-1)  # noqa: E731
    att_mix = torch.stack([vec(f"att.x_{c}") for c in "rkvwag"])
    has_v = i > 0
    return LayerWeights(
        ln1=(vec("ln1.weight"), vec("ln1.bias")), ln2=(vec("ln2.weight"), vec("ln2.bias")),
        att_mix=att_mix,
        w_r=mat(p + "att.receptance.weight"), w_k=mat(p + "att.key.weight"), w_v=mat(p + "att.value.weight"),
        w_out=mat(p + "att.output.weight"),
        w0=vec("att.w0"), w1=lora(p + "att.w1"), w2=lora(p + "att.w2"),
        a0=vec("att.a0"), a1=lora(p + "att.a1"), a2=lora(p + "att.a2"),
        v0=vec("att.v0") if has_v else None, v1=lora(p + "att.v1") if has_v else None,
        v2=lora(p + "att.v2") if has_v else None,
        g1=lora(p + "att.g1"), g2=lora(p + "att.g2"),
        k_k=vec("att.k_k"), k_a=vec("att.k_a"), r_k=f32(p + "att.r_k"),
        ln_x=(vec("att.ln_x.weight"), vec("att.ln_x.bias")),
        ffn_mix=vec("ffn.x_k").view(1, -1), ffn_key=mat(p + "ffn.key.weight"), ffn_value=mat(p + "ffn.value.weight"),
    )
