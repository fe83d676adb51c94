"""The whole single-token step as one native call (kernels/native_step.py, goose_decode_step in
kernels/csrc/decode_cpu.cpp) and the few-row product kernels under it (kernels/csrc/products_cpu.cpp): the step
against the model's per-layer path for every weight form it reads, when it is used and when not, what it refuses,
and every instruction-set build of the kernels."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from bench.random_checkpoint import write_checkpoint
from engine import load_model
from engine.formats.convert import convert
from kernels import native_step
from kernels.quant_native import quant_matmul
from engine.model import quant
from tests.conftest import PARITY_SHAPES, rel_err

pytestmark = pytest.mark.skipif(os.environ.get("GOOSE_NATIVE_KERNELS") == "0",
                                reason="GOOSE_NATIVE_KERNELS=0 in the environment")

def _packed_readable() -> bool:
    """Whether this CPU's kernels read oneDNN's packed layouts (AVX-512) and this torch packs fp32 weights."""
    from engine.model.linear import probe_onednn
    from kernels.native_build import load
    try:
        return load().packed_layouts_readable and probe_onednn(torch.float32)[1]
    except Exception:
        return False


# (strategy, linear backend, logits tolerance against the per-layer path). bf16 activations: both paths round the
# same values to bf16, but a sum a few ulps apart can round the other way (a near-tie), hence the looser bound.
# int4 on CPUs with AVX-512 VNNI rounds each product's x to int16 (products_cpu.cpp): float-rounding differences
# between the paths' LoRA sums can move an element to the next int16 step, ~1e-4 of the logits.
STRATEGIES = [("fp32", "plain", 2e-5), ("bf16", "plain", 3e-2), ("fp32i8", None, 2e-5), ("bf16i8", None, 3e-2),
              ("fp32i4", None, 1e-3), ("bf16i4", None, 3e-2)]
if _packed_readable():
    STRATEGIES += [("fp32", None, 2e-5), ("bf16", None, 3e-2)]     # oneDNN's packed weights, read in place


@pytest.fixture(scope="module", params=["c192-f500-v0absent", "c128-n32-v0present"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("step") / f"{request.param}.pth"
    write_checkpoint(path, PARITY_SHAPES[request.param], seed=11)
    return path


def _per_layer(model, tokens, state):
    """The same forward with the native step switched off: the per-layer path the step replaces."""
    step, model._step = model._step, None
    try:
        return model.forward(tokens, state)
    finally:
        model._step = step


@pytest.mark.parametrize("strategy,backend,tol", STRATEGIES)
def test_the_step_gives_the_per_layer_path_logits_and_states(checkpoint, strategy, backend, tol):
    model = load_model(checkpoint, f"cpu {strategy}", linear_backend=backend)
    assert model._step is not None, strategy
    V = model.config.vocab_size
    calls = []
    real = model._step
    model._step = lambda *a: calls.append(a[0].shape[0]) or real(*a)
    for B in (1, 3, native_step.STEP_ROWS):
        g = torch.Generator().manual_seed(B)
        prompt = torch.randint(0, V, (B, 5), generator=g)
        _, fast = model.forward(prompt)
        slow = fast.clone()
        for i in range(4):
            tok = torch.randint(0, V, (B, 1), generator=g)
            got, fast = model.forward(tok, fast)
            want, slow = _per_layer(model, tok, slow)
            assert got.shape == (B, V) and got.dtype == torch.float32
            assert rel_err(got, want) < tol, (B, i)
        if "bf16" not in strategy:
            for a, b in zip(fast.tensors(), slow.tensors()):
                assert rel_err(a, b) < (1e-3 if "i4" in strategy else 1e-4), B
    assert calls == [1] * 4 + [3] * 4 + [native_step.STEP_ROWS] * 4


def test_gguf_q8_0_and_q4_0_weights_decode_through_the_step(tmp_path):
    pth = tmp_path / "m.pth"
    write_checkpoint(pth, PARITY_SHAPES["c192-f500-v0absent"], seed=3)
    for dtype, strategy in (("q8_0", "cpu fp32i8"), ("q4_0", "cpu bf16i4")):
        gguf = tmp_path / f"m-{dtype}.gguf"
        convert(str(pth), str(gguf), dtype=dtype, tokenizer="none", force=True, progress=False,
                note=lambda text: None)
        model = load_model(gguf, strategy)
        assert model._step is not None and quant.kind_of(model.head) is not None
        tok = torch.tensor([[5], [9]])
        _, state = model.forward(torch.tensor([[1, 2, 3], [4, 5, 6]]))
        got, _ = model.forward(tok, state.clone())
        want, _ = _per_layer(model, tok, state.clone())
        assert rel_err(got, want) < (1e-3 if "fp32" in strategy else 3e-2), dtype


def test_the_step_stays_out_where_it_cannot_serve(checkpoint):
    model = load_model(checkpoint, "cpu fp32i8")
    calls = []
    real = model._step
    model._step = lambda *a: calls.append(1) or real(*a)
    V = model.config.vocab_size
    B = native_step.STEP_ROWS + 1
    _, state = model.forward(torch.randint(0, V, (B, 3)))
    model.forward(torch.randint(0, V, (B, 1)), state)                       # too many rows
    model.forward(torch.randint(0, V, (2, 1)), None)                        # a fresh state is fine ...
    assert calls == [1]
    model.forward(torch.randint(0, V, (2, 2)))                              # ... two tokens are a prompt
    one = state.narrow(0, 1).clone()
    one.att_x = [torch.zeros(1, t.shape[1], 2)[..., 0].copy_(t) for t in one.att_x]
    assert not one.att_x[0].is_contiguous()
    model.forward(torch.tensor([[3]]), one)                                 # a strided state row
    logits, _ = model.forward(torch.tensor([[3]]), state.narrow(0, 1).clone(), full_output=True)
    assert logits.shape[:2] == (1, 1)                                       # full_output keeps its shape
    assert calls == [1]


def test_packed_weights_are_read_in_place_or_keep_the_per_layer_path(checkpoint):
    """oneDNN's packed float weights (the default for float strategies): on CPUs whose kernels read the layout the
    step uses them in place (checked value for value at load), elsewhere the model decodes per layer."""
    from engine.model.linear import probe_onednn
    if not probe_onednn(torch.float32)[1]:
        pytest.skip("this torch build cannot pack oneDNN weights")
    model = load_model(checkpoint, "cpu fp32")
    assert (model._step is not None) == _packed_readable()
    if model._step is None:
        with pytest.raises(ValueError, match="head: the step reads plain row-major matrices"):
            native_step.mat_ref(model.head, [], "head")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_packed_layout_is_trusted_only_when_every_value_matches(dtype):
    from engine.model.linear import onednn_pack, probe_onednn
    if not (_packed_readable() and probe_onednn(dtype)[1]):
        pytest.skip("oneDNN's packed layouts are not read on this CPU")
    g = torch.Generator().manual_seed(4)
    for N, K in ((192, 500), (777, 192), (5, 7), (100, 33)):
        w = torch.randn(N, K, generator=g).to(dtype)
        packed = onednn_pack(w)
        layout = native_step.packed_layout(packed, w)
        assert layout is not None and layout[1] % 16 == 0, (N, K)
        other = w.clone()
        other[N - 1, K - 1] += 1                       # one value off: the layout is not trusted
        assert native_step.packed_layout(packed, other) is None
        assert native_step.packed_layout(w, w) is None          # a plain tensor has no packed layout
        # what the step is given for it (the model-level tests above check the products it computes)
        ref = native_step.mat_ref(packed, [], "w", (N, K), {torch.ops.mkldnn.data_ptr(packed): layout})
        assert ref.kind == (native_step.BF16_PAIRS if dtype == torch.bfloat16 else native_step.F32_BLOCKED)


def test_the_step_refuses_bad_calls(checkpoint):
    model = load_model(checkpoint, "cpu fp32i8")
    step, V = model._step, model.config.vocab_size
    state = model.zero_state(2)
    with pytest.raises(ValueError, match=f"1 to {native_step.STEP_ROWS} sequences, got 0"):
        step(torch.zeros(0, dtype=torch.long), state.att_x, state.wkv, state.ffn_x)
    with pytest.raises(ValueError, match="state wkv must be"):
        step(torch.tensor([1, 2]), state.att_x, [t[:1] for t in state.wkv], state.ffn_x)
    with pytest.raises(ValueError, match="state att_x must be"):
        step(torch.tensor([1, 2]), [t.double() for t in state.att_x], state.wkv, state.ffn_x)
    with pytest.raises(ValueError, match="layer 0 key: quantized weights are 8 or 4 bits with a positive group "
                                         "\\(int4: a multiple of 32\\), got 4 bits, group 48"):
        native_step.mat_ref(_FakeInt4(), [], "layer 0 key")
    with pytest.raises(ValueError, match="layer 0 key: shape \\[4, 8\\], expected \\[8, 8\\]"):
        native_step.mat_ref(torch.zeros(4, 8), [], "layer 0 key", (8, 8))
    assert step(torch.tensor([1, V - 1]), state.att_x, state.wkv, state.ffn_x).shape == (2, V)


class _FakeInt4:
    def parts(self):
        return 4, torch.zeros(4, 16, dtype=torch.uint8), torch.ones(4, 1), None, 48, 32


# ---------------------------------------------------------------------------------------- the product kernels
_ISA_CHECK = r"""
import torch
from engine.model import quant
from kernels.quant_native import quant_matmul
from kernels import native_decode
g = torch.Generator().manual_seed(0)
worst = worst4 = 0.0
for N, K in ((7, 13), (33, 100), (40, 768), (16, 200), (9, 3072)):
    w = torch.randn(N, K, generator=g)
    for M in (1, 3, 4, 7):
        x = torch.randn(M, K, generator=g)
        for qw in (quant.quantize_int8(w), quant.quantize_int4(w, 64), quant.quantize_int4(w, 32),
                   quant.quantize_int4(w, 128)):
            want = x.double() @ qw.dequantize().double().T
            got = quant_matmul(x, *qw.parts()).double()
            err = ((got - want).abs().max() / want.abs().max()).item()
            if isinstance(qw, quant.Int4Weight) or M > 4:       # where the VNNI kernels round x to int16
                worst4 = max(worst4, err)
            else:
                worst = max(worst, err)
        if M <= native_decode.GEMV_ROWS:
            for dt in (torch.float32, torch.bfloat16):
                want = x.double() @ w.to(dt).double().T
                got = native_decode.gemv(x, w.to(dt)).double()
                worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
