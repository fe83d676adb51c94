"""Batched sampling: greedy, seeds independent of the batch, filters, penalties, biases, logprobs."""
import pytest
import torch

from engine.errors import InvalidRequest
from engine.request import SamplingParams
from engine.sampling import SamplerRow, make_generator, sample, top_logprobs

V = 50


def logits(B, seed=0):
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3


def row(seed=None, index=0, **kw):
    p = SamplingParams(seed=seed, **kw)
    counts = torch.zeros(V) if (p.presence_penalty or p.frequency_penalty) else None
    return SamplerRow(p, make_generator(seed, index), counts)


def test_greedy_is_argmax():
    x = logits(4)
    toks, lp = sample(x, [row(temperature=0) for _ in range(4)])
    assert toks == x.argmax(-1).tolist()
    assert torch.allclose(lp, torch.log_softmax(x, -1))


def test_seed_reproducible_whatever_the_batch():
    x = logits(8, seed=1)
    alone = [sample(x[3:4], [row(seed=7)])[0][0] for _ in range(1)]
    rows = [row(seed=s) for s in range(8)]
    rows[3] = row(seed=7)
    in_batch = sample(x, rows)[0][3]
    assert alone[0] == in_batch
    # a sequence of draws stays identical too
    r1, r2 = row(seed=5), row(seed=5)
    a = [sample(x[i:i + 1], [r1])[0][0] for i in range(8)]
    b = [sample(x[[i, 0, 1]], [r2, row(), row()])[0][0] for i in range(8)]
    assert a == b


def test_top_k_one_and_tiny_top_p_and_min_p_are_greedy():
    x = logits(3, seed=2)
    greedy = x.argmax(-1).tolist()
    assert sample(x, [row(top_k=1) for _ in range(3)])[0] == greedy
    assert sample(x, [row(top_p=1e-6) for _ in range(3)])[0] == greedy
    assert sample(x, [row(min_p=1.0) for _ in range(3)])[0] == greedy


def test_top_k_limits_the_support():
    x = logits(1, seed=3)
    allowed = set(x[0].topk(5).indices.tolist())
    r = row(seed=1, top_k=5, temperature=2.0)
    assert {sample(x, [r])[0][0] for _ in range(200)} <= allowed


def test_top_p_keeps_the_nucleus_only():
    x = torch.tensor([[5.0, 4.0, 0.0] + [-10.0] * (V - 3)])
    p = torch.softmax(x, -1)[0]
    assert p[0] + p[1] > 0.95
    r = row(seed=2, top_p=0.95)
    assert {sample(x, [r])[0][0] for _ in range(200)} <= {0, 1}


def test_logit_bias_and_banned_tokens():
    x = logits(2, seed=4)
    forced = sample(x, [row(temperature=0, logit_bias=((7, 100.0),)), row(temperature=0)])[0]
    assert forced[0] == 7 and forced[1] == x[1].argmax()
    top = int(x[0].argmax())
    assert sample(x[:1], [row(temperature=0, banned_token_ids=(top,))])[0][0] != top


def test_presence_and_frequency_penalties():
    x = torch.zeros(1, V)
    x[0, 3] = 1.0
    r = row(temperature=0, presence_penalty=2.0)
    first = sample(x, [r])[0][0]
    second = sample(x, [r])[0][0]
    assert first == 3 and second != 3                      # 1.0 - 2.0 < 0
    r = row(temperature=0, frequency_penalty=0.4, penalty_decay=0.5)
    assert [sample(x, [r])[0][0] for _ in range(3)] == [3, 3, 3]   # decayed counts stay below 2.5
    assert r.counts[3] == pytest.approx(1 + 0.5 + 0.25)


def test_logprobs_with_alternatives():
    x = logits(1, seed=5)
    _, lp = sample(x, [row(temperature=0)])
    t = top_logprobs(lp, 0, 11, 3)
    ref = torch.log_softmax(x[0], -1)
    assert t.token_id == 11 and t.logprob == pytest.approx(float(ref[11]))
    assert [i for i, _ in t.top] == ref.topk(3).indices.tolist()


@pytest.mark.parametrize("kw,param", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -1}, "top_k"),
    ({"logprobs": 21}, "logprobs"), ({"stop": ("",)}, "stop"), ({"max_tokens": -1}, "max_tokens"),
    ({"logit_bias": ((1, 101.0),)}, "logit_bias"), ({"presence_penalty": 3}, "presence_penalty"),
    ({"penalty_decay": 0}, "penalty_decay"), ({"seed": 2**64}, "seed"), ({"temperature": float("nan")}, "temperature"),
])
def test_invalid_params_name_the_field(kw, param):
    with pytest.raises(InvalidRequest) as info:
        SamplingParams(**kw)
    assert info.value.param == param


