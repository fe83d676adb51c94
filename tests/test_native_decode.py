"""The native work between a layer's big products (kernels/native_decode.py, kernels/csrc/decode_cpu.cpp): the
residual + layer norm + token-shift call and the LoRA chains + time mix call, each against torch ops, and the
model's single-token path through them against the torch ops at the batch sizes on both sides of DECODE_ROWS."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from bench.random_checkpoint import write_checkpoint
from engine import load_model
from engine.model import rwkv7
from kernels import native, native_decode
from tests.conftest import PARITY_SHAPES, rel_err

pytestmark = pytest.mark.skipif(os.environ.get("GOOSE_NATIVE_KERNELS") == "0",
                                reason="GOOSE_NATIVE_KERNELS=0 in the environment")


def _torch_mix(x, dx, ln, prev, mix, dtype):
    x = x + dx.float() if dx is not None else x.clone()
    h = F.layer_norm(x, (x.shape[-1],), ln[0], ln[1], 1e-5)
    shifted = torch.cat((prev.unsqueeze(1), h[:, :-1]), 1)
    out = (h + (shifted - h) * mix.view(mix.shape[0], 1, 1, -1)).to(dtype)
    return x, h[:, -1], out


@pytest.mark.parametrize("B,T", [(1, 1), (3, 1), (2, 5)])
@pytest.mark.parametrize("dx_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_residual_ln_mix_matches_torch(B, T, dx_dtype, out_dtype):
    g = torch.Generator().manual_seed(B * 10 + T)
    C, M = 96, 6
    x = torch.randn(B, T, C, generator=g) * 3 + 1
    dx = None if dx_dtype is None else torch.randn(B, T, C, generator=g).to(dx_dtype)
    ln = (torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g) * 0.1)
    prev, mix = torch.randn(B, C, generator=g), torch.rand(M, C, generator=g)
    want_x, want_prev, want = _torch_mix(x, dx, ln, prev, mix, out_dtype)
    got = native_decode.residual_ln_mix(x, dx, ln, 1e-5, prev, mix, out_dtype)
    assert got.shape == (M, B, T, C) and got.dtype == out_dtype
    assert rel_err(x, want_x) < 1e-6 and rel_err(prev, want_prev) < 1e-6
    assert rel_err(got.float(), want.float()) < (1e-6 if out_dtype == torch.float32 else 1e-2)


def test_residual_ln_mix_refuses_bad_rows():
    x, prev, mix = torch.zeros(2, 1, 8), torch.zeros(2, 8), torch.zeros(1, 8)
    ln = (torch.ones(8), torch.zeros(8))
    with pytest.raises(ValueError, match="prev must be a contiguous float32 \\[2, 8\\]"):
        native_decode.residual_ln_mix(x, None, ln, 1e-5, torch.zeros(8, 2).t(), mix, torch.float32)
    with pytest.raises(ValueError, match="dx has shape"):
        native_decode.residual_ln_mix(x, torch.zeros(2, 2, 8), ln, 1e-5, prev, mix, torch.float32)
    with pytest.raises(ValueError, match="float32 or bfloat16, not torch.float16"):
        native_decode.residual_ln_mix(x, None, ln, 1e-5, prev, mix, torch.float16)


def _layer(g, C, value, dtype):
    D = {"w": 24, "a": 16, "g": 40, "v": 8}
    factors = {}
    for n in "wagv":
        if n == "v" and not value:
            factors["v1"] = factors["v2"] = None
            continue
        factors[f"{n}1"] = (torch.randn(D[n], C, generator=g) / C ** 0.5).to(dtype)
        factors[f"{n}2"] = (torch.randn(C, D[n], generator=g) / D[n] ** 0.5).to(dtype)
    vectors = {k: torch.randn(C, generator=g) * 0.3 for k in ("w0", "a0", "v0", "k_k", "k_a", "r_k", "ln_b")}
    vectors["ln_w"] = torch.rand(C, generator=g) + 0.5
    if not value:
        vectors["v0"] = None
    return factors, vectors


@pytest.mark.parametrize("B", [1, 5])
@pytest.mark.parametrize("value", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_time_mix_matches_torch_lora_and_the_time_mix(B, value, dtype):
    """The LoRA chains in fp32 (bf16 factors widened) followed by the fused time mix, against F.linear on the
    same (widened) factors and the existing native time mix on fp32 rows."""
    g = torch.Generator().manual_seed(B + 2 * value)
    H, N = 3, 32
    C = H * N
    factors, vectors = _layer(g, C, value, dtype)
    mixed = torch.randn(6, B, 1, C, generator=g).to(dtype)
    r, k, v, first = (torch.randn(B, 1, C, generator=g).to(dtype) for _ in range(4))
    state = torch.randn(B, H, N, N, generator=g)
    want_state = state.clone()
    f = {n: None if t is None else t.float() for n, t in factors.items()}
    x = mixed.float()
    w_lora = F.linear(torch.tanh(F.linear(x[3], f["w1"])), f["w2"])
    a_lora = F.linear(F.linear(x[4], f["a1"]), f["a2"])
    gate = F.linear(torch.sigmoid(F.linear(x[5], f["g1"])), f["g2"])
    v_lora = F.linear(F.linear(x[2], f["v1"]), f["v2"]) if value else None
    vec = vectors
    tm = native.TimeMix(H, N, w0=vec["w0"], a0=vec["a0"], v0=vec["v0"], k_k=vec["k_k"], k_a=vec["k_a"],
                        r_k=vec["r_k"], ln_w=vec["ln_w"], ln_b=vec["ln_b"], eps=64e-5, log_decay_scale=-0.6065)
    want = tm(r.float(), w_lora, k.float(), v.float(), a_lora, v_lora, first.float() if value else None, gate,
              want_state)
    call = native_decode.LoraTimeMix(H, N, factors, vectors, eps=64e-5, log_decay_scale=-0.6065)
    got = call(mixed, r, k, v, first if value else None, state, torch.float32)
    assert rel_err(got, want) < 1e-5 and rel_err(state, want_state) < 1e-5


def test_lora_time_mix_refuses_what_it_cannot_run():
    g = torch.Generator().manual_seed(0)
    factors, vectors = _layer(g, 64, True, torch.float32)
    with pytest.raises(ValueError, match="LoRA factors must all be float32 or all bfloat16"):
        native_decode.LoraTimeMix(2, 32, {**factors, "w1": factors["w1"].bfloat16()}, vectors, eps=1e-5,
                                  log_decay_scale=-0.6)
    with pytest.raises(ValueError, match="LoRA factors a1 .* are not \\[D, 64\\]"):
        native_decode.LoraTimeMix(2, 32, {**factors, "a1": factors["a1"][:, :60]}, vectors, eps=1e-5,
                                  log_decay_scale=-0.6)
    call = native_decode.LoraTimeMix(2, 32, factors, vectors, eps=1e-5, log_decay_scale=-0.6)
    rows = torch.zeros(1, 1, 64)
    with pytest.raises(ValueError, match="v_first is given exactly when"):
        call(torch.zeros(6, 1, 1, 64), rows, rows, rows, None, torch.zeros(1, 2, 32, 32), torch.float32)
    with pytest.raises(ValueError, match="state must be a contiguous float32"):
        call(torch.zeros(6, 1, 1, 64), rows, rows, rows, rows, torch.zeros(1, 2, 32, 32).double(), torch.float32)


@pytest.mark.parametrize("dtype,tol", [("fp32", 3e-6), ("bf16", 3e-2)])
def test_single_token_steps_match_the_torch_ops_on_both_sides_of_the_row_limit(tmp_path, dtype, tol):
    """Batches of 1 and DECODE_ROWS take the native LoRA + time mix call, DECODE_ROWS + 1 the per-product path:
    all give the torch ops' logits and states."""
    path = tmp_path / "m.pth"
    write_checkpoint(path, PARITY_SHAPES["c192-f500-v0absent"], seed=5)
    fast = load_model(path, f"cpu {dtype}")
    slow = load_model(path, f"cpu {dtype}", native_kernels=False)
    V = fast.config.vocab_size
    for B in (1, rwkv7.DECODE_ROWS, rwkv7.DECODE_ROWS + 1):
        g = torch.Generator().manual_seed(B)
        prompt = torch.randint(0, V, (B, 6), generator=g)
        _, s_fast = fast.forward(prompt)
        _, s_slow = slow.forward(prompt)
        for step in range(3):
            tok = torch.randint(0, V, (B, 1), generator=g)
            l_fast, s_fast = fast.forward(tok, s_fast)
            l_slow, s_slow = slow.forward(tok, s_slow)
            assert rel_err(l_fast, l_slow) < tol, (B, step)
        if dtype == "fp32":
            for got, want in zip(s_fast.tensors(), s_slow.tensors()):
                assert rel_err(got, want) < 1e-5, B


