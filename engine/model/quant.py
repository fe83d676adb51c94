"""Weight-only quantized products for the CPU strategies "fp32i8", "bf16i8", "fp32i4" and "bf16i4".

What is quantized: the projections (receptance, key, value, output), the FFN (key, value) and the head, i.e. all
but ~1-2% of a model's weight bytes; the LoRA factors, the embedding and every vector stay float (they are small,
and the LoRA chains feed the decay, whose errors compound through the recurrence). The README's quality table
gives the measured cost.

- int8: symmetric, one scale per output channel (row of W [N, K]); q = round(W / s), |q| <= 127.
- int4: asymmetric, one (scale, zero) per output channel and group of GROUP_SIZE input columns;
  W ~ (q - 8) * scale + zero with q in 0..15 (torch's CPU int4 convention).
Shapes torch's kernels cannot take (int4: N not a multiple of 32 or K of the group; int8: K not a multiple of 8,
where the kernel reads past the row) are zero-padded at load, and x is padded at call when K is.

The products are torch's weight-only CPU ops, ``_weight_int8pack_mm`` and ``_weight_int4pack_mm_for_cpu``. Both
are fast only with bf16 activations (with fp32 ones they run 10-40x slower: /work/shared/docs/cpu-matmul-notes.md,
`goose bench linear`), so x is rounded to bf16 for the product and the result returned in x's dtype; the rest of an
fp32iN model (norms, LoRA, time mix, residual) stays fp32. For many rows in fp32 (prefill) the weight is instead
dequantized to fp32 per call and multiplied by the float product, which is faster there (DENSE_ROWS).
Scales are rounded to bf16 before quantizing, so the stored scales are exactly the ones the weights were rounded to.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.model.linear import Linear, onednn_linear, probe_onednn

QUANT_KINDS = ("i8", "i4")
QUANTIZED = ("att", "ffn", "head")   # the matrix families quantized (see family); the rest stay float
GROUP_SIZE = 64          # int4 columns per (scale, zero); see the README's quality table for 32/64/128
DENSE_ROWS = 256         # fp32 activations with more rows than this: dequantize and use the float product
CHUNK_ROWS = 2048        # rows quantized at once
_BF16 = torch.bfloat16


@dataclass(frozen=True, eq=False)
class Int8Weight:
    q: torch.Tensor          # [N, Kp] int8, K zero-padded to a multiple of 8 (torch's kernel reads garbage past
    scale: torch.Tensor      # [N] bf16                                       the end of a row otherwise)
    k: int                   # the true K

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.k

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.q[:, :self.k].to(dtype) * self.scale.to(dtype)[:, None]


@dataclass(frozen=True, eq=False)
class Int4Weight:
    packed: torch.Tensor     # torch's CPU int4 layout of the padded [Np, Kp] codes: [Np, Kp / 2] uint8
    scale_zero: torch.Tensor  # [Kp / group, Np, 2] bf16
    n: int                   # the true [N, K]
    k: int
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.k

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scale_zero.nbytes

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = unpack_int4(self.packed).to(dtype)                                  # [Np, Kp]
        Np, Kp = q.shape
        sz = self.scale_zero.to(dtype).transpose(0, 1)                           # [Np, Kp / g, 2]
        w = (q.view(Np, Kp // self.group, self.group) - 8) * sz[..., :1] + sz[..., 1:]
        return w.reshape(Np, Kp)[:self.n, :self.k]


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    """w [N, K] float -> int8 codes with one bf16 scale per row, CHUNK_ROWS rows at a time (the fp32
    temporaries stay a few MB, so loading never holds more than one float matrix plus its codes)."""
    N, K = w.shape
    q = torch.empty(N, K + (-K % 8), dtype=torch.int8)
    scale = torch.empty(N, dtype=_BF16)
    for i in range(0, N, CHUNK_ROWS):
        rows = F.pad(w[i:i + CHUNK_ROWS].float(), (0, -K % 8))
        s = (rows.abs().amax(dim=1) / 127).clamp_(min=1e-12).to(_BF16)
        scale[i:i + CHUNK_ROWS] = s
        q[i:i + CHUNK_ROWS] = rows.div_(s.float()[:, None]).round_().clamp_(-127, 127)
    return Int8Weight(q, scale, K)


def quantize_int4(w: torch.Tensor, group: int = GROUP_SIZE) -> Int4Weight:
    """w [N, K] float -> 4-bit codes with a bf16 (scale, zero) per row and group of ``group`` columns."""
    if group % 32 or group <= 0:
        raise ValueError(f"int4 group size must be a positive multiple of 32, got {group}")
    N, K = w.shape
    Np, Kp = -(-N // 32) * 32, -(-K // group) * group
    packed, scales, zeros = [], [], []
    for i in range(0, Np, CHUNK_ROWS):          # torch's layout keeps blocks of 32 rows apart: pack by chunks
        chunk = w[i:i + CHUNK_ROWS].float()
        rows = F.pad(chunk, (0, Kp - K, 0, min(CHUNK_ROWS, Np - i) - chunk.shape[0]))
        rows = rows.view(-1, Kp // group, group)
        lo, hi = rows.amin(-1), rows.amax(-1)
        scale = ((hi - lo) / 15).clamp_(min=1e-12).to(_BF16).float()             # [rows, Kp / g]
        zero = (lo + 8 * scale).to(_BF16).float()
        q = rows.sub_(zero[..., None]).div_(scale[..., None]).add_(8).round_().clamp_(0, 15)
        packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(-1, Kp).to(torch.int32), 1))
        scales.append(scale)
        zeros.append(zero)
    packed = torch.cat(packed) if len(packed) > 1 else packed[0]
    scale_zero = torch.stack((torch.cat(scales), torch.cat(zeros)), -1).transpose(0, 1).contiguous().to(_BF16)
    return Int4Weight(packed, scale_zero, N, K, group)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The [Np, Kp] int codes back from torch's CPU int4 layout (found by experiment on torch 2.13, checked by
    int4_layout_known): rows in blocks of 32, bytes [Kp, 16] per block, row r's code in the low nibble of column
    r and row r + 16's in the high one."""
    Np, half = packed.shape
    Kp = 2 * half
    p = packed.view(Np // 32, Kp, 16)
    q = torch.stack((p & 15, p >> 4), dim=1)                                    # [Np / 32, 2, Kp, 16] uint8
    return q.transpose(2, 3).reshape(Np, Kp)


@functools.cache
def int4_layout_known() -> bool:
    """Whether unpack_int4 reads this torch build's int4 layout (else the fp32 dequantized path is not used)."""
    codes = torch.randint(0, 16, (64, 128), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    try:
        return torch.equal(unpack_int4(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)).int(), codes)
    except (RuntimeError, ValueError):
        return False


def _dense_product():
    return onednn_linear if probe_onednn(torch.float32)[0] else F.linear


def int8_product(x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    """x [..., K] fp32 or bf16 -> x @ W^T [..., N] in x's dtype."""
    N, K = w.shape
    rows = x.reshape(-1, K)
    if x.dtype == torch.float32 and rows.shape[0] > DENSE_ROWS:
        y = _dense_product()(rows, w.dequantize(torch.float32))
    else:
        Kp = w.q.shape[1]
        xb = F.pad(rows.to(_BF16), (0, Kp - K)) if Kp != K else rows.to(_BF16).contiguous()
        y = torch.ops.aten._weight_int8pack_mm(xb, w.q, w.scale).to(x.dtype)
    return y.view(*x.shape[:-1], N)


def int4_product(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """x [..., K] fp32 or bf16 -> x @ W^T [..., N] in x's dtype."""
    N, K = w.shape
    rows = x.reshape(-1, K)
    if x.dtype == torch.float32 and rows.shape[0] > DENSE_ROWS and int4_layout_known():
        y = _dense_product()(rows, w.dequantize(torch.float32).contiguous())
    else:
        Kp = w.packed.shape[1] * 2
        xb = F.pad(rows.to(_BF16), (0, Kp - K)) if Kp != K else rows.to(_BF16).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, w.packed, w.group, w.scale_zero)[:, :N].to(x.dtype)
    return y.reshape(*x.shape[:-1], N)


def family(key: str) -> str:
    """The family of a checkpoint matrix for QUANTIZED: "head", "ffn" or "att" (receptance, key, value, output)."""
    return "head" if key == "head.weight" else "ffn" if ".ffn." in key else "att"


def select_quantized(kind: str, device: torch.device, float_linear: Linear) -> Linear:
    """The product for the big matrices of a strategy ("i8" or "i4"): prepare() quantizes a float weight; fn()
    multiplies a quantized one with the kernels above and a float one (a family left out of QUANTIZED) with
    ``float_linear``."""
    if torch.device(device).type != "cpu":
        raise ValueError(f"quantized weights ({kind}) are implemented for the CPU only, not {device}")
    if kind == "i8":
        prepare, product = quantize_int8, int8_product
    elif kind == "i4":
        prepare, product = functools.partial(quantize_int4, group=GROUP_SIZE), int4_product
    else:
        raise ValueError(f"unknown quantization {kind!r}; choose one of: {', '.join(QUANT_KINDS)}")
    float_fn = float_linear.fn

    def fn(x: torch.Tensor, w) -> torch.Tensor:
        return product(x, w) if isinstance(w, (Int8Weight, Int4Weight)) else float_fn(x, w)
    return Linear("int8" if kind == "i8" else "int4", fn, prepare)
