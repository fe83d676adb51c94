"""The native work of an RWKV-7 layer between its big matrix products (kernels/csrc/decode_cpu.cpp), as torch ops.

Why: a single-token step of the 0.1B model cost ~27 ms on two cores, of which the projections and the head took
~10: the rest was ~40 small torch calls per layer (norms, shifts, eight LoRA products and their activations,
casts, residual adds), each a dispatch and a thread fork/join over a few thousand values. With these two calls a
layer is: ``residual_ln_mix``, the r/k/v products, ``LoraTimeMix``, the output product, ``residual_ln_mix``, the
FFN's two products (engine/model/rwkv7.py).

Calls check shapes and dtypes cheaply (they run ~25 times a token) and pass raw pointers; every tensor is read
in place, so rows must be contiguous (the caller falls back to torch ops otherwise).
"""
from __future__ import annotations

import torch

from kernels.native_build import load, load_for_head_size

__all__ = ["residual_ln_mix", "LoraTimeMix", "gemv", "GEMV_ROWS"]

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


GEMV_ROWS = 4     # measured (one core, weights from memory): bf16 1.2-1.3x torch's F.linear at 1 row, ~3x at 4;
#                   fp32 within 10% of oneDNN's packed product, 1.1-2.3x F.linear (hence only for plain weights)


def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ w.T for at most GEMV_ROWS rows of x, w [N, K] plain and contiguous; x and w each float32 or
    bfloat16; the result [..., N] in x's dtype (float32 sums)."""
    K = x.shape[-1]
    M = x.numel() // K if K else 0
    if M > GEMV_ROWS or w.dim() != 2 or w.shape[1] != K:
        raise ValueError(f"gemv takes at most {GEMV_ROWS} rows against a [N, {K}] weight, got x "
                         f"{tuple(x.shape)} and w {tuple(w.shape)}")
    x_flag, w_flag = _flag("x", x), _flag("w", w)
    y = torch.empty((*x.shape[:-1], w.shape[0]), dtype=x.dtype)
    if y.numel():
        load().gemv(M, w.shape[0], K, x.data_ptr(), x_flag, w.data_ptr(), w_flag, y.data_ptr(), x_flag)
    return y


def _flag(name: str, t: torch.Tensor) -> int:
    flag = _DTYPES.get(t.dtype)
    if flag is None or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"{name} must be a contiguous float32 or bfloat16 CPU tensor, got {t.dtype} on {t.device}"
                         f"{'' if t.is_contiguous() else ' (strided)'}")
    return flag


