"""Weight-only quantized products for the CPU strategies "fp32i8", "bf16i8", "fp32i4" and "bf16i4", and the CUDA
strategies "fp16i8" and "bf16i8".

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
- M = 64 (batched decode): native and dequantized-per-call were within ~10% on the 0.1B matrices, native 1.4-2x
  faster on the 1.5B ones and the head (DENSE_ROWS was 64; see below for the faster dequantizing since).
- M = 1024 (prefill): the dequantized fp32 GEMM is 1.5-2x faster than native and within 5-30% of the float product.
For bf16 rows the dense path widens them to fp32 where bf16 GEMMs are emulated: torch's bf16 matmul on a dequantized
bf16 weight was 2-6x slower than oneDNN's fp32 one on that CPU (no AVX-512 BF16). Where oneDNN's bf16 GEMM is native
(it packs bf16 weights: AVX-512 BF16, AMX), bf16 rows take the weight dequantized to bf16 instead, from
DENSE_ROWS_BF16 = 16 rows on (Zen 5 EPYC, 2 threads, 0.1B head: int8 native 14.6 / 27.1 / 49.3 ms at 16 / 32 / 64
rows against 11.4 / 14.5 / 17.8 dense; int4 7.5 / 17.5 / 30.7 against 12.3 / 16.0 / 19.0). The dense path
dequantizes DENSE_CHUNK_BYTES of rows at a time (see _dense). Since its dequantizing runs on the AVX-512 kernels
(10x faster), fp32 rows cross over at ~32 rows on that machine (0.1B FFN key at 64 rows: int8 native 2.28 ms, dense
1.40; head 44.5 against 34.5; at 16 rows native still wins, 0.34 against 0.60), hence DENSE_ROWS = 32 (it was 64,
measured with the slower dequantizing on the AVX2 machine). Few-row products are in kernels/csrc/products_cpu.cpp:
AVX-512 / AVX2 / portable float widening, and 16-bit dot products on x rounded to int16 where the CPU has AVX-512
VNNI, for int4 always and for int8 (one scale a row) beyond 4 rows (0.1B head, 2 threads, fp32 rows: 5 rows 2.2 ms
against 9.9 dense, 8 rows 4.9 against 11.0; 64 rows 22.8 against 29.8). Without the native library (no compiler,
GOOSE_NATIVE_KERNELS=0) every product goes through the dequantized float path (correct, slower at few rows).

On CUDA ("cuda fp16i8", "cuda bf16i8") the weights take the same Int8Weight form on the device (float matrices are
quantized on the CPU by chunks of rows and each chunk's codes moved over, so the device never holds a float copy;
GGUF Q8_0 and quantized files keep their codes and scales) and the product is a Triton kernel
(kernels/quant_triton.py: int8 tiles widened in registers, fp32 sums, no host sync, so CUDA graphs capture it).
Where triton does not import, the weight is dequantized to the activation dtype per call and multiplied by F.linear:
correct, slower, and a float copy of one matrix at a time. Neither has been measured on a GPU yet (bench/gpu.py).
"""
from __future__ import annotations

import functools
import logging
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
DENSE_ROWS = 32          # rows of x above which the weight is dequantized into the float product (measured above)
DENSE_ROWS_BF16 = 16     # the same for bf16 rows where oneDNN's bf16 GEMM is native (measured: module doc)
DENSE_CHUNK_BYTES = 16 << 20   # the dense path dequantizes this much of a weight at a time (see _dense)
CHUNK_ROWS = 2048        # rows quantized at once
_BF16 = torch.bfloat16
TRITON_DEVICES = ("cuda",)   # device types whose int8 product is the Triton kernel; tests add "cpu" (interpreter)
log = logging.getLogger("goose.engine")


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

    def rows(self, start: int, stop: int) -> "Int8Weight":
        """Output rows [start, stop) as a weight of their own (views, no copy)."""
        return Int8Weight(self.codes[start:stop], self.scales[start:stop], self.group)

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

    def rows(self, start: int, stop: int) -> "Int4Weight":
        """Output rows [start, stop) as a weight of their own (views, no copy)."""
        return Int4Weight(self.codes[start:stop], self.scales[start:stop],
                          None if self.zeros is None else self.zeros[start:stop], self.group, self.k)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return _dequantize(self, dtype)


