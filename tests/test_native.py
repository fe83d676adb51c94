"""The native CPU decode kernels (kernels/native.py, built by kernels/native_build.py): the build and its cache,
the WKV step against the reference, the fused time mix against the model's torch ops, and every way of turning
them off or failing.

CI machines have a C++ compiler, so these tests build the library and fail when it does not build; only
GOOSE_NATIVE_KERNELS=0 in the environment skips the ones that need it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import ModelLoadError, load_model
from bench.random_checkpoint import write_checkpoint
from kernels import get_wkv7, native, native_build
from tests.conftest import PARITY_SHAPES, rel_err
from tests.test_kernels import make_inputs

needs_native = pytest.mark.skipif(os.environ.get("GOOSE_NATIVE_KERNELS") == "0",
                                  reason="GOOSE_NATIVE_KERNELS=0 in the environment")


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """A process state with nothing loaded and an empty kernel directory; restored afterwards."""
    monkeypatch.setenv("GOOSE_KERNEL_DIR", str(tmp_path / "kernels"))
    monkeypatch.delenv("GOOSE_NATIVE_KERNELS", raising=False)
    native_build._reset_for_tests()
    yield tmp_path / "kernels"
    native_build._reset_for_tests()


def tokens(n_rows: int, n: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n_rows, n), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ the WKV step
@needs_native
@pytest.mark.parametrize("B,H,N", [(4, 3, 64), (3, 2, 32), (1, 1, 16), (2, 2, 40)])
def test_native_step_matches_reference(B, H, N):
    args = make_inputs(B, 1, H, N, torch.float32, seed=B * 10 + N)
    y_ref, s_ref = get_wkv7("reference")(*args)
    state = args[-1].clone()
    y = get_wkv7("native_step_")(*args[:-1], state)
    assert y.shape == (B, 1, H, N)
    assert rel_err(y, y_ref) < 5e-6 and rel_err(state, s_ref) < 5e-6


@needs_native
@pytest.mark.parametrize("T", [1, 17, 200])
def test_native_sequence_matches_reference(T):
    args = make_inputs(2, T, 3, 64, torch.float32, seed=T)
    y_ref, s_ref = get_wkv7("reference")(*args)
    before = args[-1].clone()
    y, s = get_wkv7("native")(*args)
    assert y.shape == (2, T, 3, 64) and s.shape == (2, 3, 64, 64)
    assert rel_err(y, y_ref) < 5e-6 and rel_err(s, s_ref) < 5e-6
    assert torch.equal(args[-1], before)                       # the functional form leaves the state alone


@needs_native
def test_native_step_on_a_strided_state_and_extreme_decays():
    """A strided view of a larger state is updated in place; decays at both ends of the range stay exact."""
    r, w, k, v, a, b, s0 = make_inputs(3, 1, 2, 64, torch.float32, seed=9)
    w = torch.where(torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) < 0.5,
                    torch.full_like(w, -0.6065306597126334), torch.full_like(w, -1e-7))
    y_ref, s_ref = get_wkv7("reference")(r, w, k, v, a, b, s0)
    big = torch.zeros(2, 3, 2, 64, 64)
    big[1] = s0
    view = big[1]                                  # contiguous view: updated in place
    y = get_wkv7("native_step_")(r, w, k, v, a, b, view)
    assert rel_err(y, y_ref) < 5e-6 and rel_err(big[1], s_ref) < 5e-6
    assert torch.equal(big[0], torch.zeros_like(big[0]))
    strided = torch.zeros(3, 64, 2, 64).transpose(1, 2)      # [3, 2, 64, 64] not contiguous
    strided.copy_(s0)
    y = get_wkv7("native_step_")(r, w, k, v, a, b, strided)
    assert rel_err(y, y_ref) < 5e-6 and rel_err(strided, s_ref) < 5e-6


@needs_native
def test_native_step_refuses_what_it_cannot_run():
    args = make_inputs(1, 2, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="exactly one token"):
        get_wkv7("native_step_")(*args)
    args = make_inputs(1, 1, 1, 8, torch.float64)
    with pytest.raises(ValueError, match="float32 CPU states"):
        get_wkv7("native_step_")(*args)
    r, w, k, v, a, b, s = make_inputs(1, 1, 1, 300, torch.float32)
    with pytest.raises(ValueError, match="head size 300 is above"):
        get_wkv7("native_step_")(r, w, k, v, a, b, s)
    r, w, k, v, a, b, s = make_inputs(1, 1, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="runs on CPU, but r is on meta"):
        get_wkv7("native_step_")(r.to("meta"), w, k, v, a, b, s)


# ------------------------------------------------------------------------------------------ the model
@needs_native
@pytest.mark.parametrize("shape", sorted(PARITY_SHAPES))
@pytest.mark.parametrize("dtype,tol", [("fp32", 2e-6), ("bf16", 3e-2)])
def test_native_time_mix_matches_torch_ops(tmp_path, shape, dtype, tol):
    """The fused kernel gives the torch ops' logits and states, for a batch of prompts (every position) and
    then several decode steps, with and without a value residual at layer 0, at head sizes 64 and 32."""
    path = tmp_path / "m.pth"
    write_checkpoint(path, PARITY_SHAPES[shape], seed=4)
    fast = load_model(path, f"cpu {dtype}")
    slow = load_model(path, f"cpu {dtype}", native_kernels=False)
    assert (fast.decode_kernel, slow.decode_kernel) == ("native", "torch")
    V = fast.config.vocab_size
    prompt = tokens(3, 70, V, seed=1)
    l_fast, s_fast = fast.forward(prompt, full_output=True)
    l_slow, s_slow = slow.forward(prompt, full_output=True)
    assert rel_err(l_fast, l_slow) < 10 * tol                  # the chunked form rounds differently over 70 tokens
    for step in range(5):
        tok = tokens(3, 1, V, seed=10 + step)
        l_fast, s_fast = fast.forward(tok, s_fast)
        l_slow, s_slow = slow.forward(tok, s_slow)
        assert rel_err(l_fast, l_slow) < tol, step
    if dtype == "fp32":
        for got, want in zip(s_fast.tensors(), s_slow.tensors()):
            assert rel_err(got, want) < tol
    else:
        assert (l_fast.argmax(-1) == l_slow.argmax(-1)).all()


@needs_native
def test_native_decode_on_a_strided_state_uses_torch_ops(tiny_pth, tiny_model):
    """A state the kernel cannot update in place (a strided view) still decodes, through torch ops."""
    assert tiny_model.decode_kernel == "native"
    V = tiny_model.config.vocab_size
    _, state = tiny_model.forward(tokens(2, 5, V, seed=3))
    want, _ = tiny_model.forward(torch.tensor([[7], [9]]), state.clone())
    strided = state.clone()
    strided.wkv = [s.transpose(-1, -2).contiguous().transpose(-1, -2) for s in state.wkv]
    assert not strided.wkv[0].is_contiguous()
    got, _ = tiny_model.forward(torch.tensor([[7], [9]]), strided)
    assert rel_err(got, want) < 2e-6


def test_native_kernels_can_be_turned_off(tiny_pth, monkeypatch, fresh_native):
    assert load_model(tiny_pth, "cpu fp32", native_kernels=False).decode_kernel == "torch"
    assert load_model(tiny_pth, "cpu fp32", wkv_backend="reference").decode_kernel == "torch"
    monkeypatch.setenv("GOOSE_NATIVE_KERNELS", "0")
    assert load_model(tiny_pth, "cpu fp32").decode_kernel == "torch"
    assert not fresh_native.exists()                          # nothing was built
    with pytest.raises(ModelLoadError, match="required but cannot be used: disabled by GOOSE_NATIVE_KERNELS=0"):
        load_model(tiny_pth, "cpu fp32", native_kernels=True)
    with pytest.raises(ValueError, match="'native_step_' cannot be loaded: disabled"):
        get_wkv7("native_step_")
    monkeypatch.setenv("GOOSE_NATIVE_KERNELS", "yes")
    with pytest.raises(ModelLoadError, match="GOOSE_NATIVE_KERNELS must be auto, 0 or 1, got 'yes'"):
        load_model(tiny_pth, "cpu fp32")


def test_reference_backend_cannot_require_native(tiny_pth, monkeypatch):
    with pytest.raises(ModelLoadError, match="reference WKV backend"):
        load_model(tiny_pth, "cpu fp32", wkv_backend="reference", native_kernels=True)
    monkeypatch.setenv("GOOSE_NATIVE_KERNELS", "1")    # the variable asks them built where they apply
    assert load_model(tiny_pth, "cpu fp32", wkv_backend="reference").decode_kernel == "torch"


# ------------------------------------------------------------------------------------------ the build
@needs_native
@pytest.mark.slow
def test_build_is_cached_and_shared_between_processes(fresh_native):
    lib = native.load()
    assert lib.path.parent == fresh_native and lib.path.name.startswith("rwkv7_cpu-")
    built = lib.path.stat().st_mtime_ns
    assert lib.path.stat().st_mode & 0o777 == 0o755            # loadable by other users (a container's runtime uid)
    assert [p.name for p in fresh_native.iterdir()] == [lib.path.name]      # no temporary left behind
    code = ("from kernels import native_build; lib = native_build.load(); print(lib.path); "
            "print(len(native_build.openmp_runtimes()))")
    env = {**os.environ, "GOOSE_KERNEL_DIR": str(fresh_native), "CXX": "/nonexistent/c++", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    path, runtimes = out.stdout.split()
    assert path == str(lib.path)                                # loaded without any compiler on the PATH
    assert runtimes == "1"                                      # torch's OpenMP pool is the only one
    assert lib.path.stat().st_mtime_ns == built


def test_no_compiler_falls_back_with_a_reason(tiny_pth, monkeypatch, fresh_native, caplog):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv("PATH", "")
    with caplog.at_level("WARNING", logger="goose.engine"):
        model = load_model(tiny_pth, "cpu fp32")
    assert model.decode_kernel == "torch"
    assert "no C++ compiler found" in caplog.text
    assert "no C++ compiler found" in native.status()
    with pytest.raises(ModelLoadError, match="required but cannot be used: no C\\+\\+ compiler found"):
        load_model(tiny_pth, "cpu fp32", native_kernels=True)
    monkeypatch.setenv("GOOSE_NATIVE_KERNELS", "1")
    with pytest.raises(ModelLoadError, match="no C\\+\\+ compiler"):
        load_model(tiny_pth, "cpu fp32")


def test_a_failing_build_reports_the_compiler_error(monkeypatch, fresh_native, tmp_path):
    cxx = tmp_path / "bad-c++"
    cxx.write_text("#!/bin/sh\necho 'error: this compiler is broken' >&2\nexit 1\n")
    cxx.chmod(0o755)
    monkeypatch.setenv("CXX", str(cxx))
    with pytest.raises(native.NativeUnavailable, match=r"(?s)building \w+\.cpp failed.*this compiler is broken"):
        native.load()
    with pytest.raises(native.NativeUnavailable, match="this compiler is broken"):    # remembered, not retried
        native.load()
    assert not any(fresh_native.glob("*.so"))


@needs_native
def test_a_damaged_cached_library_is_rebuilt(fresh_native, caplog):
    path = fresh_native / native_build._library_name()  # never loaded in this process (dlopen caches by name)
    fresh_native.mkdir(parents=True)
    path.write_bytes(b"not a shared library")
    with caplog.at_level("WARNING", logger="goose.kernels"):
        lib = native.load()
    assert lib.path == path and "unusable" in caplog.text and "rebuilding" in caplog.text
    assert path.read_bytes()[:4] == b"\x7fELF"
    assert sorted(p.name for p in fresh_native.iterdir()) == [path.name]           # nothing left behind


def test_tiny_temperatures_are_greedy():
    from engine.request import SamplingParams
    assert SamplingParams(temperature=0).greedy and SamplingParams(temperature=1e-39).greedy
    assert not SamplingParams(temperature=1e-3).greedy


@needs_native
def test_a_library_giving_wrong_results_is_refused(fresh_native, monkeypatch):
    lib = native.load()
    native_build._reset_for_tests()
    real_init = native_build._Lib.__init__

    def broken(self, path):
        real_init(self, path)
        self.wkv7_seq = lambda *args: None                    # a kernel that computes nothing
    monkeypatch.setattr(native_build._Lib, "__init__", broken)
    with pytest.raises(native.NativeUnavailable, match="gives wrong results"):
        native.load()
    assert lib.path.exists()


# ------------------------------------------------------------------------------------------ sampling
@needs_native
def test_native_sampler_draws_from_the_softmax():
    """Temperature-only rows are drawn natively: frequencies follow softmax(x / T), -inf is never drawn, and
    for the same uniform the token is the torch path's (up to exp rounding at a boundary)."""
    from engine.sampling import _inverse_cdf
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 40, generator=g) * 2
    x[0, 5] = float("-inf")
    n = 20000
    u = torch.rand(n, generator=g)
    rows = x.expand(n, 40).contiguous()
    temps = torch.full((n,), 0.7)
    got = native.sample_rows(rows, temps, u)
    assert not (got == 5).any()
    freq = torch.bincount(got, minlength=40).double() / n
    want = torch.softmax(x[0].double() / 0.7, -1)
    assert 0.5 * (freq - want).abs().sum() < 0.02
    same = (got == _inverse_cdf(torch.softmax(rows / 0.7, -1), u)).double().mean()
    assert same > 0.995
    big = torch.randn(3, 70000, generator=g)                       # not a multiple of the 256-token block
    picked = native.sample_rows(big, torch.ones(3), torch.tensor([0.0, 0.5, 0.999999]))
    assert ((picked >= 0) & (picked < 70000)).all()
    assert native.sample_rows(torch.full((1, 10), float("-inf")), torch.ones(1), torch.zeros(1)).item() == -1
    with_nan = torch.randn(1, 300, generator=g)
    with_nan[0, 100] = float("nan")
    assert native.sample_rows(with_nan, torch.ones(1), torch.zeros(1)).item() == -1      # the torch path decides


