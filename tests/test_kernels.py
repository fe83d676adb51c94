"""WKV-7 backends: chunked and step against the token-by-token reference."""
import pytest
import torch

from kernels import available_backends, get_wkv7
from tests.conftest import rel_err

LOG_DECAY_SCALE = -0.6065306597126334


def make_inputs(B, T, H, N, dtype, seed=0, state_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    r, k, v = rnd(B, T, H, N), rnd(B, T, H, N) * 0.5, rnd(B, T, H, N)
    w = LOG_DECAY_SCALE * torch.sigmoid(rnd(B, T, H, N) * 4)       # the full RWKV-7 decay range
    kk = torch.nn.functional.normalize(rnd(B, T, H, N), dim=-1)
    alpha = torch.sigmoid(rnd(B, T, H, N))
    state = rnd(B, H, N, N) * state_scale                            # nonzero starting state
    return r, w, k, v, -kk, kk * alpha, state


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 5e-6), (torch.float64, 1e-13)])
@pytest.mark.parametrize("T", [1, 15, 16, 17, 64, 200])
def test_chunked_matches_reference(T, dtype, tol):
    args = make_inputs(2, T, 3, 64, dtype)
    y_ref, s_ref = get_wkv7("reference")(*args)
    y, s = get_wkv7("chunked")(*args)
    assert y.dtype == s.dtype == dtype
    assert y.shape == (2, T, 3, 64) and s.shape == (2, 3, 64, 64)
    assert rel_err(y, y_ref) < tol
    assert rel_err(s, s_ref) < tol


@pytest.mark.parametrize("chunk_len", [4, 16, 32, 128])
def test_chunked_any_chunk_length(chunk_len):
    args = make_inputs(1, 77, 2, 32, torch.float64, seed=3)
    y_ref, s_ref = get_wkv7("reference")(*args)
    y, s = get_wkv7("chunked")(*args, chunk_len=chunk_len)
    assert rel_err(y, y_ref) < 1e-12 and rel_err(s, s_ref) < 1e-12


def test_inputs_are_not_modified():
    args = make_inputs(1, 20, 2, 16, torch.float32)
    copies = [t.clone() for t in args]
    for name in ("reference", "chunked"):
        get_wkv7(name)(*args)
        assert all(torch.equal(a, c) for a, c in zip(args, copies)), name


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 5e-6), (torch.float64, 1e-13)])
def test_step_matches_reference(dtype, tol):
    args = make_inputs(4, 1, 3, 64, dtype, seed=5)
    y_ref, s_ref = get_wkv7("reference")(*args)
    y, s = get_wkv7("step")(*args)
    assert rel_err(y, y_ref) < tol and rel_err(s, s_ref) < tol
    state = args[-1].clone()
    y_inplace = get_wkv7("step_")(*args[:-1], state)
    assert rel_err(y_inplace, y_ref) < tol and rel_err(state, s_ref) < tol


def test_step_rejects_sequences():
    with pytest.raises(ValueError, match="exactly one token"):
        get_wkv7("step")(*make_inputs(1, 3, 1, 8, torch.float32))


def test_split_invariance_of_chunked():
    r, w, k, v, a, b, s0 = make_inputs(1, 100, 2, 32, torch.float64, seed=7)
    chunked = get_wkv7("chunked")
    y_all, s_all = chunked(r, w, k, v, a, b, s0)
    y1, s1 = chunked(r[:, :37], w[:, :37], k[:, :37], v[:, :37], a[:, :37], b[:, :37], s0)
    y2, s2 = chunked(r[:, 37:], w[:, 37:], k[:, 37:], v[:, 37:], a[:, 37:], b[:, 37:], s1)
    assert rel_err(torch.cat((y1, y2), 1), y_all) < 1e-12 and rel_err(s2, s_all) < 1e-12


def test_chunked_is_differentiable():
    args = [t.requires_grad_() for t in make_inputs(1, 9, 1, 4, torch.float64, seed=11, state_scale=0.5)]
    fn = lambda *xs: get_wkv7("chunked")(*xs, chunk_len=4)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6)


def test_registry_errors():
    assert {"reference", "chunked", "step"} <= set(available_backends())
    with pytest.raises(ValueError, match="unknown WKV-7 backend 'fast'.*available"):
        get_wkv7("fast")


def test_shape_errors():
    r, w, k, v, a, b, s = make_inputs(1, 4, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="state has shape"):
        get_wkv7("chunked")(r, w, k, v, a, b, s[:, :1])
    with pytest.raises(ValueError, match="k has shape"):
        get_wkv7("reference")(r, w, k[:, :2], v, a, b, s)
    with pytest.raises(ValueError, match="float32 or float64"):
        get_wkv7("chunked")(r, w, k, v, a, b, s.half())
