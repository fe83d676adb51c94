"""Token-by-token WKV-7 (the ground truth) and the single-token step used by decode."""
from __future__ import annotations

import torch

from kernels import check_inputs


def wkv7_step_(r, w, k, v, a, b, state):
    """One token, updating ``state`` in place (it may be a strided view): inputs [B, 1, H, N] -> y [B, 1, H, N].

    Both matrix-vector products read the old state: with S' = S diag(e^w) + v k^T + sa b^T,
    y = S' r = S (e^w * r) + v (k . r) + sa (b . r), so the state is read once and written once.
    """
    B, T, H, N = check_inputs(r, w, k, v, a, b, state)
    if T != 1:
        raise ValueError(f"the single-token step advances exactly one token, got T={T}; use the chunked backend")
    dt = state.dtype
    r, w, k, v, a, b = (t[:, 0].to(dt) for t in (r, w, k, v, a, b))  # [B, H, N]
    decay = torch.exp(w)
    # rows (S a)^T and (S (e^w * r))^T as [2, N] @ S^T: much faster than S @ [N, 2] for large B*H on CPU
    both = torch.stack((a, decay * r), dim=-2) @ state.transpose(-1, -2)  # [B, H, 2, N(i)]
    sa, y = both[..., 0, :], both[..., 1, :]
    state.mul_(decay.unsqueeze(-2))
    state.addcmul_(v.unsqueeze(-1), k.unsqueeze(-2)).addcmul_(sa.unsqueeze(-1), b.unsqueeze(-2))
    y = y + v * (k * r).sum(-1, keepdim=True) + sa * (b * r).sum(-1, keepdim=True)
    return y.unsqueeze(1)


def wkv7_step(r, w, k, v, a, b, state):
    """Functional single-token step (the registry's ``step``): returns (y [B, 1, H, N], new state)."""
    new_state = state.clone()
    y = wkv7_step_(r, w, k, v, a, b, new_state)
    return y, new_state


def wkv7_reference(r, w, k, v, a, b, state):
    """The recurrence exactly as written in kernels/__init__.py, one token at a time."""
    B, T, H, N = check_inputs(r, w, k, v, a, b, state)
    dt = state.dtype
    r, w, k, v, a, b = (t.to(dt) for t in (r, w, k, v, a, b))
    S = state
    ys = []
    for t in range(T):
        decay = torch.exp(w[:, t]).unsqueeze(-2)                    # [B, H, 1, N(j)]
        sa = S @ a[:, t].unsqueeze(-1)                              # [B, H, N(i), 1]
        S = S * decay + v[:, t].unsqueeze(-1) * k[:, t].unsqueeze(-2) + sa * b[:, t].unsqueeze(-2)
        ys.append((S @ r[:, t].unsqueeze(-1)).squeeze(-1))          # [B, H, N]
    y = torch.stack(ys, dim=1) if ys else r.new_zeros((B, 0, H, N))
    return y, S
