"""The matrix product behind every projection: ``linear(x, W)`` = x @ W^T with W laid out [out, in].

On CPU, torch's plain matmul goes to MKL, which on these AMD EPYC machines runs fp32 products at 70-150
GFLOPS for the shapes that matter (the 65536-row head, the M=1 and M=64 decode projections), while oneDNN,
which torch also ships, reaches 170-200 GFLOPS for the same products and reads a weight matrix about twice as
fast in single-token decode (`goose bench linear`). torch exposes oneDNN's dense linear as the op
``mkldnn::_linear_pointwise`` (the one its own CPU compiler emits), which takes ordinary tensors, so the model
uses it for fp32 on CPU when it is there and gives the same numbers as ``F.linear`` (checked on a probe at
load). For bf16, torch's own matmul already runs on oneDNN and was faster than this op here (B=64 decode step
90 vs 102 ms), so "auto" keeps ``F.linear``; so does everything else (CUDA, a torch without oneDNN, or
``GOOSE_LINEAR=aten``).
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F

LinearFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BACKENDS = ("auto", "onednn", "aten")


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def _onednn_works(dtype: torch.dtype) -> bool:
    """True when oneDNN's linear exists in this torch build and agrees with F.linear on a probe."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        op = torch.ops.mkldnn._linear_pointwise  # noqa: F841 (raises when the op is not compiled in)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(3, 5, 96, generator=g).to(dtype)
        w = torch.randn(80, 96, generator=g).to(dtype)
        with torch.inference_mode():
            got, want = _onednn_linear(x, w).float(), F.linear(x, w).float()
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    return got.shape == want.shape and bool(((got - want).abs().max() <= tol * want.abs().max()).item())


def select_linear(device: torch.device, dtype: torch.dtype, backend: str | None = None) -> tuple[str, LinearFn]:
    """Pick the product for a model on ``device`` in ``dtype``; returns (name, fn).

    ``backend``: "auto" (the default; from GOOSE_LINEAR when set), "onednn" (fail unless it works here) or
    "aten" (F.linear).
    """
    backend = backend or os.environ.get("GOOSE_LINEAR", "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"unknown linear backend {backend!r} (GOOSE_LINEAR); choose one of: {', '.join(BACKENDS)}")
    if backend == "aten":
        return "aten", F.linear
    if backend == "auto" and dtype != torch.float32:
        return "aten", F.linear
    usable = torch.device(device).type == "cpu" and _onednn_works(dtype)
    if backend == "onednn" and not usable:
        raise ValueError(f"the oneDNN linear is not usable for {dtype} on {device} with this torch build")
    return ("onednn", _onednn_linear) if usable else ("aten", F.linear)
