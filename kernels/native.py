"""Native CPU kernels for RWKV-7's time mix (kernels/csrc/rwkv7_cpu.cpp) as torch ops: the registry's native
backends, the fused time mix, the sampler and the token mask (the rest of a layer: kernels/native_decode.py); kernels/native_build.py builds and loads the library.

Why: a B=64 decode step spent ~13 ms of ~125 in the WKV-7 step (the state read and written several times per
token) and ~10 ms more in the time mix's small elementwise ops; a 1024-token prompt spent ~470 ms in the
chunked WKV form (~39 ms a layer) against ~9 ms a layer for the plain recurrence with each head's state held
in L1. The fused kernel does the recurrence and the per-head work in one pass for decode and prompts alike
(``load_model(..., native_kernels=False)`` and ``GOOSE_NATIVE_KERNELS=0`` give the torch ops to compare).
"""
from __future__ import annotations

import torch

from kernels import check_inputs
from kernels.native_build import (
    SOURCE,
    NativeUnavailable,
    available,
    build_dir,
    ensure_loadable,
    load,
    load_for_head_size,
    mode,
    status,
)

__all__ = ["NativeUnavailable", "load", "mode", "ensure_loadable", "available", "status", "wkv7_step_", "wkv7_native", "TimeMix", "sample_rows", "apply_token_mask", "build_dir",
           "SOURCE"]

_MIX_DTYPES = {torch.float32: 0, torch.bfloat16: 1}    # the dtypes rows come and go in (flag values for C)


