"""The whole single-token step of an RWKV-7 model as one native call (kernels/csrc/decode_cpu.cpp,
``goose_decode_step``): embedding, every layer, the final norm and the head, for a few sequences at a time.

Why: single-stream decode of a small model is ~100 calls a token from Python (products, norms, the time mix),
each a dispatch and a thread fork/join; with quantized weights that overhead was a third of the step. Here the
model's tensors are described once, at load, by ctypes structs mirroring the C ones (``MatRef``, ``LayerRef``,
``ModelRef``); a step passes the tokens, the state's per-layer rows and the logits buffer.

Weights the step reads: plain contiguous float32/bfloat16 matrices [out, in], the quantized forms of
engine/model/quant.py (passed as their parts: codes, scales, zeros, group), and oneDNN-packed float matrices whose
layout was checked at load (packed_layout). Raises NativeUnavailable without the library, ValueError for a weight
it cannot read: the caller keeps its torch path then.
"""
from __future__ import annotations

import ctypes

import torch

from kernels.native_build import load, load_for_head_size
from kernels.quant_native import check_weights as quant_weights

__all__ = ["DecodeStep", "STEP_ROWS", "MatRef"]

STEP_ROWS = 4           # most sequences per step call: the kernels multiply each weight block with <= 4 rows

_i32, _i64, _f32, _ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
_SCALE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
F32, BF16, I8, I4, F32_BLOCKED, BF16_PAIRS = 0, 1, 2, 3, 4, 5
_CHECK_BYTES = 16 << 20  # bytes of blocks compared at a time when a packed layout is checked


class MatRef(ctypes.Structure):
    _fields_ = [("kind", _i32), ("scale_dtype", _i32), ("N", _i64), ("K", _i64), ("G", _i64), ("data", _ptr),
                ("row_bytes", _i64), ("scales", _ptr), ("zeros", _ptr), ("scale_stride", _i64)]


class LayerRef(ctypes.Structure):
    _fields_ = ([(name, _ptr) for name in ("ln1_w", "ln1_b", "att_mix", "ln2_w", "ln2_b", "ffn_mix")]
                + [(name, MatRef) for name in ("r", "k", "v", "o", "fk", "fv", "w1", "w2", "a1", "a2", "g1", "g2",
                                               "v1", "v2")]
                + [(name, _ptr) for name in ("w0", "a0", "v0", "k_k", "k_a", "r_k", "lnx_w", "lnx_b")])


class ModelRef(ctypes.Structure):
    _fields_ = [("L", _i64), ("C", _i64), ("H", _i64), ("N", _i64), ("F", _i64), ("V", _i64), ("act_bf16", _i32),
                ("emb_bf16", _i32), ("emb", _ptr), ("ln_out_w", _ptr), ("ln_out_b", _ptr), ("head", MatRef),
                ("layers", ctypes.POINTER(LayerRef)), ("ln_eps", _f32), ("gn_eps", _f32),
                ("log_decay_scale", _f32), ("unused", _f32)]


class PackedLayout(tuple):
    """(kind, rows a block, bytes a block) of a oneDNN-packed matrix whose layout the kernels read."""


