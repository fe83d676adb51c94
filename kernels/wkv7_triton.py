"""WKV-7 in Triton: one kernel for prompts (packed, variable lengths) and the single-token decode step.

Same signature and conventions as every backend in kernels/__init__.py (``w`` is the natural-log decay, the
state is [B, H, N, N] fp32 with rows = value index i, inputs of any float dtype are read as fp32).

Three entry points:

    wkv7_triton(r, w, k, v, a, b, state)   -> (y, new_state)   the registry's ``triton`` (sequences, [B, T, H, N])
    wkv7_triton_step_(r, w, k, v, a, b, state) -> y             the registry's ``triton_step_`` (T = 1, in place)
    wkv7_triton_varlen(r, w, k, v, a, b, state, cu_seqlens) -> (y, new_state)

``wkv7_triton_varlen`` runs several sequences of different lengths in one launch: r..b are packed
[total, H, N] (sequence s is rows ``cu_seqlens[s]:cu_seqlens[s+1]``), ``state`` is [S, H, N, N] (each
sequence's initial state), ``cu_seqlens`` is int32/int64 [S + 1], starting at 0 and non-decreasing. It returns
y [total, H, N] fp32 and the final states [S, H, N, N] fp32; an empty sequence returns its initial state.

How the kernel works: the recurrence acts on the state from the right (S <- S (diag(e^w) + a b^T) + v k^T), so
every row i of S evolves independently of the others. One program owns a tile of BLOCK_V rows of one
(sequence, head) state, keeps it in registers for the whole sequence and walks the tokens one at a time:
the state is read once at the start and written once at the end. The decode step is the same kernel with
T = 1, reading and writing the caller's state in place (it may be a strided view into a state pool).

Prompts of 16 tokens or more run the chunked (WY) form instead, the algorithm of kernels/wkv7_chunked.py on
the same row tiles: per chunk of L = 16 tokens, the intra-chunk [L, L] interactions as tl.dot products, the
"sa" terms U by forward substitution through the unit lower-triangular (I - A_ab), and one state update per
chunk (exponents taken relative to the chunk's middle token, as there). Matrix products use
input_precision="ieee", never TF32, so the fp32 recurrence stays exact to rounding. Which form is faster on
a GPU is not measured yet (bench/gpu.py); ``chunk_len=0`` forces the token loop.

On a machine without CUDA the kernels run on CPU tensors only under the Triton interpreter
(TRITON_INTERPRET=1 set before this module is imported), which is how the tests prove them in CI.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import check_inputs

DEFAULT_CHUNK = 16
__all__ = ["wkv7_triton", "wkv7_triton_step_", "wkv7_triton_varlen", "ensure_loadable", "interpreting"]


def ensure_loadable() -> None:
    """The registry's hook: the kernels need a CUDA device, or the Triton interpreter for CPU tensors."""
    if not torch.cuda.is_available() and not interpreting():
        raise RuntimeError("Triton kernels need a CUDA device (or TRITON_INTERPRET=1 set before kernels.wkv7_triton "
                           "is imported, to run them slowly on CPU)")


def interpreting() -> bool:
    """Whether the kernels were built for the Triton interpreter (CPU tensors) rather than compiled for a GPU."""
    return type(_wkv7_kernel).__name__ == "InterpretedFunction"


@triton.jit
def _program_sequence(cu_ptr, T, H: tl.constexpr, VARLEN: tl.constexpr):
    """(sequence, head, first token, end token) of this program: program axis 0 walks sequence x head."""
    pid_sh = tl.program_id(0)
    seq = pid_sh // H
    h = pid_sh % H
    if VARLEN:
        bos = tl.load(cu_ptr + seq).to(tl.int64)
        eos = tl.load(cu_ptr + seq + 1).to(tl.int64)
    else:
        bos = seq.to(tl.int64) * T
        eos = bos + T
    return seq, h, bos, eos


