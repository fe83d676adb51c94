"""The fused Triton time mix (kernels/time_mix_triton.py) against the model's torch time mix (_time_mix_core).

Without CUDA it runs under the Triton interpreter, switched on by tests/test_triton.py's import (which skips this
module too when triton is missing); shapes are small: 4 heads of 32, a few tokens.
"""
from __future__ import annotations

import pytest
import torch

from tests.conftest import PARITY_SHAPES, rel_err
from tests.test_triton import CUDA, DEV  # importing it turns the interpreter on without CUDA

from kernels.time_mix_triton import TimeMixParams, time_mix_triton  # noqa: E402
from engine.model.rwkv7 import GROUP_NORM_EPS, LOG_DECAY_SCALE  # noqa: E402


@pytest.fixture(scope="module")
def torch_model(ckpt_dir):
    """The same checkpoint twice: torch ops (the ground truth) on CPU, and the triton backend on the test device."""
    from bench.random_checkpoint import write_checkpoint
    from engine import load_model
    path = ckpt_dir / "time-mix.pth"
    write_checkpoint(path, PARITY_SHAPES["c128-n32-v0present"], seed=4)
    return load_model(path, "cpu fp32", wkv_backend="chunked", native_kernels=False)


def projections(B, T, A, dtype, seed):
    """r, w_lora, k, v, a_lora, v_lora, v_first, g as the projections would give them, rounded to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda scale=1.0: (torch.randn(B, T, A, generator=g) * scale).to(dtype)  # noqa: E731
    return [rnd(), rnd(2.0), rnd(), rnd(), rnd(2.0), rnd(2.0), rnd(), rnd()]


def params_of(lw) -> TimeMixParams:
    return TimeMixParams(w0=lw.w0, a0=lw.a0, v0=lw.v0, k_k=lw.k_k, k_a=lw.k_a, r_k=lw.r_k.contiguous(),
                         ln_w=lw.ln_x[0], ln_b=lw.ln_x[1], eps=GROUP_NORM_EPS, log_decay_scale=LOG_DECAY_SCALE)


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 3, 16])
def test_fused_time_mix_matches_torch(torch_model, layer, dtype, T):
    """Layer 0 (no value residual) and 1, decode (T = 1) and prompt lengths, a nonzero state, fp32 and bf16
    projections: the output and the state in place equal _time_mix_core's on the same (rounded) inputs."""
    m = torch_model
    B, A = 2, m.config.dim_att
    lw = m.layers[layer]
    r, w_lora, k, v, a_lora, v_lora, v_first, g = projections(B, T, A, dtype, seed=10 * T + layer)
    if layer == 0:
        v_lora, v_first = None, None
    state = m.zero_state(B)
    for t in state.tensors():
        t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(3)))
    want_state = state.clone()
    f = (lambda t: None if t is None else t.float())  # noqa: E731 - the torch path takes fp32 projections
    want = m._time_mix_core(layer, lw, f(r), f(w_lora), f(k), f(v), f(a_lora), f(v_lora),
                            f(v_first) if layer else f(v), f(g), want_state)
    S = state.wkv[layer].to(DEV)
    got = time_mix_triton(*(None if t is None else t.to(DEV) for t in (r, w_lora, k, v, a_lora, v_lora, v_first, g)),
                          S, params_of_device(lw), out_dtype=torch.float32)
    assert got.shape == (B, T, A) and got.dtype == torch.float32
    assert rel_err(got.cpu(), want) < (2e-5 if CUDA else 2e-6)
    assert rel_err(S.cpu(), want_state.wkv[layer]) < (2e-5 if CUDA else 2e-6)


def params_of_device(lw) -> TimeMixParams:
    p = params_of(lw)
    move = lambda t: None if t is None else t.to(DEV)  # noqa: E731
    return TimeMixParams(**{name: move(getattr(p, name)) for name in ("w0", "a0", "v0", "k_k", "k_a", "r_k",
                                                                       "ln_w", "ln_b")},
                         eps=p.eps, log_decay_scale=p.log_decay_scale)


def test_fused_time_mix_on_a_strided_pool_view_and_out_dtype(torch_model):
    """Decode writes the layer's rows of the pool in place (other rows untouched) and returns the matmul dtype."""
    m = torch_model
    lw = m.layers[1]
    pool = torch.randn(4, m.config.n_head, m.config.head_size, m.config.head_size, device=DEV)
    before = pool.clone()
    ins = [t.to(DEV) for t in projections(2, 1, m.config.dim_att, torch.float32, seed=5)]
    out32 = time_mix_triton(*ins, pool[1:3].clone(), params_of_device(lw))
    out16 = time_mix_triton(*ins, pool[1:3], params_of_device(lw), out_dtype=torch.bfloat16)
    assert out16.dtype == torch.bfloat16 and rel_err(out16.float().cpu(), out32.cpu()) < 1e-2
    assert torch.equal(pool[0], before[0]) and torch.equal(pool[3], before[3])
    assert not torch.equal(pool[1:3], before[1:3])


def test_fused_time_mix_checks_its_inputs(torch_model):
    m = torch_model
    ins = projections(1, 1, m.config.dim_att, torch.float32, seed=6)
    S = torch.zeros(1, m.config.n_head, m.config.head_size, m.config.head_size)
    with pytest.raises(ValueError, match="come together"):
        time_mix_triton(*ins[:5], None, ins[6], ins[7], S, params_of(m.layers[1]))
    with pytest.raises(ValueError, match="fp32 state"):
        time_mix_triton(*ins, S.double(), params_of(m.layers[1]))


def test_model_decodes_through_the_fused_kernel(torch_model, ckpt_dir, monkeypatch):
    """wkv_backend="triton" runs decode (and prompts under 16 tokens) through the fused kernel, once per layer and
    forward: same logits and state as the torch ops, prompt of 5 then three steps at batch 2."""
    import kernels.time_mix_triton as tm
    from engine import load_model
    calls = []
    monkeypatch.setattr(tm, "time_mix_triton", lambda *a, **kw: calls.append(1) or time_mix_triton(*a, **kw))
    ours = load_model(ckpt_dir / "time-mix.pth", f"{DEV.type} fp32", wkv_backend="triton")
    tokens = torch.randint(0, ours.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(2))
    want, want_state = torch_model.forward(tokens[:, :5], None)
    got, state = ours.forward(tokens[:, :5].to(DEV), None)
    tol = 1e-4 if CUDA else 1e-5
    assert rel_err(got.cpu(), want) < tol
    for t in range(5, 8):
        want, want_state = torch_model.forward(tokens[:, t:t + 1], want_state)
        got, state = ours.forward(tokens[:, t:t + 1].to(DEV), state)
        assert rel_err(got.cpu(), want) < tol, t
    assert rel_err(state.wkv[1].cpu(), want_state.wkv[1]) < tol
    assert len(calls) == 4 * ours.config.n_layer