def _rows(name: str, t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if t.device.type != "cpu" or t.dtype != dtype:
        raise ValueError(f"{name} must be a {str(dtype).replace('torch.', '')} CPU tensor, got {t.dtype} on "
                         f"{t.device}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t.contiguous()


def _f32_rows(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return _rows(name, t, shape, torch.float32)


def _checked(r, w, k, v, a, b, state, what: str):
    """(library, (B, T, H, N), the six inputs as contiguous float32) for the registry's native backends."""
    B, T, H, N = check_inputs(r, w, k, v, a, b, state)
    for name, t in (("r", r), ("w", w), ("k", k), ("v", v), ("a", a), ("b", b)):
        if t.device.type != "cpu":
            raise ValueError(f"the native {what} runs on CPU, but {name} is on {t.device}")
    if state.dtype != torch.float32 or state.device.type != "cpu":
        raise ValueError(f"the native {what} runs float32 CPU states, got {state.dtype} on {state.device}")
    lib = load()
    if N > lib.max_head_size:
        raise ValueError(f"head size {N} is above the native kernel's limit {lib.max_head_size}")
    return lib, (B, T, H, N), [t.to(torch.float32).contiguous() for t in (r, w, k, v, a, b)]


def wkv7_step_(r, w, k, v, a, b, state):
    """The registry's ``native_step_``: like ``step_`` (one token, state updated in place, returns y
    [B, 1, H, N]) for fp32 states on CPU; a strided state is updated through a contiguous copy."""
    if r.dim() == 4 and r.shape[1] != 1:
        raise ValueError(f"the single-token step advances exactly one token, got T={r.shape[1]}; "
                         "use the native backend")
    lib, (B, T, H, N), inputs = _checked(r, w, k, v, a, b, state, "step")
    S = state if state.is_contiguous() else state.contiguous()
    y = torch.empty((B, 1, H, N), dtype=torch.float32)
    if B * H:
        lib.wkv7_seq(B, 1, H, N, *(t.data_ptr() for t in inputs), S.data_ptr(), y.data_ptr())
    if S is not state:
        state.copy_(S)
    return y


def wkv7_native(r, w, k, v, a, b, state):
    """The registry's ``native`` sequence backend: the recurrence token by token in native code, for float32
    CPU states; returns (y [B, T, H, N], new state) and leaves ``state`` as it was."""
    lib, (B, T, H, N), inputs = _checked(r, w, k, v, a, b, state, "backend")
    new_state = state.contiguous().clone()
    y = torch.empty((B, T, H, N), dtype=torch.float32)
    if B * H * T:
        lib.wkv7_seq(B, T, H, N, *(t.data_ptr() for t in inputs), new_state.data_ptr(), y.data_ptr())
    return y, new_state


class TimeMix:
    """One layer's time mix as a native call, for decode (T = 1) and prompts alike: from the projections to the
    output projection's input (formulas in kernels/csrc/rwkv7_cpu.cpp). The layer's vectors are checked and
    kept at construction, so a call only checks its rows.

    Vectors (float32, H * N values each): w0, a0, v0 (None at the first layer, which has no value residual),
    k_k, k_a, r_k, ln_w, ln_b. Raises NativeUnavailable when the library cannot be loaded."""

    def __init__(self, n_head: int, head_size: int, *, w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b, eps: float,
                 log_decay_scale: float):
        self._lib = load_for_head_size(head_size)
        self.H, self.N = n_head, head_size
        C = n_head * head_size
        self._vecs = [_f32_rows(name, t.reshape(-1), (C,)) if t is not None else None for name, t in (
            ("w0", w0), ("a0", a0), ("v0", v0), ("k_k", k_k), ("k_a", k_a), ("r_k", r_k), ("ln_w", ln_w),
            ("ln_b", ln_b))]
        self.has_value_residual = v0 is not None
        self._vec_ptrs = [None if t is None else t.data_ptr() for t in self._vecs]
        self._eps, self._scale = float(eps), float(log_decay_scale)

    def __call__(self, r, w_lora, k, v, a_lora, v_lora, v_first, g, state: torch.Tensor,
                 out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows [B, T, C], all float32 or all bfloat16 (``v_lora`` and ``v_first`` None exactly when the layer
        has no value residual); ``state`` [B, H, N, N] float32, contiguous, advanced in place through the T
        tokens. Returns [B, T, C] in ``out_dtype`` (float32 or bfloat16); the math is float32 throughout."""
        H, N = self.H, self.N
        C = H * N
        if r.dim() != 3 or r.shape[-1] != C:
            raise ValueError(f"r must be [B, T, {C}], got {tuple(r.shape)}")
        B, T, _ = r.shape
        if (state.shape != (B, H, N, N) or state.dtype != torch.float32 or state.device.type != "cpu"
                or not state.is_contiguous()):
            raise ValueError(f"state must be a contiguous float32 CPU tensor [{B}, {H}, {N}, {N}], got "
                             f"{tuple(state.shape)} {state.dtype} on {state.device}"
                             f"{'' if state.is_contiguous() else ' (strided)'}")
        if (v_lora is None) != (v_first is None) or (v_lora is not None) != self.has_value_residual:
            raise ValueError("v_lora and v_first are given exactly when the layer has a value residual (v0)")
        rows_dtype = r.dtype
        if rows_dtype not in _MIX_DTYPES or out_dtype not in _MIX_DTYPES:
            raise ValueError(f"rows and out must be float32 or bfloat16, got {rows_dtype} and {out_dtype}")
        rows = [None if t is None else _rows(name, t, (B, T, C), rows_dtype) for name, t in (
            ("r", r), ("w_lora", w_lora), ("k", k), ("v", v), ("a_lora", a_lora), ("v_lora", v_lora),
            ("v_first", v_first), ("g", g))]
        out = torch.empty((B, T, C), dtype=out_dtype)
        if B and T:
            self._lib.time_mix(B, T, H, N, _MIX_DTYPES[rows_dtype], _MIX_DTYPES[out_dtype],
                               *(None if t is None else t.data_ptr() for t in rows), *self._vec_ptrs,
                               self._eps, self._scale, state.data_ptr(), out.data_ptr())
        return out



def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of ``logits`` [R, V] float32 (rows contiguous) from softmax(logits / temperature)
    by inverse CDF with u [R] in [0, 1); -inf logits are never drawn. Returns int64 [R]; -1 marks a row with no
    finite logit (or a NaN), -2 one the kernel had no memory for. Raises NativeUnavailable when the library
    cannot be loaded."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.device.type != "cpu" or logits.stride(1) != 1:
        raise ValueError(f"logits must be float32 CPU rows [R, V] with contiguous rows, got {tuple(logits.shape)} "
                         f"{logits.dtype} on {logits.device}")
    R, V = logits.shape
    inv_t = _f32_rows("temperature", 1.0 / temperature.to(torch.float32), (R,))
    u = _f32_rows("u", u.to(torch.float32), (R,))
    out = torch.empty(R, dtype=torch.int64)
    if R and V:
        load().sample_rows(R, V, logits.data_ptr(), logits.stride(0), inv_t.data_ptr(), u.data_ptr(),
                           out.data_ptr())
    return out


def apply_token_mask(logits: torch.Tensor, rows: torch.Tensor, bits: torch.Tensor) -> None:
    """In place: for each mask row m, the logits of row ``rows[m]`` whose bit in ``bits[m]`` is clear become -inf
    (bit k of word j is token 32 j + k; tokens past the mask's width too). ``logits`` float32 [B, V] with
    contiguous rows, ``rows`` int64 [M], ``bits`` int32 [M, W]. Raises NativeUnavailable without the library."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.device.type != "cpu" or logits.stride(1) != 1:
        raise ValueError(f"logits must be float32 CPU rows [B, V] with contiguous rows, got {tuple(logits.shape)} "
                         f"{logits.dtype} on {logits.device}")
    rows = rows.to(torch.int64).contiguous()
    bits = bits.to(torch.int32).contiguous()
    if bits.dim() != 2 or rows.shape != (bits.shape[0],) or (rows.numel() and not
                                                               (0 <= int(rows.min()) <= int(rows.max()) < logits.shape[0])):
        raise ValueError(f"rows {tuple(rows.shape)} and bits {tuple(bits.shape)} do not fit logits "
                         f"{tuple(logits.shape)}")
    if rows.numel() and logits.shape[1]:
        load().apply_token_mask(rows.numel(), logits.shape[1], logits.data_ptr(), logits.stride(0), rows.data_ptr(),
                                bits.data_ptr(), bits.shape[1])