@triton.jit
def _wkv7_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr,     # [total, H, N], contiguous
                 s0_ptr, s0_sb, s0_sh, s0_si, s0_sj,            # initial states, any strides
                 s1_ptr, s1_sb, s1_sh, s1_si, s1_sj,            # final states (may alias s0: in place)
                 y_ptr,                                         # [total, H, N] fp32
                 cu_ptr, T,                                     # VARLEN: cu_seqlens [S + 1]; else every length T
                 H: tl.constexpr, N: tl.constexpr, BLOCK_V: tl.constexpr, VARLEN: tl.constexpr):
    seq, h, bos, eos = _program_sequence(cu_ptr, T, H, VARLEN)
    pid_v = tl.program_id(1)
    offs_i = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)            # value index: the state rows of this tile
    offs_j = tl.arange(0, N)                                    # key index: the whole row
    s0 = s0_ptr + seq * s0_sb + h * s0_sh
    S = tl.load(s0 + offs_i[:, None] * s0_si + offs_j[None, :] * s0_sj).to(tl.float32)   # [BLOCK_V, N]
    for t in range(bos, eos):
        base = (t * H + h) * N
        r = tl.load(r_ptr + base + offs_j).to(tl.float32)
        w = tl.load(w_ptr + base + offs_j).to(tl.float32)
        k = tl.load(k_ptr + base + offs_j).to(tl.float32)
        a = tl.load(a_ptr + base + offs_j).to(tl.float32)
        b = tl.load(b_ptr + base + offs_j).to(tl.float32)
        v = tl.load(v_ptr + base + offs_i).to(tl.float32)
        sa = tl.sum(S * a[None, :], axis=1)                     # (S a)_i from the old state
        S = S * tl.exp(w)[None, :] + v[:, None] * k[None, :] + sa[:, None] * b[None, :]
        y = tl.sum(S * r[None, :], axis=1)                      # (S r)_i from the new state
        tl.store(y_ptr + base + offs_i, y)
    s1 = s1_ptr + seq * s1_sb + h * s1_sh
    tl.store(s1 + offs_i[:, None] * s1_si + offs_j[None, :] * s1_sj, S)


