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
This is the token-by-token form; the chunked (WY) form for long prompts is not written yet.

On a machine without CUDA the kernels run on CPU tensors only under the Triton interpreter
(TRITON_INTERPRET=1 set before this module is imported), which is how the tests prove them in CI.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import check_inputs

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
def _wkv7_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr,     # [total, H, N], contiguous
                 s0_ptr, s0_sb, s0_sh, s0_si, s0_sj,            # initial states, any strides
                 s1_ptr, s1_sb, s1_sh, s1_si, s1_sj,            # final states (may alias s0: in place)
                 y_ptr,                                         # [total, H, N] fp32
                 cu_ptr, T,                                     # VARLEN: cu_seqlens [S + 1]; else every length T
                 H: tl.constexpr, N: tl.constexpr, BLOCK_V: tl.constexpr, VARLEN: tl.constexpr):
    pid_sh = tl.program_id(0)
    pid_v = tl.program_id(1)
    seq = pid_sh // H
    h = pid_sh % H
    if VARLEN:
        bos = tl.load(cu_ptr + seq).to(tl.int64)
        eos = tl.load(cu_ptr + seq + 1).to(tl.int64)
    else:
        bos = seq.to(tl.int64) * T
        eos = bos + T
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


def _block_v(N: int, device: torch.device, block_v: int | None) -> int:
    if block_v is None:      # on a GPU split the rows so B*H small still fills the SMs; one tile under the interpreter
        block_v = min(N, 16) if device.type == "cuda" else N
    if N & (N - 1) or block_v & (block_v - 1) or N % block_v or block_v < 1:
        raise ValueError(f"head size {N} and block_v {block_v} must be powers of two, block_v dividing N")
    return block_v


def _launch(ins, s0, s1, y, cu, T, n_seq, H, N, block_v):
    ins = [t.contiguous() for t in ins]
    grid = (n_seq * H, N // block_v)
    _wkv7_kernel[grid](*ins, s0, *s0.stride(), s1, *s1.stride(), y, cu, T,
                       H=H, N=N, BLOCK_V=block_v, VARLEN=cu is not None)


def wkv7_triton(r, w, k, v, a, b, state, *, block_v: int | None = None):
    """The registry's ``triton`` backend: [B, T, H, N] inputs, state never modified, returns (y, new_state)."""
    B, T, H, N = check_inputs(r, w, k, v, a, b, state)
    if state.dtype != torch.float32:
        raise ValueError(f"the Triton kernels keep an fp32 state, got {state.dtype}")
    bv = _block_v(N, state.device, block_v)
    y = torch.empty((B, T, H, N), dtype=torch.float32, device=state.device)
    new_state = torch.empty((B, H, N, N), dtype=torch.float32, device=state.device)
    if B == 0:
        return y, new_state
    _launch((r, w, k, v, a, b), state, new_state, y, None, T, B, H, N, bv)
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


def wkv7_triton_varlen(r, w, k, v, a, b, state, cu_seqlens, *, block_v: int | None = None):
    """Packed sequences of different lengths in one launch; see the module docstring for the layout."""
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
        _launch((r, w, k, v, a, b), state, new_state, y, cu.contiguous(), 0, S, H, N, bv)
    return y, new_state
