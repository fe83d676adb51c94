"""Chunked (WY/UT) WKV-7: T tokens in ceil(T/L) sequential steps of batched matmuls.

Derivation (rwkv7-reference.md section 2.1), per head, within a chunk of L tokens starting from state S0,
with G_i = sum_{j<=i} w_j the inclusive cumulative log-decay and G-_i = G_{i-1}:

    u_i = S_{i-1} a_i                                   (the recurrence's "sa", the only coupling)
    U   = (I - A_ab)^{-1} (A_ak V + (A * e^{G-}) S0^T)  = U0 + W S0^T
    Y   = (R * e^{G}) S0^T + A_rk V + A_rb U
    S_L = S0 diag(e^{G_L}) + V^T (K * e^{G_L - G}) + U^T (B * e^{G_L - G})

with A_xy[i, j] = sum_d x_i[d] y_j[d] e^{G_i[d] - G_j[d]} (j <= i for r-rows, j < i for a-rows, using G- for
a-rows). Everything except the S0 terms is computed for all chunks at once; only a short loop over chunks is
sequential. Exponents are taken relative to the middle of each chunk, so with RWKV-7's log-decay bound
(w >= -0.6065) and L = 64 no factor exceeds e^{19.4}: safe in fp32. Padding uses w = k = v = a = b = r = 0,
which leaves the state unchanged exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import check_inputs

DEFAULT_CHUNK = 64


def _to_chunks(x: torch.Tensor, n: int, L: int, pad: int) -> torch.Tensor:
    # [B, T, H, N] -> [B, H, n, L, N], zero-padded at the end
    x = x.transpose(1, 2)
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    B, H, _, N = x.shape
    return x.reshape(B, H, n, L, N)


def wkv7_chunked(r, w, k, v, a, b, state, *, chunk_len: int = DEFAULT_CHUNK):
    """Same contract as every WKV-7 backend (see kernels/__init__.py); exact to floating-point rounding."""
    B, T, H, N = check_inputs(r, w, k, v, a, b, state)
    dt = state.dtype
    if T == 0:
        return r.new_zeros((B, 0, H, N), dtype=dt), state
    L = min(chunk_len, T)
    n = -(-T // L)
    pad = n * L - T
    r, w, k, v, a, b = (_to_chunks(t.to(dt), n, L, pad) for t in (r, w, k, v, a, b))  # [B, H, n, L, N]

    G = torch.cumsum(w, dim=-2)                         # inclusive cumulative log-decay
    Gx = G - w                                          # exclusive
    Gl = G[..., -1:, :]                                 # [B, H, n, 1, N] whole-chunk log-decay
    Gm = G[..., L // 2: L // 2 + 1, :]                  # reference point keeps exponents small
    rq = r * torch.exp(G - Gm)
    aq = a * torch.exp(Gx - Gm)
    kq = k * torch.exp(Gm - G)
    bq = b * torch.exp(Gm - G)
    decay_to_end = torch.exp(Gl - G)
    kt, bt = k * decay_to_end, b * decay_to_end
    r0 = r * torch.exp(G)                                # readout of the chunk's starting state
    a0 = a * torch.exp(Gx)                               # "sa" against the chunk's starting state

    kq_t, bq_t = kq.transpose(-1, -2), bq.transpose(-1, -2)
    A_rk = torch.tril(rq @ kq_t)                         # [B, H, n, L, L]
    A_rb = torch.tril(rq @ bq_t)
    A_ak = torch.tril(aq @ kq_t, diagonal=-1)
    A_ab = torch.tril(aq @ bq_t, diagonal=-1)
    eye = torch.eye(L, dtype=dt, device=r.device)
    M = eye - A_ab                                       # unit lower-triangular, always invertible
    rhs = torch.cat((A_ak @ v, a0), dim=-1)              # solve both right-hand sides at once
    sol = torch.linalg.solve_triangular(M, rhs, upper=False, unitriangular=True)
    U0, W = sol[..., :N], sol[..., N:]                   # U = U0 + W S0^T
    Y_intra = A_rk @ v                                   # [B, H, n, L, N]
    chunk_decay = torch.exp(Gl)                          # [B, H, n, 1, N]

    S = state
    ys = []
    for c in range(n):
        St = S.transpose(-1, -2)                         # [B, H, K, V]
        U = torch.baddbmm(U0[:, :, c].reshape(B * H, L, N), W[:, :, c].reshape(B * H, L, N),
                          St.reshape(B * H, N, N)).view(B, H, L, N)
        ys.append(r0[:, :, c] @ St + Y_intra[:, :, c] + A_rb[:, :, c] @ U)
        S = (S * chunk_decay[:, :, c]
             + v[:, :, c].transpose(-1, -2) @ kt[:, :, c]
             + U.transpose(-1, -2) @ bt[:, :, c])
    y = torch.stack(ys, dim=2).reshape(B, H, n * L, N)[:, :, :T]
    return y.transpose(1, 2), S
