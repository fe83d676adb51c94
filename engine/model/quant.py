"""Weight-only quantized products for the CPU strategies "fp32i8", "bf16i8", "fp32i4" and "bf16i4".

What is quantized: the projections (receptance, key, value, output), the FFN (key, value) and the head, i.e. all
but ~1-2% of a model's weight bytes; the LoRA factors, the embedding and every vector stay float (they are small,
and the LoRA chains feed the decay, whose errors compound through the recurrence). The README's quality table
gives the measured cost.

Formats (both also hold GGUF's blocks as the file stores them, see engine/formats/gguf.py):
- Int8Weight(codes [N, K] int8, scales [N, ceil(K / group)], group): W = q * s. Quantized here: one fp32 scale
  per output row (group = K), symmetric, |q| <= 127. GGUF Q8_0: group 32, fp16 scales.
- Int4Weight(codes, scales, zeros, group, k): codes [N, ceil(k / 32) * 16] uint8 in ggml's Q4_0 nibble order (per
  32 columns, column j in the low nibble of byte j and column j + 16 in the high one), W = (q - 8) * s (+ z).
  Quantized here: asymmetric, a bf16 (scale, zero) per row and group of GROUP_SIZE columns (q in 0..15; scales
  rounded to bf16 before the codes are chosen). GGUF Q4_0: group 32, fp16 scales, no zeros.

The products (kernels/csrc/quant_cpu.cpp through kernels/quant_native.py) take fp32 or bf16 rows as they are (no
rounding of fp32 rows to bf16) and accumulate in fp32: each block of 32 codes is widened and scaled in registers
and used for up to four rows of x before the next is read. For more than DENSE_ROWS rows the weight is instead
dequantized natively (multithreaded) into a float matrix per call and multiplied by the float product (oneDNN for
fp32; for bf16 rows the same fp32 product on widened rows, since this machine's bf16 matmul is slow). Measured on
the 0.1B and 1.5B shapes (`goose bench linear --threads 1 --cpu-clock`, a shared 2-core AMD EPYC with AVX2; fastest
of N by thread CPU time, 2026-12-03; the command prints the whole table):
- M = 1 (single-stream decode): int8 native 0.3-0.7x the float product's time and 0.6-1.3x torch's
  ``_weight_int8pack_mm`` (which needs bf16 rows); int4 native 0.45-1.4x float and 0.7-1.3x torch's
  ``_weight_int4pack_mm_for_cpu``: about even, and it keeps one layout for GGUF Q4_0 and fp32 rows. Dequantizing per
  call is 10-40x slower here.
- M = 4: int8 native 0.5-0.8x float (fp32) / 0.25-0.3x (bf16), 0.6-1.6x torch's; int4 native about even with
  torch's.
- M = 64 (batched decode): native and dequantized-per-call are within ~10% on the 0.1B matrices, native 1.4-2x
  faster on the 1.5B ones and the head; so DENSE_ROWS = 64 keeps B <= 64 native.
- M = 1024 (prefill): the dequantized fp32 GEMM is 1.5-2x faster than native and within 5-30% of the float product.
For bf16 rows the dense path widens them to fp32: torch's bf16 matmul on a dequantized bf16 weight was 2-6x slower
than oneDNN's fp32 one on this CPU (no AVX-512 BF16). Without the native library (no compiler,
GOOSE_NATIVE_KERNELS=0) every product goes through the dequantized float path (correct, slower at few rows).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.model.linear import Linear, onednn_linear, probe_onednn
from kernels import native_build
from kernels.quant_native import SCALE_DTYPES, quant_dequantize, quant_matmul

QUANT_KINDS = ("i8", "i4")
QUANTIZED = ("att", "ffn", "head")   # the matrix families quantized (see family); the rest stay float
GROUP_SIZE = 64          # int4 columns per (scale, zero); see the README's quality table for 32/64/128
DENSE_ROWS = 64          # rows of x above which the weight is dequantized into the float product (measured above)
CHUNK_ROWS = 2048        # rows quantized at once
_BF16 = torch.bfloat16


def _check_scales(what: str, t: torch.Tensor | None, n: int, groups: int) -> None:
    if t is not None and (t.dtype not in SCALE_DTYPES or tuple(t.shape) != (n, groups)):
        raise ValueError(f"{what} must be float32/bfloat16/float16 [{n}, {groups}], got {t.dtype} {list(t.shape)}")


@dataclass(frozen=True, eq=False)
class Int8Weight:
    """W [N, K] = codes * scales, one scale per row and group of ``group`` columns (the last group may be short)."""
    codes: torch.Tensor      # [N, K] int8
    scales: torch.Tensor     # [N, ceil(K / group)] float32, bfloat16 or float16
    group: int

    def __post_init__(self):
        if self.codes.dtype != torch.int8 or self.codes.dim() != 2 or self.group <= 0:
            raise ValueError(f"int8 codes must be a 2-D int8 tensor with a positive group, got {self.codes.dtype} "
                             f"{list(self.codes.shape)}, group {self.group}")
        _check_scales("int8 scales", self.scales, self.codes.shape[0], -(-self.codes.shape[1] // self.group))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes

    def parts(self) -> tuple:
        """(bits, codes, scales, zeros, group, k): the arguments of kernels/quant_native.py."""
        return 8, self.codes, self.scales, None, self.group, self.codes.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return _dequantize(self, dtype)


@dataclass(frozen=True, eq=False)
class Int4Weight:
    """W [N, k] = (codes - 8) * scales (+ zeros), per row and group of ``group`` columns (a multiple of 32)."""
    codes: torch.Tensor      # [N, ceil(k / 32) * 16] uint8, ggml's Q4_0 nibble order
    scales: torch.Tensor     # [N, ceil(k / group)] float32, bfloat16 or float16
    zeros: torch.Tensor | None   # like scales (same dtype), or None (GGUF Q4_0: symmetric)
    group: int
    k: int

    def __post_init__(self):
        n = self.codes.shape[0] if self.codes.dim() == 2 else -1
        if (self.codes.dtype != torch.uint8 or tuple(self.codes.shape) != (n, -(-self.k // 32) * 16)
                or self.group <= 0 or self.group % 32):
            raise ValueError(f"int4 codes must be uint8 [N, {-(-self.k // 32) * 16}] (16 bytes per 32 of k={self.k} "
                             f"columns) with a group that is a multiple of 32, got {self.codes.dtype} "
                             f"{list(self.codes.shape)}, group {self.group}")
        groups = -(-self.k // self.group)
        _check_scales("int4 scales", self.scales, n, groups)
        _check_scales("int4 zeros", self.zeros, n, groups)
        if self.zeros is not None and self.zeros.dtype != self.scales.dtype:
            raise ValueError(f"int4 zeros ({self.zeros.dtype}) must have the scales' dtype ({self.scales.dtype})")

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.k

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes + (0 if self.zeros is None else self.zeros.nbytes)

    def parts(self) -> tuple:
        return 4, self.codes, self.scales, self.zeros, self.group, self.k

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return _dequantize(self, dtype)


QuantizedWeight = (Int8Weight, Int4Weight)


def _dequantize(w, dtype: torch.dtype) -> torch.Tensor:
    """W as a contiguous float matrix: natively (multithreaded) when the library loads, else in torch."""
    if native_build.available() and dtype in (torch.float32, _BF16):
        return quant_dequantize(*w.parts(), dtype)
    bits, codes, scales, zeros, group, k = w.parts()
    if bits == 8:
        q = codes.float()
    else:                                    # [N, blocks, 16] bytes -> [N, blocks, 32] codes - 8
        b = codes.view(codes.shape[0], -1, 16)
        q = torch.cat((b & 15, b >> 4), dim=2).reshape(codes.shape[0], -1)[:, :k].float() - 8
    out = q * scales.float().repeat_interleave(group, 1)[:, :k]
    if zeros is not None:
        out += zeros.float().repeat_interleave(group, 1)[:, :k]
    return out.to(dtype)


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    """w [N, K] float -> int8 codes with one fp32 scale per row, CHUNK_ROWS rows at a time (the fp32 temporaries
    stay a few MB, so loading never holds more than one float matrix plus its codes)."""
    N, K = w.shape
    q = torch.empty(N, K, dtype=torch.int8)
    scale = torch.empty(N, 1, dtype=torch.float32)
    for i in range(0, N, CHUNK_ROWS):
        rows = w[i:i + CHUNK_ROWS].to(torch.float32, copy=True)      # scaled in place below
        s = (rows.abs().amax(dim=1, keepdim=True) / 127).clamp_(min=1e-12)
        scale[i:i + CHUNK_ROWS] = s
        q[i:i + CHUNK_ROWS] = rows.div_(s).round_().clamp_(-127, 127)
    return Int8Weight(q, scale, K)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes [N, Kp] (0..15, Kp a multiple of 32) -> [N, Kp / 2] uint8 in ggml's Q4_0 nibble order."""
    b = q.to(torch.uint8).view(q.shape[0], -1, 2, 16)
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(q.shape[0], -1)