@triton.jit
def _wkv7_chunk_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr,
                       s0_ptr, s0_sb, s0_sh, s0_si, s0_sj,
                       s1_ptr, s1_sb, s1_sh, s1_si, s1_sj,
                       y_ptr, cu_ptr, T,
                       H: tl.constexpr, N: tl.constexpr, BLOCK_V: tl.constexpr, L: tl.constexpr,
                       VARLEN: tl.constexpr):
    """The chunked (WY) form of kernels/wkv7_chunked.py, L tokens per step, same arguments as _wkv7_kernel."""
    seq, h, bos, eos = _program_sequence(cu_ptr, T, H, VARLEN)
    pid_v = tl.program_id(1)
    offs_i = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_j = tl.arange(0, N)
    offs_t = tl.arange(0, L)
    causal = offs_t[:, None] >= offs_t[None, :]
    strict = offs_t[:, None] > offs_t[None, :]
    s0 = s0_ptr + seq * s0_sb + h * s0_sh
    S = tl.load(s0 + offs_i[:, None] * s0_si + offs_j[None, :] * s0_sj).to(tl.float32)   # [BLOCK_V, N]
    for c0 in range(bos, eos, L):
        tok = c0 + offs_t
        live = tok < eos                                        # padding: all zeros leave the state unchanged
        row = (tok * H + h) * N
        kmask = live[:, None]
        key_at = row[:, None] + offs_j[None, :]
        r = tl.load(r_ptr + key_at, mask=kmask, other=0.0).to(tl.float32)      # [L, N]
        w = tl.load(w_ptr + key_at, mask=kmask, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + key_at, mask=kmask, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + key_at, mask=kmask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + key_at, mask=kmask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + row[:, None] + offs_i[None, :], mask=kmask, other=0.0).to(tl.float32)  # [L, BV]
        G = tl.cumsum(w, axis=0)                                # inclusive cumulative log-decay
        Gx = G - w                                              # exclusive
        Gl = tl.sum(w, axis=0)                                  # [N] the whole chunk's
        Gm = tl.sum(tl.where(offs_t[:, None] == L // 2, G, 0.0), axis=0)   # reference point: small exponents
        rq = r * tl.exp(G - Gm[None, :])
        aq = a * tl.exp(Gx - Gm[None, :])
        kq = k * tl.exp(Gm[None, :] - G)
        bq = b * tl.exp(Gm[None, :] - G)
        A_rk = tl.where(causal, tl.dot(rq, tl.trans(kq), input_precision="ieee"), 0.0)      # [L, L]
        A_rb = tl.where(causal, tl.dot(rq, tl.trans(bq), input_precision="ieee"), 0.0)
        A_ak = tl.where(strict, tl.dot(aq, tl.trans(kq), input_precision="ieee"), 0.0)
        A_ab = tl.where(strict, tl.dot(aq, tl.trans(bq), input_precision="ieee"), 0.0)
        St = tl.trans(S)                                        # [N, BLOCK_V]
        # U[t] = S_{t-1} a_t for this tile's rows: (I - A_ab) U = A_ak V + (a e^{Gx}) S0^T, by forward substitution
        U = tl.dot(A_ak, v, input_precision="ieee") + tl.dot(a * tl.exp(Gx), St, input_precision="ieee")
        for t in range(1, L):
            coef = tl.sum(tl.where(offs_t[:, None] == t, A_ab, 0.0), axis=0)         # row t of A_ab, by column
            add = tl.sum(coef[:, None] * U, axis=0)                                   # [BLOCK_V]
            U = tl.where(offs_t[:, None] == t, U + add[None, :], U)
        y = (tl.dot(r * tl.exp(G), St, input_precision="ieee") + tl.dot(A_rk, v, input_precision="ieee")
             + tl.dot(A_rb, U, input_precision="ieee"))                               # [L, BLOCK_V]
        tl.store(y_ptr + row[:, None] + offs_i[None, :], y, mask=kmask)
        to_end = tl.exp(Gl[None, :] - G)
        S = (S * tl.exp(Gl)[None, :] + tl.dot(tl.trans(v), k * to_end, input_precision="ieee")
             + tl.dot(tl.trans(U), b * to_end, input_precision="ieee"))
    s1 = s1_ptr + seq * s1_sb + h * s1_sh
    tl.store(s1 + offs_i[:, None] * s1_si + offs_j[None, :] * s1_sj, S)


def _block_v(N: int, device: torch.device, block_v: int | None) -> int:
    if block_v is None:      # on a GPU split the rows so B*H small still fills the SMs; one tile under the interpreter
        block_v = min(N, 16) if device.type == "cuda" else N
    if N & (N - 1) or block_v & (block_v - 1) or N % block_v or block_v < 1:
        raise ValueError(f"head size {N} and block_v {block_v} must be powers of two, block_v dividing N")
    return block_v


def _launch(ins, s0, s1, y, cu, T, n_seq, H, N, block_v, chunk_len=0):
    ins = [t.contiguous() for t in ins]
    grid = (n_seq * H, N // block_v)
    args = (*ins, s0, *s0.stride(), s1, *s1.stride(), y, cu, T)
    if chunk_len:
        _wkv7_chunk_kernel[grid](*args, H=H, N=N, BLOCK_V=block_v, L=chunk_len, VARLEN=cu is not None)
    else:
        _wkv7_kernel[grid](*args, H=H, N=N, BLOCK_V=block_v, VARLEN=cu is not None)


def _chunk(T: int, N: int, block_v: int, chunk_len: int | None) -> int:
    """The chunk length to run (0: token by token). Default: chunks of 16 from 16 tokens on; tl.dot needs
    every matrix side >= 16, so smaller heads or row tiles run token by token."""
    if chunk_len is None:
        chunk_len = DEFAULT_CHUNK if T >= DEFAULT_CHUNK else 0
    if chunk_len and (chunk_len & (chunk_len - 1) or chunk_len < 16 or N < 16 or block_v < 16):
        if chunk_len != DEFAULT_CHUNK:
            raise ValueError(f"chunk_len {chunk_len} must be a power of two >= 16, with head size and block_v >= 16")
        chunk_len = 0
    return chunk_len


def wkv7_triton(r, w, k, v, a, b, state, *, block_v: int | None = None, chunk_len: int | None = None):
    """The registry's ``triton`` backend: [B, T, H, N] inputs, state never modified, returns (y, new_state).

    chunk_len: None = the chunked form in chunks of 16 when T >= 16, else token by token; 0 = token by token."""
    B, T, H, N = check_inputs(r, w, k, v, a, b, state)
    if state.dtype != torch.float32:
        raise ValueError(f"the Triton kernels keep an fp32 state, got {state.dtype}")
    bv = _block_v(N, state.device, block_v)
    y = torch.empty((B, T, H, N), dtype=torch.float32, device=state.device)
    new_state = torch.empty((B, H, N, N), dtype=torch.float32, device=state.device)
    if B == 0:
        return y, new_state
    _launch((r, w, k, v, a, b), state, new_state, y, None, T, B, H, N, bv, _chunk(T, N, bv, chunk_len))
    return y, new_state


def wkv7_triton_step_(r, w, k, v, a, b, state, *, block_v: int | None = None):
    """The registry's ``triton_step_``: one token, ``state`` updated in place (a strided view is fine); returns y."""
    B, T, H, N = check_inputs(r, w, k, v, a, b, state)
    if T != 1:
        raise ValueError(f"the single-token step advances exactly one token, got T={T}; use the triton backend")
    if state.dtype != torch.float32:
        raise ValueError(f"the Triton kernels keep an fp32 state, got {state.dtype}")
    bv = _block_v(N, state.device, block_v)
    y = torch.empty((B, 1, H, N), dtype=torch.float32, device=state.device)
    if B:
        _launch((r, w, k, v, a, b), state, state, y, None, 1, B, H, N, bv)
    return y


def wkv7_triton_varlen(r, w, k, v, a, b, state, cu_seqlens, *, block_v: int | None = None,
                       chunk_len: int | None = None):
    """Packed sequences of different lengths in one launch; see the module docstring for the layout.

    chunk_len: None = chunks of 16 (each sequence's last chunk padded), 0 = token by token."""
    if r.dim() != 3:
        raise ValueError(f"packed inputs must be [total, H, N], got shape {tuple(r.shape)}")
    S = cu_seqlens.numel() - 1
    total, H, N = r.shape
    for name, t in (("w", w), ("k", k), ("v", v), ("a", a), ("b", b)):
        if t.shape != r.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(r.shape)} like r")
    if S < 0 or state.shape != (S, H, N, N) or state.dtype != torch.float32:
        raise ValueError(f"state must be fp32 [S, H, N, N] with S = len(cu_seqlens) - 1 = {S}, "
                         f"got {state.dtype} {tuple(state.shape)}")
    cu = cu_seqlens.to(device=state.device)
    if cu.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu.dtype}")
    lengths = cu_seqlens.detach().cpu()     # one host read, checked before any out-of-bounds launch
    if S >= 0 and (lengths[0] != 0 or lengths[-1] != total or bool((lengths.diff() < 0).any())):
        raise ValueError(f"cu_seqlens must start at 0, not decrease and end at total = {total}")
    bv = _block_v(N, state.device, block_v)
    y = torch.zeros((total, H, N), dtype=torch.float32, device=state.device)
    new_state = torch.empty((S, H, N, N), dtype=torch.float32, device=state.device)
    if S:
        chunk = _chunk(DEFAULT_CHUNK, N, bv, chunk_len)         # lengths are not known here: chunks by default
        _launch((r, w, k, v, a, b), state, new_state, y, cu.contiguous(), 0, S, H, N, bv, chunk)
    return y, new_state