@needs_native
def test_sampling_paths_depend_on_the_row_not_the_batch():
    """A temperature-only row (native) gives the same tokens alone and next to filtered rows (torch path)."""
    from engine.request import SamplingParams
    from engine.sampling import SamplerRow, make_generator, sample
    x = torch.randn(3, 300, generator=torch.Generator().manual_seed(2)) * 2

    def row(seed, **kw):
        return SamplerRow(SamplingParams(seed=seed, **kw), make_generator(seed))
    alone = row(7, temperature=0.9)
    with_others = [row(1, top_k=5), row(7, temperature=0.9), row(3, top_p=0.5, min_p=0.1)]
    a = [sample(x[1:2], [alone], want_logprobs=False)[0][0] for _ in range(100)]
    b = [sample(x, with_others, want_logprobs=False)[0][1] for _ in range(100)]
    assert a == b


def test_sampling_without_native_kernels(monkeypatch, fresh_native):
    """GOOSE_NATIVE_KERNELS=0: every row takes the torch path, seeds still reproduce."""
    from engine.request import SamplingParams
    from engine.sampling import SamplerRow, make_generator, sample
    monkeypatch.setenv("GOOSE_NATIVE_KERNELS", "0")
    x = torch.randn(2, 100, generator=torch.Generator().manual_seed(3))
    runs = []
    for _ in range(2):
        rows = [SamplerRow(SamplingParams(seed=s), make_generator(s)) for s in (4, 5)]
        runs.append([sample(x, rows, want_logprobs=False)[0] for _ in range(20)])
    assert runs[0] == runs[1]
    assert not native.available()


def test_token_mask_kernel_matches_the_torch_paths():
    """The native mask (engine/structured/masks.py's fast path) equals the torch dense and sparse paths: every
    allowed logit kept, every other one -inf, rows without a mask untouched, vocabularies not a multiple of 32."""
    from engine.structured.masks import MaskBatch, _apply_dense, _apply_sparse
    g = torch.Generator().manual_seed(11)
    for V, words in ((65536, 2048), (4100, 129), (70, 2)):
        logits = torch.randn(6, V, generator=g)
        bits = torch.randint(-2**31, 2**31 - 1, (3, words), generator=g, dtype=torch.int64).to(torch.int32)
        bits[0, : words // 2] = -1                                    # all-ones words
        bits[1, : words // 3] = 0                                     # all-zero words
        batch = MaskBatch([0, 2, 5], bits)
        got, dense, sparse = logits.clone(), logits.clone(), logits.clone()
        native.apply_token_mask(got, torch.tensor(batch.rows), bits)
        _apply_dense(dense, batch)
        _apply_sparse(sparse, batch)
        assert torch.equal(got, dense) and torch.equal(got, sparse)
        assert torch.equal(got[[1, 3, 4]], logits[[1, 3, 4]])