def quantize_int4(w: torch.Tensor, group: int = GROUP_SIZE) -> Int4Weight:
    """w [N, K] float -> 4-bit codes with a bf16 (scale, zero) per row and group of ``group`` columns."""
    if group % 32 or group <= 0:
        raise ValueError(f"int4 group size must be a positive multiple of 32, got {group}")
    N, K = w.shape
    Kg, Kp = -(-K // group) * group, -(-K // 32) * 32
    codes = torch.empty(N, Kp // 2, dtype=torch.uint8)
    scales = torch.empty(N, Kg // group, dtype=_BF16)
    zeros = torch.empty_like(scales)
    for i in range(0, N, CHUNK_ROWS):
        rows = F.pad(w[i:i + CHUNK_ROWS].to(torch.float32, copy=True), (0, Kg - K)).view(-1, Kg // group, group)
        lo, hi = rows.amin(-1), rows.amax(-1)
        scale = ((hi - lo) / 15).clamp_(min=1e-12).to(_BF16).float()             # [rows, Kg / g]
        zero = (lo + 8 * scale).to(_BF16).float()
        q = rows.sub_(zero[..., None]).div_(scale[..., None]).add_(8).round_().clamp_(0, 15)
        codes[i:i + CHUNK_ROWS] = pack_int4(q.view(-1, Kg)[:, :Kp])
        scales[i:i + CHUNK_ROWS], zeros[i:i + CHUNK_ROWS] = scale, zero
    return Int4Weight(codes, scales, zeros, group, K)


@functools.cache
def _dense_product():
    return onednn_linear if probe_onednn(torch.float32)[0] else F.linear


def quantized_product(x: torch.Tensor, w) -> torch.Tensor:
    """x [..., K] fp32 or bf16 -> x @ W^T [..., N] in x's dtype, for an Int8Weight or Int4Weight."""
    N, K = w.shape
    rows = x.reshape(-1, K)
    if rows.shape[0] > DENSE_ROWS or not native_build.available():
        # fp32 rows through oneDNN's fp32 GEMM also for bf16 x: torch's bf16 matmul is slower here (module doc)
        y = _dense_product()(rows.float(), w.dequantize(torch.float32)).to(x.dtype)
    else:
        y = quant_matmul(rows, *w.parts())
    return y.view(*x.shape[:-1], N)


int8_product = int4_product = quantized_product


def family(key: str) -> str:
    """The family of a checkpoint matrix for QUANTIZED: "head", "ffn" or "att" (receptance, key, value, output)."""
    return "head" if key == "head.weight" else "ffn" if ".ffn." in key else "att"


_MATRICES = re.compile(r"head\.weight|blocks\.\d+\.(att\.(receptance|key|value|output)|ffn\.(key|value))\.weight")


def quantizable(key: str) -> bool:
    """Whether a strategy ending in i8/i4 quantizes this checkpoint matrix (BlinkDL name)."""
    return bool(_MATRICES.fullmatch(key)) and family(key) in QUANTIZED


def kind_of(w) -> str | None:
    """"i8" for an Int8Weight, "i4" for an Int4Weight, None for anything else (a float tensor)."""
    return "i8" if isinstance(w, Int8Weight) else "i4" if isinstance(w, Int4Weight) else None


def select_quantized(kind: str, device: torch.device, float_linear: Linear) -> Linear:
    """The product for the big matrices of a strategy ("i8" or "i4"): prepare() quantizes a float weight and keeps
    an already quantized one of the same kind (a GGUF Q8_0/Q4_0 matrix); fn() multiplies a quantized one with the
    kernels above and a float one (a family left out of QUANTIZED) with ``float_linear``."""
    if torch.device(device).type != "cpu":
        raise ValueError(f"quantized weights ({kind}) are implemented for the CPU only, not {device}")
    if kind not in QUANT_KINDS:
        raise ValueError(f"unknown quantization {kind!r}; choose one of: {', '.join(QUANT_KINDS)}")
    quantize = quantize_int8 if kind == "i8" else functools.partial(quantize_int4, group=GROUP_SIZE)
    float_fn = float_linear.fn

    def prepare(w):
        if kind_of(w) == kind:
            return w
        if kind_of(w) is not None:
            raise ValueError(f"a {kind_of(w)} weight cannot serve an {kind} strategy")
        return quantize(w)

    def fn(x: torch.Tensor, w) -> torch.Tensor:
        return quantized_product(x, w) if isinstance(w, QuantizedWeight) else float_fn(x, w)
    return Linear("int8" if kind == "i8" else "int4", fn, prepare)