print(worst, worst4)
"""


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512", None])
def test_every_instruction_set_build_of_the_products_is_exact(isa, tmp_path):
    """GOOSE_KERNEL_ISA picks a narrower build than the machine's (the kernels choose once per process; a build
    the CPU lacks falls back to the best it has). On CPUs with AVX-512 VNNI the int4 kernel, and the int8 one beyond
    4 rows of x, round x to int16 (one scale a row), which moves sums by ~1e-4 of their largest; every other build
    and case is exact to float rounding."""
    env = dict(os.environ)
    env.pop("GOOSE_KERNEL_ISA", None)
    if isa:
        env["GOOSE_KERNEL_ISA"] = isa
    out = subprocess.run([sys.executable, "-c", _ISA_CHECK], env=env, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    worst, worst4 = map(float, out.stdout.strip().splitlines()[-1].split())
    assert worst < 1e-5
    assert worst4 < (5e-4 if isa is None else 1e-5)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("M", [1, 2, 4, 5, 64])
def test_quantized_products_with_groups_of_32_and_fp16_scales(bits, M):
    """GGUF's blocks (32 columns, fp16 scales, no zeros for Q4_0) through the same kernels, K not a multiple of
    32 for int8."""
    g = torch.Generator().manual_seed(bits * 100 + M)
    N, K = 48, 200 if bits == 8 else 192
    if bits == 8:
        codes = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
        scales = (torch.rand(N, -(-K // 32), generator=g) / 50).half()
        w = quant.Int8Weight(codes, scales, 32)
    else:
        codes = torch.randint(0, 256, (N, K // 2), generator=g).to(torch.uint8)
        scales = (torch.rand(N, K // 32, generator=g) / 10).half()
        w = quant.Int4Weight(codes, scales, None, 32, K)
    x = torch.randn(M, K, generator=g)
    want = x.double() @ w.dequantize().double().T
    assert rel_err(quant_matmul(x, *w.parts()), want) < (1e-5 if bits == 8 else 5e-4)    # int4: x in int16 (VNNI)


def test_a_token_outside_the_vocabulary_is_refused_and_changes_nothing(checkpoint):
    model = load_model(checkpoint, "cpu fp32i8")
    V = model.config.vocab_size
    _, state = model.forward(torch.tensor([[1, 2, 3]]))
    before = state.clone()
    for bad in (V, -1):
        with pytest.raises(IndexError, match=f"token id {bad} is outside the vocabulary \\(ids 0 to {V - 1}\\)"):
            model.forward(torch.tensor([[bad]]), state)
        assert all(torch.equal(a, b) for a, b in zip(state.tensors(), before.tensors()))


def test_nan_activations_stay_nan_through_the_products():
    """A NaN in x gives NaN sums in every kernel (the int16 rounding of the VNNI kernels included) and relu^2 keeps
    it, as torch's relu_ does."""
    g = torch.Generator().manual_seed(9)
    w = torch.randn(40, 256, generator=g)
    for qw in (quant.quantize_int8(w), quant.quantize_int4(w)):
        for M in (1, 6):
            x = torch.randn(M, 256, generator=g)
            x[0, 7] = float("nan")
            y = quant_matmul(x, *qw.parts())
            assert torch.isnan(y[0]).all() and not torch.isnan(y[1:]).any()
