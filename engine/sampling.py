"""Batched sampling: every row's own parameters applied in one vectorized pass over [B, V] logits."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.request import SamplingParams, TokenLogprob
from engine.structured import MaskBatch, apply_mask
from kernels import native

_NUCLEUS_PROBE = 64          # top-p is first tried within the top 64 tokens, which is exact whenever it suffices
_NUCLEUS_ROUNDS = 32         # rejection rounds for a wider nucleus before a row falls back to a full sort


@dataclass
class SamplerRow:
    """What the sampler needs about one sequence: its parameters, its RNG and its penalty counts row."""
    params: SamplingParams
    generator: torch.Generator
    counts: torch.Tensor | None = None      # [V] fp32 occurrence counts (decayed), when penalties are on

    @property
    def uses_penalties(self) -> bool:
        p = self.params
        return p.presence_penalty != 0 or p.frequency_penalty != 0


def make_generator(seed: int | None, index: int = 0) -> torch.Generator:
    """A per-sequence CPU generator: the same seed gives the same stream whatever the batch holds."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed((seed * 1_000_003 + index) % (2**63))
    return g


def sample(logits: torch.Tensor, rows: list[SamplerRow], want_logprobs: bool = True,
           mask: MaskBatch | None = None) -> tuple[list[int], torch.Tensor | None]:
    """Pick one token per row of ``logits`` [B, V] fp32; return (token ids, the model's log-probabilities
    [B, V] before any bias or penalty, or None when not wanted). ``logits`` is not modified.

    ``mask``: the grammar masks of the constrained rows, applied after biases and penalties and before
    temperature and the filters, so nothing revives a masked token (-inf stays -inf)."""
    B, V = logits.shape
    logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    x = _apply_biases(logits, rows)
    if mask is not None:
        x = logits.clone() if x is logits else x
        apply_mask(x, mask)
    tokens = [0] * B
    greedy = [i for i, r in enumerate(rows) if r.params.greedy]
    if greedy:
        for i, t in zip(greedy, _take_rows(x, greedy).argmax(-1).tolist()):
            tokens[i] = t
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        sub = [rows[i] for i in sampled]
        for i, t in zip(sampled, _sample_rows(_take_rows(x, sampled), sub)):
            tokens[i] = t
    for r, t in zip(rows, tokens):
        if r.counts is not None:
            if r.params.penalty_decay != 1.0:
                r.counts.mul_(r.params.penalty_decay)
            r.counts[t] += 1.0
    return tokens, logprobs


