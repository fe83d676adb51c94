"""The matrix product behind every projection: ``linear(x, W)`` = x @ W^T with W laid out [out, in].

On CPU, torch's plain matmul goes to MKL, which on these AMD EPYC machines runs fp32 products at 70-150
GFLOPS for the shapes that matter (the 65536-row head, the M=1 and M=64 decode projections), while oneDNN,
which torch also ships, reaches 170-200 GFLOPS for the same products and reads a weight matrix about twice as
fast in single-token decode; with the weights packed once into oneDNN's own layout it gains another ~10-20%
at M=64 (`goose bench linear`). torch exposes oneDNN's linear as the op ``mkldnn::_linear_pointwise`` (the
one its own CPU compiler emits) and the packing as ``mkldnn::_reorder_linear_weight``, so the model uses them
for fp32 on CPU when they are there and give the same numbers as ``F.linear`` (checked on a probe at load).
For bf16, torch's own matmul already runs on oneDNN and beat this op on plain weights (B=64 decode step 90
vs 102 ms), but packed bf16 weights beat both: single-token decode ~27-34 -> ~21 ms, B=64 ~90-108 -> ~80 ms.
So "auto" packs whenever packing works, uses the plain op for fp32 when only that works, and ``F.linear``
otherwise (CUDA, a torch without oneDNN, or ``GOOSE_LINEAR=aten``).
"""
from __future__ import annotations

import functools
import os
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

LinearFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BACKENDS = ("auto", "onednn", "aten", "widen", "plain")
SMALL_ROWS = 16


class Linear(NamedTuple):
    """The chosen product: ``fn(x, prepare(W))`` = x @ W^T; ``prepare`` runs once per weight at load.

    ``small_rows``: for small weights (the LoRA factors), F.linear on the plain weight beats ``fn`` up to this
    many rows of x; 0 when it never does. Measured for fp32 with packed oneDNN weights: a layer's eight LoRA
    products take 54 us through F.linear (MKL's GEMV) and 152 us through oneDNN at one row, about even at 32
    rows, and 6.0 vs 4.8 ms at 1024 rows (prefill); in bf16 oneDNN is never slower."""
    name: str
    fn: LinearFn
    prepare: Callable[[torch.Tensor], torch.Tensor]
    small_rows: int = 0
    plain: bool = False      # weights stay plain row-major tensors (native code may read them)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def onednn_pack(weight: torch.Tensor) -> torch.Tensor:
    """The weight in oneDNN's own blocked layout (an opaque MKLDNN tensor), so no call re-lays it out: the
    head's M=64 product took 32 ms instead of 42, the FFN's ~10-20% less, M=1 and M=1024 no worse."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)


def _same(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    return got.shape == want.shape and bool(((got - want).abs().max() <= tol * want.abs().max()).item())


@functools.cache
def probe_onednn(dtype: torch.dtype) -> tuple[bool, bool]:
    """(oneDNN's linear works, packed weights work) in this torch build, each checked against F.linear; a
    property of the build, so it runs once per dtype (load_model asks before loading, the model again)."""
    if not torch.backends.mkldnn.is_available():
        return False, False
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 96, generator=g).to(dtype)
    w = torch.randn(80, 96, generator=g).to(dtype)
    with torch.inference_mode():
        want = F.linear(x, w).float()
        try:
            dense = _same(onednn_linear(x, w).float(), want, dtype)
        except (AttributeError, RuntimeError, NotImplementedError):
            return False, False
        try:
            packed = dense and _same(onednn_linear(x, onednn_pack(w)).float(), want, dtype)
        except (AttributeError, RuntimeError, NotImplementedError):
            packed = False
    return dense, packed


def _unchanged(weight: torch.Tensor) -> torch.Tensor:
    return weight


def select_linear(device: torch.device, dtype: torch.dtype, backend: str | None = None) -> Linear:
    """Pick the product for a model on ``device`` in ``dtype``.

    ``backend``: "auto" (the default; from GOOSE_LINEAR when set), "onednn" (fail unless it works here), "aten"
    (F.linear), "widen" (fp32 products on widened weights; what "auto" picks for bf16 where oneDNN has no bf16) or
    "plain" (the weights stay row-major, so the native single-token step of kernels/native_step.py can read them;
    oneDNN's product on them, else F.linear). "plain" trades batched and prompt speed (oneDNN's packed layout is
    ~15-20% faster at 64 rows and more, measured on a Zen 5 EPYC) for single-stream decode (+5-10%).
    """
    backend = backend or os.environ.get("GOOSE_LINEAR", "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"unknown linear backend {backend!r} (GOOSE_LINEAR); choose one of: {', '.join(BACKENDS)}")
    aten = Linear("aten", F.linear, _unchanged, plain=True)
    if backend == "aten":
        return aten
    widen = Linear("widen", _widened_product(), _unchanged, plain=True)
    if backend == "widen":
        return widen
    cpu = torch.device(device).type == "cpu"
    dense, packed = probe_onednn(dtype) if cpu else (False, False)
    if backend == "plain":
        return Linear("plain", onednn_linear, _unchanged, plain=True) if dense else aten._replace(name="plain")
    if backend == "onednn" and not dense:
        raise ValueError(f"the oneDNN linear is not usable for {dtype} on {device} with this torch build")
    if packed:
        return Linear("onednn", onednn_linear, onednn_pack, SMALL_ROWS if dtype == torch.float32 else 0)
    if dense and (backend == "onednn" or dtype == torch.float32):
        return Linear("onednn", onednn_linear, _unchanged)
    return widen if cpu and dtype == torch.bfloat16 else aten


def _widened_product() -> LinearFn:
    """"widen": the weight widened to fp32 per call and the fp32 product, the result in x's dtype. For bf16 weights
    on a CPU where oneDNN has no bf16 path (no AVX-512 BF16 / AMX: its probe fails), torch's
    bf16 matmul is emulated and slow; widening the weight to fp32 per call and using the fp32 product was 7-10x
    faster for prompt-sized products (512 rows) and 1.9-4x at 64 rows on an AVX2 EPYC (the 65536-row head at 64 rows:
    363 -> 190 ms). Few-row decode products take the native product instead (engine/model/rwkv7.py)."""
    dense = onednn_linear if probe_onednn(torch.float32)[0] else F.linear

    def fn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return dense(x.float(), w.float()).to(x.dtype)
    return fn