def packed_layout(packed: torch.Tensor, plain: torch.Tensor) -> PackedLayout | None:
    """The layout of ``packed`` (oneDNN's own, from engine/model/linear.py's onednn_pack of ``plain``) if it is one
    the native kernels read on this CPU, checked value for value against ``plain``; None otherwise.

    Why: oneDNN's packed layout makes batched and prompt products ~15-20% faster than plain weights, but it is
    opaque to torch. On AVX-512 CPUs it is, for fp32, blocks of G output rows laid out [K'][G], and for bf16, blocks
    [K' / 2][G][2] (pairs of columns), K' being K or K padded by a few columns; the single-token step reads those directly, so one copy of the
    weights serves both. The layout is a choice of oneDNN's (it may change with the CPU, the shape or the
    version), hence the check of every value (and of the padding) before it is trusted; a check costs one read
    of both copies, at load."""
    try:
        lib = load()
    except Exception:                                       # no native library: nothing reads the layout
        return None
    if not lib.packed_layouts_readable or not packed.is_mkldnn or plain.dim() != 2 \
            or plain.dtype not in (torch.float32, torch.bfloat16) \
            or not all(hasattr(torch.ops.mkldnn, name) for name in ("data_ptr", "_nbytes")):
        return None
    N, K = plain.shape
    nbytes = int(torch.ops.mkldnn._nbytes(packed))
    pairs = plain.dtype == torch.bfloat16
    for G in (64, 48, 32, 16):          # rows a block; the columns may be padded too (fp32 [192, 500]: to 512)
        nb = -(-N // G)
        Kp, rest = divmod(nbytes, nb * G * plain.element_size())
        if rest == 0 and K <= Kp < K + 64 and not (pairs and Kp % 2) and _same_layout(packed, plain, G, Kp, pairs):
            return PackedLayout((BF16_PAIRS if pairs else F32_BLOCKED, G, nbytes // nb))
    return None


def _same_layout(packed: torch.Tensor, plain: torch.Tensor, G: int, Kp: int, pairs: bool) -> bool:
    """Whether ``packed``'s bytes are ``plain`` in blocks of G rows, [Kp][G] (fp32) or [Kp / 2][G][2] (bf16 pairs),
    zeros in the padding: compared value for value, ~16 MB of blocks at a time."""
    N, K = plain.shape
    nbytes = int(torch.ops.mkldnn._nbytes(packed))
    nb = -(-N // G)
    raw = torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(torch.ops.mkldnn.data_ptr(packed)),
                           dtype=torch.int16 if pairs else torch.int32).view(nb, -1)
    bits = plain.contiguous().view(torch.int16 if pairs else torch.int32)
    step = max(1, _CHECK_BYTES // (G * Kp * plain.element_size()))
    for b0 in range(0, nb, step):
        b1 = min(nb, b0 + step)
        rows = torch.zeros((b1 - b0) * G, Kp, dtype=bits.dtype)
        rows[:min(N, b1 * G) - b0 * G, :K] = bits[b0 * G:b1 * G]
        want = (rows.view(b1 - b0, G, Kp // 2, 2).permute(0, 2, 1, 3) if pairs
                else rows.view(b1 - b0, G, Kp).transpose(1, 2))
        if not torch.equal(raw[b0:b1], want.reshape(b1 - b0, -1)):
            return False
    return True


def mat_ref(w, keep: list, what: str, shape: tuple[int, int] | None = None,
            layouts: dict | None = None) -> MatRef:
    """A MatRef for a plain float32/bfloat16 matrix, a quantized weight (anything with ``parts()``) or a
    oneDNN-packed matrix whose layout ``layouts`` holds (by its data pointer, from packed_layout); the tensors it
    points into are appended to ``keep``."""
    if isinstance(w, torch.Tensor) and w.is_mkldnn and layouts:
        layout = layouts.get(torch.ops.mkldnn.data_ptr(w))
        if layout is not None:
            kind, G, block_bytes = layout
            keep.append(w)
            ref = MatRef(kind, 0, w.shape[0], w.shape[1], G, torch.ops.mkldnn.data_ptr(w), block_bytes, None, None, 0)
            if shape is not None and (ref.N, ref.K) != shape:
                raise ValueError(f"{what}: shape [{ref.N}, {ref.K}], expected {list(shape)}")
            return ref
    if hasattr(w, "parts"):
        parts = w.parts()
        try:
            N, K, bits, group, codes_ptr, code_stride, scales_ptr, zeros_ptr, scale_dtype, scale_stride = \
                quant_weights(*parts)                       # the quantized products' own checks, one validator
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None
        keep.extend(t for t in parts[1:4] if t is not None)
        ref = MatRef(I8 if bits == 8 else I4, scale_dtype, N, K, group, codes_ptr,
                     code_stride * parts[1].element_size(), scales_ptr, zeros_ptr, scale_stride)
    else:
        if not isinstance(w, torch.Tensor) or w.is_mkldnn or w.layout != torch.strided:
            raise ValueError(f"{what}: the step reads plain row-major matrices, not {getattr(w, 'layout', type(w))}")
        if w.dim() != 2 or w.dtype not in (torch.float32, torch.bfloat16) or w.device.type != "cpu" \
                or w.stride(1) != 1:
            raise ValueError(f"{what}: a float32/bfloat16 CPU matrix with contiguous rows is needed, got "
                             f"{w.dtype} {tuple(w.shape)}")
        keep.append(w)
        ref = MatRef(F32 if w.dtype == torch.float32 else BF16, 0, w.shape[0], w.shape[1], w.shape[1],
                     w.data_ptr(), w.stride(0) * w.element_size(), None, None, 0)
    if shape is not None and (ref.N, ref.K) != shape:
        raise ValueError(f"{what}: shape [{ref.N}, {ref.K}], expected {list(shape)}")
    return ref


class DecodeStep:
    """One token for up to STEP_ROWS sequences through a whole model, natively.

    ``weights``: the model's prepared tensors: emb [V, C] (float32/bfloat16, ln0 folded in), ln_out (w, b), head,
    and ``layers`` (engine/model/layers.py LayerWeights; the LoRA factors as (plain, prepared) pairs)."""

    def __init__(self, *, n_head: int, head_size: int, emb: torch.Tensor, ln_out, head, layers, act_dtype,
                 ln_eps: float, gn_eps: float, log_decay_scale: float, layouts: dict | None = None):
        self._lib = load_for_head_size(head_size)
        if act_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"the native step runs float32 or bfloat16 activations, not {act_dtype}")
        V, C = emb.shape
        H, N = n_head, head_size
        if H * N != C:
            raise ValueError(f"n_head x head_size = {H * N} is not the embedding width {C}")
        keep: list = []

        def mat(w, what, shape):
            return mat_ref(w, keep, what, shape, layouts)

        def vec(t: torch.Tensor, n: int, what: str) -> int:
            t = t.reshape(-1).to(torch.float32).contiguous()
            if t.numel() != n:
                raise ValueError(f"{what} has {t.numel()} values, expected {n}")
            keep.append(t)
            return t.data_ptr()

        refs = []
        F = None
        for i, lw in enumerate(layers):
            p = f"layer {i}"
            ffn = lw.ffn_key.shape[0]
            F = ffn if F is None else F
            if ffn != F:
                raise ValueError(f"{p}: FFN width {ffn} differs from layer 0's {F}")
            lora = {}
            for name in ("w1", "w2", "a1", "a2", "g1", "g2", "v1", "v2"):
                pair = getattr(lw, name)
                if pair is None:
                    lora[name] = MatRef()
                    continue
                lora[name] = mat_ref(pair[0], keep, f"{p} LoRA {name}")
            for first, second in (("w1", "w2"), ("a1", "a2"), ("g1", "g2"), ("v1", "v2")):
                f1, f2 = lora[first], lora[second]
                if (f1.data is None) != (f2.data is None) or (first != "v1" and f1.data is None):
                    raise ValueError(f"{p}: LoRA factors {first}/{second} are missing")
                if f1.data is not None and (f1.K != C or f2.N != C or f2.K != f1.N):
                    raise ValueError(f"{p}: LoRA factors {first} [{f1.N}, {f1.K}] / {second} [{f2.N}, {f2.K}] are "
                                     f"not [D, {C}] / [{C}, D]")
            has_value = lora["v1"].data is not None
            refs.append(LayerRef(
                vec(lw.ln1[0], C, f"{p} ln1 weight"), vec(lw.ln1[1], C, f"{p} ln1 bias"),
                vec(lw.att_mix, 6 * C, f"{p} time-mix mixes"), vec(lw.ln2[0], C, f"{p} ln2 weight"),
                vec(lw.ln2[1], C, f"{p} ln2 bias"), vec(lw.ffn_mix, C, f"{p} FFN mix"),
                mat(lw.w_r, f"{p} receptance", (C, C)), mat(lw.w_k, f"{p} key", (C, C)),
                mat(lw.w_v, f"{p} value", (C, C)), mat(lw.w_out, f"{p} output", (C, C)),
                mat(lw.ffn_key, f"{p} FFN key", (F, C)), mat(lw.ffn_value, f"{p} FFN value", (C, F)),
                *(lora[name] for name in ("w1", "w2", "a1", "a2", "g1", "g2", "v1", "v2")),
                vec(lw.w0, C, f"{p} w0"), vec(lw.a0, C, f"{p} a0"),
                vec(lw.v0, C, f"{p} v0") if has_value else None,
                vec(lw.k_k, C, f"{p} k_k"), vec(lw.k_a, C, f"{p} k_a"), vec(lw.r_k, C, f"{p} r_k"),
                vec(lw.ln_x[0], C, f"{p} ln_x weight"), vec(lw.ln_x[1], C, f"{p} ln_x bias")))
        self._layers = (LayerRef * len(refs))(*refs)
        if emb.dtype not in (torch.float32, torch.bfloat16) or not emb.is_contiguous():
            raise ValueError(f"the embedding must be a contiguous float32/bfloat16 matrix, got {emb.dtype}")
        keep.append(emb)
        self._model = ModelRef(len(refs), C, H, N, F or 0, V, int(act_dtype == torch.bfloat16),
                               int(emb.dtype == torch.bfloat16), emb.data_ptr(), vec(ln_out[0], C, "ln_out weight"),
                               vec(ln_out[1], C, "ln_out bias"), mat(head, "head", (V, C)),
                               self._layers, ln_eps, gn_eps, log_decay_scale, 0.0)
        self._keep = keep               # every pointer above stays valid as long as this object lives
        self.L, self.C, self.H, self.N, self.V = len(refs), C, H, N, V
        self._ptrs = ctypes.c_void_p * len(refs)

    def __call__(self, tokens: torch.Tensor, att_x: list[torch.Tensor], wkv: list[torch.Tensor],
                 ffn_x: list[torch.Tensor]) -> torch.Tensor:
        """tokens [B] int64 (an id outside the vocabulary raises IndexError, nothing changed), the state's per-layer
        tensors [B, C],
        [B, H, N, N], [B, C] (float32, contiguous; advanced in place). Returns logits [B, V] float32."""
        B = tokens.shape[0]
        if not 0 < B <= STEP_ROWS:
            raise ValueError(f"the native step takes 1 to {STEP_ROWS} sequences, got {B}")
        tokens = tokens.to(device="cpu", dtype=torch.int64).contiguous()
        for name, ts, shape in (("att_x", att_x, (B, self.C)), ("wkv", wkv, (B, self.H, self.N, self.N)),
                                ("ffn_x", ffn_x, (B, self.C))):
            if len(ts) != self.L or any(t.shape != shape or t.dtype != torch.float32 or not t.is_contiguous()
                                        or t.device.type != "cpu" for t in ts):
                raise ValueError(f"state {name} must be {self.L} contiguous float32 CPU tensors of shape "
                                 f"{list(shape)}")
        logits = torch.empty(B, self.V, dtype=torch.float32)
        rc = self._lib.decode_step(ctypes.byref(self._model), B, tokens.data_ptr(),
                                   self._ptrs(*(t.data_ptr() for t in att_x)), self._ptrs(*(t.data_ptr() for t in wkv)),
                                   self._ptrs(*(t.data_ptr() for t in ffn_x)), logits.data_ptr())
        if rc == -2:
            bad = [int(t) for t in tokens if not 0 <= int(t) < self.V]
            raise IndexError(f"token id {bad[0]} is outside the vocabulary (ids 0 to {self.V - 1})")
        if rc != 0:
            raise MemoryError("the native decode step could not allocate its scratch")
        return logits