def _take_rows(x: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """x[idx] without a copy when idx is every row in order (the common case: one kind of request)."""
    return x if len(idx) == x.shape[0] else x.index_select(0, torch.tensor(idx))


def _apply_biases(x: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
    """Logit biases, bans and penalties on a copy of ``x`` (``x`` itself when there are none)."""
    if not any(r.params.logit_bias or r.params.banned_token_ids or r.counts is not None for r in rows):
        return x
    x = x.clone()
    rr, cc, vals = [], [], []
    for i, r in enumerate(rows):
        p = r.params
        for tok, bias in p.logit_bias:
            rr.append(i), cc.append(tok), vals.append(bias)
        for tok in p.banned_token_ids:
            rr.append(i), cc.append(tok), vals.append(float("-inf"))
        if r.counts is not None and r.uses_penalties:
            seen = (r.counts > 0).float()
            x[i] -= p.presence_penalty * seen + p.frequency_penalty * r.counts
    if rr:
        x.index_put_((torch.tensor(rr), torch.tensor(cc)), torch.tensor(vals, dtype=x.dtype), accumulate=True)
    return x


def _sample_rows(x: torch.Tensor, rows: list[SamplerRow]) -> list[int]:
    """Temperature, top-k, min-p, top-p, then inverse-CDF sampling with each row's own uniform draw.

    Each row draws its uniform first, from its own generator. Rows sampled with a temperature only go to the
    native sampler when it is loaded (kernels/native.py: no [B, V] temporaries; 4.5 -> 1.2 ms for 64 rows of
    65536), the others through the torch filters below; which way a row goes depends on its own parameters
    only, so a seed gives the same tokens whatever else is in the batch."""
    B, V = x.shape
    u = torch.cat([torch.rand(1, generator=r.generator) for r in rows])
    temps = torch.tensor([r.params.temperature for r in rows], dtype=torch.float32)
    tokens = torch.zeros(B, dtype=torch.long)
    plain = [i for i, r in enumerate(rows) if _plain(r.params, V)]
    if plain and x.dtype == torch.float32 and native.available():
        idx = torch.tensor(plain)
        picked = native.sample_rows(_take_rows(x, plain).contiguous(), temps[idx], u[idx])
        tokens[idx] = picked
        done = set(idx[picked >= 0].tolist())      # a row with no finite logit: the torch path decides
    else:
        done = set()
    others = [i for i in range(B) if i not in done]
    if others:
        idx = torch.tensor(others)
        tokens[idx] = _sample_filtered(_take_rows(x, others), [rows[i] for i in others], temps[idx], u[idx])
    return tokens.tolist()


def _sample_filtered(x: torch.Tensor, rows: list[SamplerRow], temps: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The torch path: softmax at each row's temperature, its filters, then inverse CDF with its draw u."""
    B, V = x.shape
    if bool((temps != 1.0).any()):
        x = x / temps.to(x.dtype).unsqueeze(1)
    probs = torch.softmax(x, dim=-1)                               # [B, V], a fresh tensor
    top_k = torch.tensor([r.params.top_k if r.params.top_k > 0 else V for r in rows])
    if (top_k < V).any():
        kmax = int(top_k.max())
        kth = probs.topk(kmax, dim=-1).values.gather(1, (top_k - 1).clamp(max=kmax - 1).unsqueeze(1))
        probs.masked_fill_(probs < kth, 0.0)
    min_p = torch.tensor([r.params.min_p for r in rows], dtype=x.dtype).unsqueeze(1)
    if (min_p > 0).any():
        probs.masked_fill_(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    top_p = torch.tensor([r.params.top_p for r in rows], dtype=x.dtype)
    tokens = torch.zeros(B, dtype=torch.long)
    in_window = torch.zeros(B, dtype=torch.bool)
    nucleus = (top_p < 1.0).nonzero().flatten()
    if nucleus.numel():                   # most rows' nucleus lies in the top 64: sample it there, exactly
        picked, fits = _nucleus_in_window(_take_rows(probs, nucleus.tolist()), top_p[nucleus], u[nucleus])
        tokens[nucleus[fits]] = picked[fits]
        in_window[nucleus[fits]] = True
    rest = (~in_window).nonzero().flatten()
    if rest.numel():                      # no top-p, or a wide one: a draw from the whole row first
        tokens[rest] = _inverse_cdf(_take_rows(probs, rest.tolist()), u[rest])
        wide = rest[top_p[rest] < 1.0]
        if wide.numel():
            tokens[wide] = _nucleus_by_rejection(_take_rows(probs, wide.tolist()), top_p[wide], tokens[wide],
                                                 [rows[i].generator for i in wide.tolist()])
    return tokens


def _plain(p: SamplingParams, V: int) -> bool:
    """Sampled with a temperature only (no top-k, min-p or top-p filter)."""
    return (p.top_k <= 0 or p.top_k >= V) and p.min_p == 0 and p.top_p >= 1.0


_CDF_BLOCK = 256


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row of probs [R, V] (not normalised, >= 0, some mass), the token where the cumulative mass first
    exceeds u [R] in [0, 1) times the row's total. Two levels (block sums, then one block's cumsum) instead
    of a cumsum over all V: the same draw up to the order of float additions, at a fraction of the memory
    traffic. Never returns a zero-probability token."""
    R, V = probs.shape
    nb = -(-V // _CDF_BLOCK)
    pad = nb * _CDF_BLOCK - V
    blocks = (F.pad(probs, (0, pad)) if pad else probs).view(R, nb, _CDF_BLOCK)
    csum = blocks.sum(-1).cumsum(-1)                                    # [R, nb]
    target = (u * csum[:, -1]).unsqueeze(1)                             # [R, 1], < the row's total
    b = torch.searchsorted(csum, target, right=True).clamp(max=nb - 1)  # csum[b-1] <= target < csum[b]
    before = torch.where(b > 0, csum.gather(1, (b - 1).clamp(min=0)), torch.zeros_like(target))
    inner = blocks.gather(1, b.unsqueeze(2).expand(R, 1, _CDF_BLOCK)).squeeze(1)   # [R, block]
    j = torch.searchsorted(inner.cumsum(-1), target - before, right=True)
    # rounding between the two levels can leave no index past the target: take the block's last positive one
    last = torch.where(inner > 0, torch.arange(_CDF_BLOCK, device=probs.device), -1).max(-1, keepdim=True).values
    picked = (b * _CDF_BLOCK + torch.minimum(j, last)).squeeze(1)
    # a row with no mass at all (cannot come from softmax and the filters, which keep the top token)
    return torch.where(last.squeeze(1) >= 0, picked, probs.argmax(-1))


def _nucleus_in_window(p: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor,
                       k: int = _NUCLEUS_PROBE) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p sampling within each row's k most likely tokens. p [R, V] >= 0, top_p and u [R].

    The nucleus is the smallest most-likely set whose mass reaches top_p of the row's mass; where it lies in
    the window (fits [R] True) the row's token is drawn from it by inverse CDF with u, in the window's
    most-likely-first order. Returns (tokens [R], fits [R]); tokens of rows that do not fit are meaningless.
    k = V is the exact full sort."""
    R, V = p.shape
    k = min(k, V)
    target = (top_p * p.sum(-1)).unsqueeze(1)                       # [R, 1]
    vals, idx = p.topk(k, dim=-1)                                   # [R, k] most likely first
    csum = vals.cumsum(-1)
    fits = (csum[:, -1:] >= target).squeeze(1) | (k == V)
    last = torch.searchsorted(csum, target).clamp(max=k - 1)       # [R, 1]: the nucleus is [0, last]
    mass = csum.gather(1, last)
    j = torch.minimum(torch.searchsorted(csum, u.unsqueeze(1) * mass, right=True), last)
    return idx.gather(1, j).squeeze(1), fits


def _nucleus_by_rejection(p: torch.Tensor, top_p: torch.Tensor, first: torch.Tensor,
                          generators: list[torch.Generator]) -> torch.Tensor:
    """Exact top-p sampling without sorting, for rows whose nucleus is wide (nearly flat distributions, where
    a sort of [64, 65536] takes ~160 ms and would stall every stream in the batch).

    ``first`` [R] is a token drawn from each whole row (p [R, V], >= 0). In the order most likely first (ties by
    token id), token i is in the nucleus exactly when the mass of the tokens before it is below top_p of the
    total; a drawn token outside it is rejected, and so is everything after it, and the row draws again (its
    own generator) from what is left. Every round's draw is proportional to p over a superset of the nucleus, so the accepted
    token is distributed as p restricted to the nucleus; each rejection removes at least the rejected token
    and typically half the rest, so rounds are few (after _NUCLEUS_ROUNDS the row is sorted instead)."""
    R, V = p.shape
    target = top_p * p.sum(-1)                                      # [R]
    tokens = first.clone()
    pending = torch.arange(R)
    index = torch.arange(V)
    for _ in range(_NUCLEUS_ROUNDS):
        q = p if len(pending) == R else p[pending]
        drawn = tokens[pending].unsqueeze(1)                        # [P, 1]
        pivot = q.gather(1, drawn)
        # the tokens ordered before the draw: more likely, or as likely with a smaller id (a tie class, common
        # with bf16 logits, is split like a sort would, instead of entering the nucleus whole)
        ahead = (q > pivot) | ((q == pivot) & (index < drawn))
        rejected = (q * ahead).sum(-1) >= target[pending]
        if not bool(rejected.any()):
            return tokens
        pending = pending[rejected]
        q = q[rejected] * ahead[rejected]                           # the first token in the order always survives
        u = torch.cat([torch.rand(1, generator=generators[i]) for i in pending.tolist()])
        tokens[pending] = _inverse_cdf(q, u)
    u = torch.cat([torch.rand(1, generator=generators[i]) for i in pending.tolist()])
    tokens[pending], _ = _nucleus_in_window(p[pending], top_p[pending], u, k=p.shape[1])
    return tokens


def on_device(row: SamplerRow) -> bool:
    """Whether ``sample_on_device`` can pick this row's token: no logit bias, bans or penalties (the host sampler
    keeps those, with logprobs and grammar masks, which the caller checks)."""
    p = row.params
    return not p.logit_bias and not p.banned_token_ids and row.counts is None


def draw_uniforms(rows: list[SamplerRow]) -> list[float]:
    """Each sampled row's uniform from its own generator, as _sample_rows draws it (greedy rows draw nothing: 0)."""
    return [0.0 if r.params.greedy else float(torch.rand(1, generator=r.generator)) for r in rows]


def sample_on_device(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                     min_p: torch.Tensor, greedy: torch.Tensor, u: torch.Tensor, *, filters: bool) -> torch.Tensor:
    """The sampler as fixed-shape tensor ops on the logits' device: no host synchronisation, no data-dependent
    shapes, so it runs inside a CUDA graph. Per row [B] tensors: temperature, top_k (<= 0: off), top_p, min_p,
    greedy (bool) and u (the row's uniform, ``draw_uniforms``); returns the token ids [B] (long).

    The same tokens as ``sample`` for the same uniforms: greedy rows take the argmax; the others softmax at their
    temperature, top-k and min-p filters, then inverse CDF in vocabulary order, or for top-p rows over the
    nucleus most likely first (``sample`` samples it the same way when it lies in the top 64 tokens, and for a
    wider nucleus draws again by rejection, another exact draw from the same distribution but not the same
    token). ``filters`` False (known on the host: no row has top-k, min-p or top-p) skips the sort."""
    B, V = logits.shape
    x = logits.float()
    temp = torch.where(greedy, torch.ones_like(temperature), temperature)
    probs = torch.softmax(x / temp.unsqueeze(1), dim=-1)
    if filters:
        vals, idx = probs.sort(dim=-1, descending=True)                       # [B, V] most likely first
        k = torch.where(top_k > 0, top_k.clamp(max=V), V)
        floor = torch.maximum(vals.gather(1, (k - 1).unsqueeze(1)), min_p.unsqueeze(1) * vals[:, :1])
        probs = torch.where(probs < floor, 0.0, probs)
        vals = torch.where(vals < floor, 0.0, vals)
        csum = vals.cumsum(-1)
        last = torch.searchsorted(csum, (top_p * csum[:, -1]).unsqueeze(1)).clamp(max=V - 1)   # nucleus [0, last]
        j = torch.minimum(torch.searchsorted(csum, u.unsqueeze(1) * csum.gather(1, last), right=True), last)
        nucleus = idx.gather(1, j).squeeze(1)
    picked = _inverse_cdf(probs, u)
    if filters:
        picked = torch.where(top_p < 1.0, nucleus, picked)
    return torch.where(greedy, x.argmax(-1), picked)


def top_logprobs(logprobs: torch.Tensor, row: int, token: int, k: int) -> TokenLogprob:
    """The sampled (or given) token's logprob with the k most likely alternatives at that position."""
    lp = logprobs[row]
    top: tuple = ()
    if k > 0:
        vals, idx = lp.topk(k)
        top = tuple(zip(idx.tolist(), vals.tolist()))
    return TokenLogprob(token_id=token, logprob=float(lp[token]), top=top)
