"""RWKV-7's time mix in one Triton kernel: everything between the projections and the output projection.

For each (sequence, head) one program keeps the head's whole [N, N] fp32 state in registers, walks the
sequence's tokens and, per token, does in fp32:

    log_w = log_decay_scale * sigmoid(w0 + w_lora)            decay (natural log, in [-0.607, 0))
    alpha = sigmoid(a0 + a_lora)                              in-context learning rate
    kk    = normalize(k * k_k)                                per head, L2, eps 1e-12
    k'    = k * (1 + (alpha - 1) * k_a)
    v'    = v + (v_first - v) * sigmoid(v0 + v_lora)          value residual (layers > 0)
    S     = S (diag(e^log_w) + (-kk)(kk * alpha)^T) + v' k'^T,  y = S r
    out   = (group_norm(y; ln_x, eps) + (sum r k' r_k) v') * g

the same math as RWKV7._time_mix_core in engine/model/rwkv7.py and the native CPU time mix
(kernels/csrc/rwkv7_cpu.cpp). The state is read once and written once (in place, any strides: a view into the
state pool is fine); the inputs are read in their own dtype (fp32, bf16 or fp16) and widened in registers, so
the projections need no float copies; the output is written in ``out_dtype`` (the matmul dtype of the output
projection). One launch per layer replaces the dozen elementwise kernels and the WKV step of the torch path.

The token loop makes this the decode kernel (T = 1) and a fine one for short prompts; long prompts are better
served by the chunked WKV (kernels/wkv7_triton.py) between torch elementwise ops, which the model keeps for
T >= 16. Under TRITON_INTERPRET=1 (set before triton is imported) it runs on CPU tensors, as the tests do.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["TimeMixParams", "time_mix_triton", "interpreting"]


@dataclass(frozen=True)
class TimeMixParams:
    """One layer's fp32 vectors of the time mix, each [H * N] (r_k [H, N] is fine: it is read flat)."""
    w0: torch.Tensor
    a0: torch.Tensor
    v0: torch.Tensor | None          # None at layer 0 (no value residual)
    k_k: torch.Tensor
    k_a: torch.Tensor
    r_k: torch.Tensor
    ln_w: torch.Tensor
    ln_b: torch.Tensor
    eps: float                       # the group norm's (64e-5 in released models)
    log_decay_scale: float           # -exp(-0.5)

    def __post_init__(self):
        for name in ("w0", "a0", "v0", "k_k", "k_a", "r_k", "ln_w", "ln_b"):
            t = getattr(self, name)
            if t is not None and (t.dtype != torch.float32 or not t.is_contiguous()):
                raise ValueError(f"time-mix parameter {name} must be contiguous fp32, got {t.dtype}")


def interpreting() -> bool:
    """Whether the kernel was built for the Triton interpreter (CPU tensors) rather than compiled for a GPU."""
    return type(_time_mix_kernel).__name__ == "InterpretedFunction"