QuantizedWeight = (Int8Weight, Int4Weight)


def _dequantize(w, dtype: torch.dtype) -> torch.Tensor:
    """W as a contiguous float matrix: natively (multithreaded) for CPU weights when the library loads, else in
    torch, CHUNK_ROWS rows at a time (the fp32 temporaries stay small beside the result: on a GPU, the torch
    fallback of the int8 product dequantizes every call)."""
    if native_build.available() and dtype in (torch.float32, _BF16) and w.codes.device.type == "cpu":
        return quant_dequantize(*w.parts(), dtype)
    out = torch.empty(w.shape, dtype=dtype, device=w.codes.device)
    for i in range(0, out.shape[0], CHUNK_ROWS):
        out[i:i + CHUNK_ROWS] = _dequantize_rows(w.parts(), slice(i, i + CHUNK_ROWS))
    return out


def _dequantize_rows(parts: tuple, rows: slice) -> torch.Tensor:
    """Rows of W in fp32, in torch ops, from a weight's parts()."""
    bits, codes, scales, zeros, group, k = parts
    codes = codes[rows]
    if bits == 8:
        q = codes.float()
    else:                                    # [N, blocks, 16] bytes -> [N, blocks, 32] codes - 8
        b = codes.view(codes.shape[0], -1, 16)
        q = torch.cat((b & 15, b >> 4), dim=2).reshape(codes.shape[0], -1)[:, :k].float() - 8
    out = q * scales[rows].float().repeat_interleave(group, 1)[:, :k]
    if zeros is not None:
        out += zeros[rows].float().repeat_interleave(group, 1)[:, :k]
    return out


def quantize_int8(w: torch.Tensor, device: torch.device | str = "cpu") -> Int8Weight:
    """w [N, K] float -> int8 codes with one fp32 scale per row, CHUNK_ROWS rows at a time (the fp32 temporaries
    stay a few MB, so loading never holds more than one float matrix plus its codes). The rows are quantized where
    w is and the codes and scales written on ``device``: a CPU checkpoint quantized for a GPU sends it int8 chunks,
    never a float matrix."""
    N, K = w.shape
    q = torch.empty(N, K, dtype=torch.int8, device=device)
    scale = torch.empty(N, 1, dtype=torch.float32, device=device)
    for i in range(0, N, CHUNK_ROWS):
        rows = w[i:i + CHUNK_ROWS].to(torch.float32, copy=True)      # scaled in place below
        s = (rows.abs().amax(dim=1, keepdim=True) / 127).clamp_(min=1e-12)
        scale[i:i + CHUNK_ROWS].copy_(s)                               # to ``device`` (and int8) as they are
        q[i:i + CHUNK_ROWS].copy_(rows.div_(s).round_().clamp_(-127, 127))
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
    if x.dtype == _BF16 and _native_bf16_gemm() and (rows.shape[0] > DENSE_ROWS_BF16 or not native_build.available()):
        # a CPU with bf16 dot products (oneDNN packs bf16 there): the weight as bf16 into oneDNN's bf16 GEMM
        y = _dense(rows, w, _BF16, onednn_linear)
    elif rows.shape[0] > DENSE_ROWS or not native_build.available():
        # fp32 rows through oneDNN's fp32 GEMM, also for bf16 x where bf16 GEMMs are emulated (module doc)
        y = _dense(rows.float(), w, torch.float32, _dense_product()).to(x.dtype)
    else:
        y = quant_matmul(rows, *w.parts())
    return y.view(*x.shape[:-1], N)