def test_a_strided_shift_state_takes_the_torch_ops(tiny_model):
    """The residual + norm + shift call reads the shift rows in place; a strided state row goes through torch."""
    V = tiny_model.config.vocab_size
    _, state = tiny_model.forward(torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(1)))
    want, _ = tiny_model.forward(torch.tensor([[7], [9]]), state.clone())
    strided = state.clone()
    strided.att_x = [t.t().contiguous().t() for t in state.att_x]
    assert not strided.att_x[0].is_contiguous()
    got, _ = tiny_model.forward(torch.tensor([[7], [9]]), strided)
    assert rel_err(got, want) < 2e-6


@pytest.mark.parametrize("M", [1, 2, 3, 4])
@pytest.mark.parametrize("N,K", [(7, 13), (33, 100), (64, 768)])
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float32, torch.bfloat16)])
def test_gemv_matches_float_products(M, N, K, x_dtype, w_dtype):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x, w = torch.randn(M, 1, K, generator=g).to(x_dtype), torch.randn(N, K, generator=g).to(w_dtype)
    want = F.linear(x.double(), w.double())
    got = native_decode.gemv(x, w)
    assert got.shape == (M, 1, N) and got.dtype == x_dtype
    assert rel_err(got.double(), want) < (1e-6 if x_dtype == torch.float32 else 1e-2)


