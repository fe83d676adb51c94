"""Weight-only quantized products and dequantization in native code (kernels/csrc/quant_cpu.cpp) as torch calls.

Formats (engine/model/quant.py holds the weights; this module only checks and calls):
- int8: codes [N, K] int8, scales [N, ceil(K / group)]: W = q * s (group 32 is GGUF Q8_0, group K one scale a row);
- int4: codes [N, ceil(K / 32) * 16] uint8 in ggml's Q4_0 nibble order, scales (and optional zeros) [N, ceil(K /
  group)], group a multiple of 32: W = (q - 8) * s (+ z) (no zeros, group 32: GGUF Q4_0).
Scales and zeros are float32, bfloat16 or float16; activations and outputs float32 or bfloat16, accumulation fp32.
Raises NativeUnavailable (kernels/native_build.py) when the library cannot be built or loaded.
"""
from __future__ import annotations

import torch

from kernels.native_build import load

__all__ = ["quant_matmul", "quant_dequantize", "check_weights", "SCALE_DTYPES"]

_ROW_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
SCALE_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def check_weights(bits: int, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group: int,
             k: int) -> tuple:
    """The weight arguments of both C calls, after checking them: (N, K, bits, G, codes, code stride, scales,
    zeros, scale dtype, scale stride)."""
    N = codes.shape[0]
    want_codes = (torch.int8, (N, k)) if bits == 8 else (torch.uint8, (N, -(-k // 32) * 16))
    if bits not in (8, 4) or group <= 0 or (bits == 4 and group % 32):
        raise ValueError(f"quantized weights are 8 or 4 bits with a positive group (int4: a multiple of 32), got "
                         f"{bits} bits, group {group}")
    if codes.dtype != want_codes[0] or tuple(codes.shape) != want_codes[1] or codes.stride(1) != 1:
        raise ValueError(f"int{bits} codes must be {want_codes[0]} {list(want_codes[1])} with contiguous rows, got "
                         f"{codes.dtype} {list(codes.shape)}")
    groups = -(-k // group)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t is None:
            continue
        if (t.dtype not in SCALE_DTYPES or tuple(t.shape) != (N, groups) or t.stride(1) != 1 or t.dtype != scales.dtype
                or t.stride(0) != scales.stride(0)):            # the kernels index zeros with the scales' stride
            raise ValueError(f"int{bits} {name} must be float32/bfloat16/float16 [{N}, {groups}] (one per row and "
                             f"group of {group}, laid out like the scales), got {t.dtype} {list(t.shape)}")
    for t in (codes, scales, zeros):
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"quantized weights must be on the CPU, got {t.device}")
    return (N, k, bits, group, codes.data_ptr(), codes.stride(0), scales.data_ptr(),
            None if zeros is None else zeros.data_ptr(), SCALE_DTYPES[scales.dtype], scales.stride(0))


def quant_matmul(x: torch.Tensor, bits: int, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 group: int, k: int, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [M, k] (float32 or bfloat16 CPU rows) @ W^T -> [M, N] in ``out_dtype`` (default x's dtype)."""
    out_dtype = out_dtype or x.dtype
    if x.dim() != 2 or x.shape[1] != k or x.dtype not in _ROW_DTYPES or x.device.type != "cpu":
        raise ValueError(f"x must be float32 or bfloat16 CPU rows [M, {k}], got {x.dtype} {list(x.shape)} on "
                         f"{x.device}")
    if out_dtype not in _ROW_DTYPES:
        raise ValueError(f"the quantized product writes float32 or bfloat16, not {out_dtype}")
    N, K, *w = check_weights(bits, codes, scales, zeros, group, k)
    if x.stride(1) != 1:
        x = x.contiguous()
    M = x.shape[0]
    y = torch.empty((M, N), dtype=out_dtype)
    if M and N:
        rc = load().quant_matmul(M, N, K, *w[:2], x.data_ptr(), _ROW_DTYPES[x.dtype], x.stride(0), *w[2:],
                                 y.data_ptr(), _ROW_DTYPES[out_dtype], N)
        if rc != 0:
            raise MemoryError(f"the quantized product [{M}, {K}] x [{N}, {K}] could not allocate its scratch")
    return y


def quant_dequantize(bits: int, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group: int,
                     k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [N, k] in ``dtype`` (float32 or bfloat16), contiguous."""
    if dtype not in _ROW_DTYPES:
        raise ValueError(f"quantized weights dequantize to float32 or bfloat16, not {dtype}")
    args = check_weights(bits, codes, scales, zeros, group, k)
    out = torch.empty((args[0], k), dtype=dtype)
    if out.numel():
        load().quant_dequantize(*args, out.data_ptr(), _ROW_DTYPES[dtype], k)
    return out