def residual_ln_mix(x: torch.Tensor, dx: torch.Tensor | None, ln: tuple[torch.Tensor, torch.Tensor], eps: float,
                    prev: torch.Tensor, mix: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """In place ``x += dx`` (x [B, T, C] float32; dx the same shape, float32 or bfloat16, or None), then
    h = layer_norm(x; ln weight, bias, eps) and the token-shift mixes out[m] = h + (h_shifted - h) * mix[m]
    with h_shifted's first row from ``prev`` [B, C] float32; ``prev`` then holds the last token's h. mix [M, C]
    float32. Returns out [M, B, T, C] in ``dtype`` (float32, or bfloat16 rounded to nearest even)."""
    if x.dim() != 3 or x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous float32 [B, T, C] tensor, got {tuple(x.shape)} {x.dtype}")
    B, T, C = x.shape
    if tuple(prev.shape) != (B, C) or prev.dtype != torch.float32 or not prev.is_contiguous():
        raise ValueError(f"prev must be a contiguous float32 [{B}, {C}] tensor, got {tuple(prev.shape)} {prev.dtype}")
    if mix.dim() != 2 or mix.shape[1] != C or mix.dtype != torch.float32 or not mix.is_contiguous():
        raise ValueError(f"mix must be a contiguous float32 [M, {C}] tensor, got {tuple(mix.shape)} {mix.dtype}")
    dx_flag = 0
    if dx is not None:
        if dx.shape != x.shape:
            raise ValueError(f"dx has shape {tuple(dx.shape)}, expected {tuple(x.shape)}")
        dx_flag = _flag("dx", dx)
    if dtype not in _DTYPES:
        raise ValueError(f"the mixes are written as float32 or bfloat16, not {dtype}")
    out = torch.empty((mix.shape[0], B, T, C), dtype=dtype)
    if x.numel():
        load().residual_ln_mix(B, T, C, mix.shape[0], x.data_ptr(), None if dx is None else dx.data_ptr(), dx_flag,
                               ln[0].data_ptr(), ln[1].data_ptr(), float(eps), prev.data_ptr(), mix.data_ptr(),
                               _DTYPES[dtype], out.data_ptr())
    return out


class LoraTimeMix:
    """One layer's LoRA chains and time mix for one token per sequence as a native call: from the mixed inputs
    and the r/k/v products to the output product's input.

    Factors (plain row-major [out, in], all float32 or all bfloat16): w1 [Dw, C], w2 [C, Dw], a1, a2, g1, g2, and
    v1, v2 (None at the first layer). ``vectors``: the float32 [C] vectors w0, a0, v0 (None at layer 0), k_k,
    k_a, r_k ([H, N]), ln_w, ln_b. Raises NativeUnavailable without the library."""

    def __init__(self, n_head: int, head_size: int, factors: dict[str, torch.Tensor | None],
                 vectors: dict[str, torch.Tensor | None], *, eps: float, log_decay_scale: float):
        self._lib = load_for_head_size(head_size)
        self.H, self.N = n_head, head_size
        C = n_head * head_size
        dtypes = {t.dtype for t in factors.values() if t is not None}
        if len(dtypes) != 1 or not dtypes <= set(_DTYPES):
            raise ValueError(f"the LoRA factors must all be float32 or all bfloat16, got {sorted(map(str, dtypes))}")
        self._factor_flag = _DTYPES[dtypes.pop()]
        self.has_value_residual = factors.get("v1") is not None
        keep, args = [], []
        for first, second in (("w1", "w2"), ("a1", "a2"), ("g1", "g2"), ("v1", "v2")):
            f1, f2 = factors.get(first), factors.get(second)
            if f1 is None or f2 is None:
                if first != "v1" or (f1 is None) != (f2 is None):
                    raise ValueError(f"LoRA factors {first}/{second} are missing")
                args += [None, None, 0]
                continue
            D = f1.shape[0]
            if tuple(f1.shape) != (D, C) or tuple(f2.shape) != (C, D):
                raise ValueError(f"LoRA factors {first} {tuple(f1.shape)} / {second} {tuple(f2.shape)} are not "
                                 f"[D, {C}] / [{C}, D]")
            f1, f2 = f1.contiguous(), f2.contiguous()
            keep += [f1, f2]
            args += [f1.data_ptr(), f2.data_ptr(), D]
        vecs = []
        for name in ("w0", "a0", "v0", "k_k", "k_a", "r_k", "ln_w", "ln_b"):
            t = vectors.get(name)
            if t is None:
                if name != "v0" or self.has_value_residual:
                    raise ValueError(f"vector {name} is missing")
                vecs.append(None)
                continue
            t = t.reshape(-1).to(torch.float32).contiguous()
            if t.numel() != C:
                raise ValueError(f"vector {name} has {t.numel()} values, expected {C}")
            keep.append(t)
            vecs.append(t.data_ptr())
        self._keep = keep                        # the pointers below stay valid as long as this object lives
        self._factor_args, self._vector_args = args, vecs
        self._eps, self._scale = float(eps), float(log_decay_scale)

    def __call__(self, mixed: torch.Tensor, r: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 v_first: torch.Tensor | None, state: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """mixed [6, B, 1, C] (the r, k, v, w, a, g mixes; only w, a, g and v are read here), r/k/v/v_first
        [B, 1, C], all in one dtype (float32 or bfloat16; v_first None exactly at the first layer); state
        [B, H, N, N] float32 contiguous, advanced in place. Returns [B, 1, C] in out_dtype."""
        H, N = self.H, self.N
        C = H * N
        B = r.shape[0]
        flag = _flag("r", r)
        for name, t in (("mixed", mixed), ("k", k), ("v", v), ("v_first", v_first)):
            if t is not None and (t.dtype != r.dtype or not t.is_contiguous()):
                raise ValueError(f"{name} must be contiguous and {r.dtype} like r, got {t.dtype}")
        if mixed.shape != (6, B, 1, C) or r.shape != (B, 1, C):
            raise ValueError(f"mixed {tuple(mixed.shape)} / r {tuple(r.shape)} are not [6, {B}, 1, {C}] / "
                             f"[{B}, 1, {C}]")
        if (v_first is not None) != self.has_value_residual:
            raise ValueError("v_first is given exactly when the layer has a value residual")
        if (state.shape != (B, H, N, N) or state.dtype != torch.float32 or not state.is_contiguous()):
            raise ValueError(f"state must be a contiguous float32 [{B}, {H}, {N}, {N}] tensor, got "
                             f"{tuple(state.shape)} {state.dtype}")
        if out_dtype not in _DTYPES:
            raise ValueError(f"out must be float32 or bfloat16, not {out_dtype}")
        out = torch.empty((B, 1, C), dtype=out_dtype)
        if B:
            _, _, _, xw, xa, xg = mixed.unbind(0)
            self._lib.lora_time_mix(B, H, N, flag, xw.data_ptr(), xa.data_ptr(), xg.data_ptr(), mixed[2].data_ptr(),
                                    r.data_ptr(), k.data_ptr(), v.data_ptr(),
                                    None if v_first is None else v_first.data_ptr(), self._factor_flag,
                                    *self._factor_args, *self._vector_args, self._eps, self._scale,
                                    state.data_ptr(), _DTYPES[out_dtype], out.data_ptr())
        return out
