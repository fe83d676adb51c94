"""The WKV-7 recurrence: one documented signature, several implementations behind a registry.

Every backend computes, per batch row b and head h, with state S in R^{N x N} (rows = value index i,
columns = key index j, the BlinkDL layout):

    sa_i    = sum_j S[i, j] * a_j                        (from the old S)
    S[i, j] = S[i, j] * exp(w_j) + v_i * k_j + sa_i * b_j
    y_i     = sum_j S[i, j] * r_j                        (from the new S)

i.e. ``S_t = S_{t-1} (diag(exp(w_t)) + a_t b_t^T) + v_t k_t^T`` and ``y_t = S_t r_t``.

Signature shared by all backends::

    y, new_state = fn(r, w, k, v, a, b, state)

    r, w, k, v, a, b : [B, T, H, N]   floating point; ``w`` is the natural-log decay (<= 0), not the decay
    state            : [B, H, N, N]   fp32 (or fp64), the state before the first token; never modified
    y                : [B, T, H, N]   same dtype as the state
    new_state        : [B, H, N, N]   the state after the last token

RWKV-7 calls this with ``a = -kk`` and ``b = kk * alpha``. Inputs are promoted to the state's dtype, so the
recurrence always runs in fp32 (or fp64 for tests) whatever the matmul dtype of the model.

Backends:
    reference  token by token, readable; the ground truth
    chunked    the WY/UT chunked form: O(T/L) sequential steps of batched matmuls, differentiable
    step       the single-token update used by decode (T must be 1)
    step_      the same, updating the state in place and returning only y (the torch "_" convention)
    native     token by token in native code (kernels/native.py: fp32 CPU states, built with the system C++
               compiler on first use); on CPU the model runs its fused form, the whole time mix in one pass
    native_step_  step_ in native code
    triton     token by token in one Triton kernel per (sequence, head, row tile), fp32 state
               (kernels/wkv7_triton.py, which also has the packed variable-length form); needs CUDA, or
               TRITON_INTERPRET=1 before it is imported to run on CPU tensors
    triton_step_  step_ in Triton
"""
from __future__ import annotations

import importlib
from typing import Callable, Protocol

import torch

__all__ = ["Wkv7Fn", "get_wkv7", "available_backends", "check_inputs"]


class Wkv7Fn(Protocol):
    def __call__(self, r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 a: torch.Tensor, b: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ...


# name -> (module, function); imported lazily so an optional accelerator costs nothing unless chosen.
_REGISTRY: dict[str, tuple[str, str]] = {
    "reference": ("kernels.wkv7_reference", "wkv7_reference"),
    "chunked": ("kernels.wkv7_chunked", "wkv7_chunked"),
    "step": ("kernels.wkv7_reference", "wkv7_step"),
    "step_": ("kernels.wkv7_reference", "wkv7_step_"),   # in place, for decode
    "native": ("kernels.native", "wkv7_native"),
    "native_step_": ("kernels.native", "wkv7_step_"),
    "triton": ("kernels.wkv7_triton", "wkv7_triton"),
    "triton_step_": ("kernels.wkv7_triton", "wkv7_triton_step_"),
}


def available_backends() -> list[str]:
    return sorted(_REGISTRY)


def get_wkv7(name: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """Return the backend called ``name``; an unknown or unloadable backend raises ValueError now."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown WKV-7 backend {name!r}; available: {', '.join(available_backends())}")
    module_name, fn_name = _REGISTRY[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"WKV-7 backend {name!r} cannot be loaded: {exc}") from exc
    ensure = getattr(module, "ensure_loadable", None)      # a backend that must be built first says why not
    if ensure is not None:
        try:
            ensure()
        except RuntimeError as exc:
            raise ValueError(f"WKV-7 backend {name!r} cannot be loaded: {exc}") from exc
    return getattr(module, fn_name)


def check_inputs(r, w, k, v, a, b, state) -> tuple[int, int, int, int]:
    """Validate shapes and dtypes against the shared signature; return (B, T, H, N)."""
    if r.dim() != 4:
        raise ValueError(f"r must be [B, T, H, N], got shape {tuple(r.shape)}")
    shape = r.shape
    for name, t in (("w", w), ("k", k), ("v", v), ("a", a), ("b", b)):
        if t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} like r")
    B, T, H, N = shape
    if state.shape != (B, H, N, N):
        raise ValueError(f"state has shape {tuple(state.shape)}, expected {(B, H, N, N)}")
    if state.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"state must be float32 or float64, got {state.dtype}")
    return B, T, H, N