@triton.jit
def _time_mix_kernel(r_ptr, wl_ptr, k_ptr, v_ptr, al_ptr, vl_ptr, vf_ptr, g_ptr,    # [B * T, A], rows of A
                     w0_ptr, a0_ptr, v0_ptr, kk_ptr, ka_ptr, rk_ptr, lnw_ptr, lnb_ptr,  # [A] fp32
                     s_ptr, s_sb, s_sh, s_si, s_sj,                                 # state [B, H, N, N]
                     out_ptr, T, eps, log_decay_scale,
                     H: tl.constexpr, N: tl.constexpr, HAS_V: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    A = H * N
    offs_i = tl.arange(0, N)                         # value index: the state's rows, y, v, g
    offs_j = tl.arange(0, N)                         # key index: the state's columns, r, k, w, a
    col_j = h * N + offs_j
    col_i = h * N + offs_i
    w0 = tl.load(w0_ptr + col_j)
    a0 = tl.load(a0_ptr + col_j)
    k_k = tl.load(kk_ptr + col_j)
    k_a = tl.load(ka_ptr + col_j)
    r_k = tl.load(rk_ptr + col_j)
    ln_w = tl.load(lnw_ptr + col_i)
    ln_b = tl.load(lnb_ptr + col_i)
    s_base = s_ptr + b.to(tl.int64) * s_sb + h * s_sh
    s_at = s_base + offs_i[:, None] * s_si + offs_j[None, :] * s_sj
    S = tl.load(s_at)                                                         # [N, N] fp32
    for t in range(T):
        row = (b.to(tl.int64) * T + t) * A
        r = tl.load(r_ptr + row + col_j).to(tl.float32)
        k = tl.load(k_ptr + row + col_j).to(tl.float32)
        w_lora = tl.load(wl_ptr + row + col_j).to(tl.float32)
        a_lora = tl.load(al_ptr + row + col_j).to(tl.float32)
        v = tl.load(v_ptr + row + col_i).to(tl.float32)
        g = tl.load(g_ptr + row + col_i).to(tl.float32)
        if HAS_V:
            v0 = tl.load(v0_ptr + col_i)
            v_lora = tl.load(vl_ptr + row + col_i).to(tl.float32)
            v_first = tl.load(vf_ptr + row + col_i).to(tl.float32)
            v = v + (v_first - v) * tl.sigmoid(v0 + v_lora)
        log_w = log_decay_scale * tl.sigmoid(w0 + w_lora)
        alpha = tl.sigmoid(a0 + a_lora)
        kk = k * k_k
        kk = kk / tl.maximum(tl.sqrt(tl.sum(kk * kk, axis=0)), 1e-12)
        k = k * (1.0 + (alpha - 1.0) * k_a)
        sa = tl.sum(S * (-kk)[None, :], axis=1)                               # (S a)_i from the old state
        S = S * tl.exp(log_w)[None, :] + v[:, None] * k[None, :] + sa[:, None] * (kk * alpha)[None, :]
        y = tl.sum(S * r[None, :], axis=1)                                    # (S r)_i from the new state
        mean = tl.sum(y, axis=0) / N
        d = y - mean
        var = tl.sum(d * d, axis=0) / N
        y = d / tl.sqrt(var + eps) * ln_w + ln_b
        bonus = tl.sum(r * k * r_k, axis=0)
        out = (y + bonus * v) * g
        tl.store(out_ptr + row + col_i, out.to(out_ptr.dtype.element_ty))
    tl.store(s_at, S)


def time_mix_triton(r, w_lora, k, v, a_lora, v_lora, v_first, g, state: torch.Tensor, p: TimeMixParams,
                    *, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The time mix of one layer for [B, T, A] projections (any float dtype; v_lora and v_first None at layer 0),
    advancing ``state`` [B, H, N, N] fp32 in place; returns out [B, T, A] in ``out_dtype``."""
    if r.dim() != 3:
        raise ValueError(f"r must be [B, T, A], got shape {tuple(r.shape)}")
    B, T, A = r.shape
    if state.dim() != 4 or state.shape[0] != B or state.shape[2] != state.shape[3]:
        raise ValueError(f"state must be [B={B}, H, N, N], got {tuple(state.shape)}")
    H, N = state.shape[1], state.shape[2]
    if H * N != A or N & (N - 1):
        raise ValueError(f"state heads {H} x {N} do not fit width {A} (head size must be a power of two)")
    if state.dtype != torch.float32:
        raise ValueError(f"the time mix keeps an fp32 state, got {state.dtype}")
    has_v = p.v0 is not None
    if has_v != (v_lora is not None) or has_v != (v_first is not None):
        raise ValueError("v_lora, v_first and v0 come together (layers > 0) or not at all (layer 0)")
    ins = [r, w_lora, k, v, a_lora, v_lora if has_v else r, v_first if has_v else r, g]
    for name, t in zip(("r", "w_lora", "k", "v", "a_lora", "v_lora", "v_first", "g"), ins):
        if t.shape != r.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(r.shape)} like r")
    ins = [t.contiguous() for t in ins]
    out = torch.empty((B, T, A), dtype=out_dtype, device=r.device)
    if B and T:
        _time_mix_kernel[(B * H,)](
            *ins, p.w0, p.a0, p.v0 if has_v else p.w0, p.k_k, p.k_a, p.r_k, p.ln_w, p.ln_b,
            state, *state.stride(), out, T, p.eps, p.log_decay_scale, H=H, N=N, HAS_V=has_v)
    return out
