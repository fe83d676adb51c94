"""Weight-only int8 matrix products in Triton, for the CUDA strategies "fp16i8" and "bf16i8".

    y [M, N] = x [M, K] @ W^T,   W [N, K] = q [N, K] (int8) * s [N, ceil(K / group)]

x is fp16 or bf16 (the strategy's activation dtype), q the int8 codes of engine/model/quant.py's Int8Weight and s
its scales (fp32, bf16 or fp16): one per output row (group >= K: what Goose quantizes) or one per row and group of
``group`` columns (GGUF Q8_0: 32 columns, fp16 scales; quantized files may hold any group). The weight is read
once per tile of output columns as int8 (half the bytes of fp16, which is what decode is bound by) and widened in
registers; sums are fp32 and y is written in x's dtype. Any M, K and N: tiles past the edges are masked.

How a tile is multiplied depends on M:
- M <= FMA_ROWS (single-stream and tiny-batch decode): fp32 multiply-adds on the CUDA cores, x and q widened to
  fp32 and each weight scaled exactly in fp32 (q * s, no rounding). tl.dot needs 16 rows, of which 15 would be
  padding here, and the product is bound by reading the weight anyway, so tiles of few output columns (8-32) give
  more programs to read it in parallel.
- more rows (batched decode, prefill): tl.dot on tensor cores. q is widened to x's dtype, which is exact
  (|q| <= 127 fits the 8 or 11 bits of a bf16 or fp16 significand), and the fp32 products are scaled afterwards:
  per row once at the end, per group once per K block when the block lies inside one group (BLOCK_K divides the
  group: Q8_0's 32 columns). Only a group that no block of 16 or more divides (e.g. 10 or 100: no file Goose or
  GGUF writes has one) scales each weight before the product, rounding q * s to x's dtype as the torch fallback
  (engine/model/quant.py's dequantized_product) does.
So the kernel is never less exact than dequantizing W to x's dtype and calling F.linear, and usually more: the
scale is never rounded to fp16/bf16 on the per-row and 32-column paths.

Nothing here synchronises with the host or allocates by data: the output is one torch.empty of a size fixed by the
shapes and the launch grid depends on M, N only, so a decode step that calls it can be captured in a CUDA graph
(engine/cuda_graphs.py). The block sizes are chosen by rule from M and the group, not autotuned (autotuning would
time candidates at the first call of each shape, with host syncs, and make the first capture depend on it); they
are reasonable defaults, not measured on a GPU yet (bench/gpu.py prints the int8 rows beside fp16).

Under TRITON_INTERPRET=1 (set before triton is imported) the kernel runs on CPU tensors, which is how
tests/test_quant_triton.py proves it against a float64 reference without a GPU.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.quant_native import SCALE_DTYPES     # the scale dtypes every int8 product takes

__all__ = ["int8_matmul_triton", "interpreting", "launch_config", "ACT_DTYPES", "FMA_ROWS"]

ACT_DTYPES = (torch.float16, torch.bfloat16)
FMA_ROWS = 4              # up to this many rows of x: fp32 multiply-adds; above, tl.dot
FMA_ELEMENTS = 4096       # elements of the [BLOCK_M, BLOCK_K, BLOCK_N] product a program holds on the FMA path
SCALE_ROW, SCALE_BLOCK, SCALE_ELEMENT = 0, 1, 2    # where the scale is applied (module doc)


def interpreting() -> bool:
    """Whether the kernel was built for the Triton interpreter (CPU tensors) rather than compiled for a GPU."""
    return type(_int8_matmul_kernel).__name__ == "InterpretedFunction"


@triton.jit
def _bf16_in_fp32(v):
    """v rounded to the nearest bf16 (ties to even), kept in fp32. Only for the interpreter, whose bf16 is a stand-in:
    it truncates fp32 -> bf16 conversions (GPUs round to nearest) and tl.dot multiplies bf16's raw bits as integers.
    So there bf16 operands enter tl.dot as these exact fp32 values, and results are rounded here before the store
    (whose conversion is then exact)."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _int8_matmul_kernel(x_ptr, q_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_qn, stride_sn, stride_ym,
                        GROUP: tl.constexpr, SCALE: tl.constexpr, USE_DOT: tl.constexpr, INTERPRET_BF16: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm                  # [BLOCK_M, 1]
    q_cols = q_ptr + offs_n.to(tl.int64)[None, :] * stride_qn                  # [1, BLOCK_N]: W^T's columns
    s_cols = s_ptr + offs_n.to(tl.int64) * stride_sn                           # [BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)   # [BM, BK]
        q = tl.load(q_cols + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0)     # [BK, BN] int8
        if SCALE == 2:                                 # a scale per weight: gathered for each (k, n)
            s = tl.load(s_cols[None, :] + (offs_k // GROUP)[:, None], mask=k_ok[:, None] & n_ok[None, :],
                        other=0.0).to(tl.float32)
            w = q.to(tl.float32) * s
        else:
            w = q
        if not USE_DOT:
            part = tl.sum(x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
        elif INTERPRET_BF16:     # the same values as below, in fp32 (see _bf16_in_fp32)
            part = tl.dot(x.to(tl.float32), _bf16_in_fp32(w.to(tl.float32)), input_precision="ieee")
        else:                    # int8 -> fp32 -> fp16/bf16 is exact; q * s (SCALE 2) is rounded to x's dtype
            part = tl.dot(x, w.to(tl.float32).to(x.dtype), out_dtype=tl.float32)
        if SCALE == 1:                                 # the block lies inside one group of every row
            s = tl.load(s_cols + k0 // GROUP, mask=n_ok, other=0.0).to(tl.float32)
            part = part * s[None, :]
        acc += part
    if SCALE == 0:                                     # one scale per row: once, at the end
        acc = acc * tl.load(s_cols, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    if INTERPRET_BF16:
        acc = _bf16_in_fp32(acc)
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _pow2_divisor(n: int, at_most: int) -> int:
    """The largest power of two <= at_most that divides n."""
    return min(n & -n, at_most)


@functools.lru_cache(maxsize=None)
def launch_config(M: int, K: int, group: int) -> dict:
    """Block sizes, scale placement and product kind for M rows of x and a weight of K columns in groups of
    ``group`` (>= K: one scale per row). A rule, not a measurement (module doc)."""
    per_row = group >= K
    if M <= FMA_ROWS:
        block_m = triton.next_power_of_2(max(M, 1))
        block_k = 128
        return dict(USE_DOT=False, SCALE=SCALE_ROW if per_row else SCALE_ELEMENT, BLOCK_M=block_m,
                    BLOCK_K=block_k, BLOCK_N=max(8, FMA_ELEMENTS // (block_m * block_k)), num_warps=4)
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128
    block_n = 128 if block_m == 128 else 64
    if per_row:
        scale, block_k = SCALE_ROW, 64
    elif _pow2_divisor(group, 64) >= 16:               # tl.dot needs K blocks of 16 or more
        scale, block_k = SCALE_BLOCK, _pow2_divisor(group, 64)
    else:
        scale, block_k = SCALE_ELEMENT, 64
    return dict(USE_DOT=True, SCALE=scale, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                num_warps=8 if block_m * block_n >= 128 * 128 else 4)


def check_operands(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group: int) -> None:
    """Clear errors for what the product cannot take: dtypes, shapes, devices."""
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"the int8 product takes fp16 or bf16 activations, got {x.dtype}")
    if codes.dtype != torch.int8 or codes.dim() != 2:
        raise ValueError(f"int8 codes must be a 2-D int8 tensor, got {codes.dtype} {list(codes.shape)}")
    N, K = codes.shape
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} columns but the int8 weight [{N}, {K}] takes {K}")
    if group <= 0 or scales.dtype not in SCALE_DTYPES or tuple(scales.shape) != (N, -(-K // group)):
        raise ValueError(f"int8 scales must be float32/bfloat16/float16 [{N}, {-(-K // max(group, 1))}] for group "
                         f"{group}, got {scales.dtype} {list(scales.shape)}")
    if not (x.device == codes.device == scales.device):
        raise ValueError(f"x ({x.device}), codes ({codes.device}) and scales ({scales.device}) must share a device")


def int8_matmul_triton(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """x [..., K] fp16/bf16 @ (codes * scales)^T -> [..., N] in x's dtype (module doc)."""
    check_operands(x, codes, scales, group)
    N, K = codes.shape
    rows = x.reshape(-1, K)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if codes.stride(-1) != 1:
        codes = codes.contiguous()
    if scales.stride(-1) != 1:
        scales = scales.contiguous()
    M = rows.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M and N:
        cfg = launch_config(M, K, group)
        grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(M, cfg["BLOCK_M"]))
        _int8_matmul_kernel[grid](rows, codes, scales, y, M, N, K, rows.stride(0), codes.stride(0),
                                  scales.stride(0), y.stride(0), GROUP=group if group < K else 1,
                                  INTERPRET_BF16=interpreting() and x.dtype == torch.bfloat16, **cfg)
    return y.view(*x.shape[:-1], N)