def _dense(rows: torch.Tensor, w, dtype: torch.dtype, product) -> torch.Tensor:
    """rows @ W^T with W dequantized to ``dtype`` DENSE_CHUNK_BYTES at a time: a whole dequantized head (100-200 MB)
    would be fresh memory every call (above malloc's mmap threshold), and its page faults cost more than the product
    (measured: dequantizing the 0.1B head to bf16, 34 ms whole vs ~4 ms by chunks)."""
    N, K = w.shape
    step = max(64, DENSE_CHUNK_BYTES // (K * torch.finfo(dtype).bits // 8) // 64 * 64)
    if N <= step:
        return product(rows, w.dequantize(dtype))
    y = torch.empty(rows.shape[0], N, dtype=rows.dtype, device=rows.device)
    for i in range(0, N, step):
        y[:, i:i + step] = product(rows, w.rows(i, i + step).dequantize(dtype))
    return y


@functools.cache
def _native_bf16_gemm() -> bool:
    """Whether oneDNN runs bf16 GEMMs natively here: it packs bf16 weights only on CPUs with bf16 dot products
    (AVX-512 BF16, AMX); elsewhere its bf16 products are emulated and slower than fp32 ones."""
    return probe_onednn(_BF16)[1]


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
    kernels above and a float one (a family left out of QUANTIZED) with ``float_linear``. On CUDA (TRITON_DEVICES)
    only "i8" exists, through the Triton product (module doc)."""
    device = torch.device(device)
    if kind not in QUANT_KINDS:
        raise ValueError(f"unknown quantization {kind!r}; choose one of: {', '.join(QUANT_KINDS)}")
    if device.type in TRITON_DEVICES:
        return _select_int8_triton(kind, device, float_linear)
    if device.type != "cpu":
        raise ValueError(f"quantized weights ({kind}) are implemented for the CPU and CUDA only, not {device}")
    quantize = quantize_int8 if kind == "i8" else functools.partial(quantize_int4, group=GROUP_SIZE)
    return _quantized_linear("int8" if kind == "i8" else "int4", quantized_product, float_linear,
                             _preparer(kind, quantize, keep=lambda w: w))


def _select_int8_triton(kind: str, device: torch.device, float_linear: Linear) -> Linear:
    """select_quantized on a GPU: int8 weights on ``device`` (quantized on the CPU chunk by chunk, or moved as
    stored), multiplied by the Triton kernel."""
    if kind != "i8":
        raise ValueError(f"quantized weights ({kind}) are implemented on {device.type} for int8 (i8) only; "
                         f"use an fp16i8 or bf16i8 strategy there, or a cpu ...{kind} one")
    name, product = _device_int8_product()
    prepare = _preparer(kind, functools.partial(quantize_int8, device=device), keep=lambda w: to_device(w, device))
    return _quantized_linear(name, product, float_linear, prepare)


def _preparer(kind: str, quantize, keep):
    """prepare(w) for a strategy of ``kind``: a float matrix quantized, a stored one of the same kind kept (as
    ``keep`` puts it), the other kind refused (quantizing twice would stack two roundings)."""
    def prepare(w):
        if kind_of(w) == kind:
            return keep(w)
        if kind_of(w) is not None:
            raise ValueError(f"a {kind_of(w)} weight cannot serve an {kind} strategy")
        return quantize(w)
    return prepare


def _quantized_linear(name: str, product, float_linear: Linear, prepare) -> Linear:
    """A Linear whose fn multiplies quantized weights with ``product`` and float ones with ``float_linear``."""
    float_fn = float_linear.fn

    def fn(x: torch.Tensor, w) -> torch.Tensor:
        return product(x, w) if isinstance(w, QuantizedWeight) else float_fn(x, w)
    return Linear(name, fn, prepare)


def to_device(w: Int8Weight, device: torch.device) -> Int8Weight:
    """A stored int8 weight (a GGUF Q8_0 matrix, a quantized file's) moved to ``device`` as it is."""
    return Int8Weight(w.codes.to(device), w.scales.to(device), w.group)


def dequantized_product(x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    """The int8 product without Triton: W dequantized to x's dtype, then F.linear. The Triton kernel's numbers
    within x's rounding (it keeps the scale in fp32), at the cost of a float copy of W per call."""
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} columns but the int8 weight {list(w.shape)} takes {w.shape[1]}")
    return F.linear(x, w.dequantize(x.dtype))


def _device_int8_product():
    """(name, fn(x, Int8Weight)): the Triton kernel, or dequantized_product where triton does not import."""
    try:
        from kernels.quant_triton import int8_matmul_triton
    except ImportError as exc:
        log.warning("int8 products on the GPU run dequantize + F.linear (slower): triton does not import (%s); "
                    "pip install triton", exc)
        return "int8-torch", dequantized_product
    return "int8-triton", lambda x, w: int8_matmul_triton(x, w.codes, w.scales, w.group)