def test_inverse_cdf_matches_a_full_cumsum_and_skips_zero_mass():
    """The two-level inverse CDF picks what a float64 cumsum over the whole row picks, on rows with zeros
    at block edges, a vocabulary that is not a multiple of the block, and u near 0 and 1."""
    from engine.sampling import _inverse_cdf
    g = torch.Generator().manual_seed(0)
    for V in (1000, 65536, 307):
        probs = torch.rand(6, V, generator=g) ** 4
        probs[0, :300] = 0.0                                  # leading zeros across a block edge
        probs[1, 256:512] = 0.0                               # a whole empty block
        probs[2] = 0.0
        probs[2, V - 1] = 0.3                                 # all mass on the last token
        probs[3] = 0.0
        probs[3, V // 2] = 1.0
        for u in torch.tensor([0.0, 1e-7, 0.25, 0.5, 0.999999, 0.9999999]).tolist():
            got = _inverse_cdf(probs, torch.full((6,), u))
            cdf = probs.double().cumsum(-1)
            want = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1).clamp(max=V - 1)
            assert (probs.gather(1, got.unsqueeze(1)) > 0).all(), (V, u)
            # float32 block sums vs a float64 cumsum may disagree only at a boundary: then the neighbour
            assert ((got - want).abs() <= 1).all() and (got == want).float().mean() >= 5 / 6, (V, u, got, want)
    assert _inverse_cdf(torch.zeros(2, 300), torch.tensor([0.5, 0.1])).tolist() == [0, 0]


def _exact_nucleus(p: torch.Tensor, top_p: float) -> torch.Tensor:
    """Reference: sort, keep the prefix until the mass reaches top_p (float64)."""
    vals, idx = p.double().sort(descending=True)
    n = int((vals.cumsum(0) < top_p * vals.sum()).sum()) + 1
    keep = torch.zeros_like(p, dtype=torch.bool)
    keep[idx[:n]] = True
    return keep


def test_wide_nucleus_is_sampled_exactly():
    """A nearly flat row's nucleus holds far more than the 64-token window: it is sampled by rejection, only
    from the nucleus, in proportion to the probabilities, reproducibly per seed whatever else is batched."""
    from engine.sampling import _NUCLEUS_PROBE, _nucleus_in_window
    Vw = 3000
    x = torch.randn(1, Vw, generator=torch.Generator().manual_seed(0)) * 0.5
    p = torch.softmax(x[0], -1)
    keep = _exact_nucleus(p, 0.6)
    assert keep.sum() > 10 * _NUCLEUS_PROBE
    assert not _nucleus_in_window(p.unsqueeze(0), torch.tensor([0.6]), torch.tensor([0.5]))[1].item()  # too wide
    r = SamplerRow(SamplingParams(seed=3, top_p=0.6), make_generator(3))
    draws = torch.tensor([sample(x, [r], want_logprobs=False)[0][0] for _ in range(6000)])
    assert keep[draws].all()
    # proportional to p inside the nucleus: compare the mass of its top and bottom halves by probability
    inside = keep.nonzero().flatten()
    order = inside[p[inside].argsort(descending=True)]
    upper = set(order[: len(order) // 2].tolist())
    want = float(p[order[: len(order) // 2]].sum() / p[inside].sum())
    got = sum(int(d) in upper for d in draws.tolist()) / len(draws)
    assert abs(got - want) < 0.03, (got, want)
    # the same seed alone and next to a peaked row (window path) and a greedy row
    peaked = torch.full((1, Vw), -20.0)
    peaked[0, :3] = torch.tensor([3.0, 2.0, 1.0])
    rows_a = [SamplerRow(SamplingParams(seed=11, top_p=0.6), make_generator(11))]
    rows_b = [SamplerRow(SamplingParams(seed=5, top_p=0.9), make_generator(5)),
              SamplerRow(SamplingParams(seed=11, top_p=0.6), make_generator(11)),
              SamplerRow(SamplingParams(temperature=0), make_generator(None))]
    alone = [sample(x, rows_a, want_logprobs=False)[0][0] for _ in range(50)]
    batched = [sample(torch.cat([peaked, x, peaked]), rows_b, want_logprobs=False)[0] for _ in range(50)]
    assert alone == [b[1] for b in batched]
    assert all(b[0] in (0, 1) and b[2] == 0 for b in batched)


def test_rejection_rounds_end_in_the_exact_sort(monkeypatch):
    """With no rounds left, a wide-nucleus row is finished by the full sort: still only nucleus tokens."""
    import engine.sampling as sampling
    monkeypatch.setattr(sampling, "_NUCLEUS_ROUNDS", 0)
    x = torch.randn(2, 2000, generator=torch.Generator().manual_seed(1)) * 0.3
    keep = [_exact_nucleus(torch.softmax(x[i], -1), 0.3) for i in range(2)]
    rows = [SamplerRow(SamplingParams(seed=i, top_p=0.3), make_generator(i)) for i in range(2)]
    for _ in range(200):
        toks = sample(x, rows, want_logprobs=False)[0]
        assert keep[0][toks[0]] and keep[1][toks[1]]


@pytest.mark.parametrize("Vt", [60, 1000])          # the top-64 window, and the rejection path
def test_top_p_splits_a_tie_class_like_a_sort(Vt):
    """One likely token and a tail of equal ones (bf16 logits tie often): top_p keeps the likely token and only
    as many tied ones as the mass needs, on both paths, so the likely token is drawn in proportion."""
    p_top = 0.3
    p = torch.full((Vt,), (1 - p_top) / (Vt - 1))
    p[17] = p_top
    x = p.log().unsqueeze(0)
    m = int(torch.ceil(torch.tensor((0.5 - p_top) / float(p[0]))).item())      # tied tokens the nucleus needs
    want = p_top / (p_top + m * float(p[0]))
    r = SamplerRow(SamplingParams(seed=9, top_p=0.5), make_generator(9))
    draws = [sample(x, [r], want_logprobs=False)[0][0] for _ in range(4000)]
    got = sum(d == 17 for d in draws) / len(draws)
    assert abs(got - want) < 0.04, (got, want)
    assert len(set(draws)) <= m + 2                  # the nucleus (ties at its edge may round either way)