def test_gemv_refuses_what_it_cannot_run():
    w = torch.zeros(4, 8)
    with pytest.raises(ValueError, match=f"at most {native_decode.GEMV_ROWS} rows"):
        native_decode.gemv(torch.zeros(native_decode.GEMV_ROWS + 1, 8), w)
    with pytest.raises(ValueError, match="against a \\[N, 8\\] weight"):
        native_decode.gemv(torch.zeros(1, 8), torch.zeros(4, 9))
    with pytest.raises(ValueError, match="w must be a contiguous float32 or bfloat16"):
        native_decode.gemv(torch.zeros(1, 8), torch.zeros(8, 4).t())


def test_plain_float_weights_decode_through_the_native_product(tmp_path, monkeypatch):
    """With plain weights (the aten linear backend) and the whole-model step off (tests/test_native_step.py), a
    few-row step uses the native product: same logits as the backend's own product."""
    calls = []
    real = native_decode.gemv
    monkeypatch.setattr(native_decode, "gemv", lambda x, w: calls.append(x.shape) or real(x, w))
    path = tmp_path / "m.pth"
    write_checkpoint(path, PARITY_SHAPES["c192-f500-v0absent"], seed=6)
    plain = load_model(path, "cpu fp32", linear_backend="aten")
    plain._step = None
    onednn = load_model(path, "cpu fp32")
    assert plain.linear_backend == "aten"
    V = plain.config.vocab_size
    toks = torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(2))
    for B in (1, 3):
        a, sa = plain.forward(toks[:B, :4])
        b, sb = onednn.forward(toks[:B, :4])
        a, _ = plain.forward(toks[:B, 4:], sa)
        b, _ = onednn.forward(toks[:B, 4:], sb)
        assert rel_err(a, b) < 1e-5, B
    assert calls and all(shape[0] <= 3 for shape in calls)