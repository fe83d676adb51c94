"""The Triton WKV-7 kernels (kernels/wkv7_triton.py) against the token-by-token reference.

Without CUDA they run on CPU tensors under the Triton interpreter, which has to be on before triton is first
imported (triton.language's own helpers are decorated at import) and while the kernels run (triton imports
parts lazily on the first launch). So this module sets TRITON_INTERPRET=1 only around ``import triton``,
then keeps the interpreter on through triton's own knob and takes the variable back out of the environment:
no subprocess started by another test inherits it. With CUDA nothing is set and the same tests run on the GPU.
The interpreter is slow (a few ms per token per program), so shapes here are small: heads of 32, a few heads.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from tests.conftest import PARITY_SHAPES, rel_err
from tests.test_kernels import make_inputs

CUDA = torch.cuda.is_available()


def _import_triton_interpreted():
    """Import triton with its interpreter on (no CUDA); return why not, or None."""
    if CUDA:
        return None
    if "triton" in sys.modules:
        import triton
        return None if triton.knobs.runtime.interpret else "triton was imported before the interpreter was enabled"
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton
        triton.knobs.runtime.interpret = True      # stays on for this process once the variable is gone
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return None


try:
    _why_not = _import_triton_interpreted()
except ImportError as exc:
    _why_not = f"triton is not installed ({exc}); pip install triton, or the cuda/test extras"
except AttributeError:
    _why_not = "triton is older than 3.4 (no triton.knobs to keep its interpreter on)"
if _why_not:
    pytest.skip(_why_not, allow_module_level=True)

from kernels import get_wkv7  # noqa: E402
import kernels.wkv7_triton as tri  # noqa: E402

if not CUDA and not tri.interpreting():      # imported earlier, compiled for a GPU: load it again, interpreted
    import importlib
    tri = importlib.reload(tri)

DEV = torch.device("cuda" if CUDA else "cpu")
# dtype-scaled tolerances (max |diff| / max |ref|) against an fp64 reference on the same (rounded) inputs; on a
# GPU exp and the reductions are less exact than numpy's
TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}
GPU_SLACK = 20.0 if CUDA else 1.0


def inputs(B, T, H, N, dtype, seed=0):
    """The shared test inputs in ``dtype`` with an fp32 state, on the test device."""
    args = make_inputs(B, T, H, N, torch.float32, seed=seed)
    return [t.to(DEV, dtype) for t in args[:-1]] + [args[-1].to(DEV)]


def reference(*args):
    return get_wkv7("reference")(*(t.cpu().double() for t in args))


def close(got, want, dtype=torch.float32) -> bool:
    return rel_err(got.cpu(), want) < TOL[dtype] * GPU_SLACK


@pytest.mark.parametrize("form", ["loop", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 15, 16, 17, 64, 100])
def test_sequence_matches_reference(T, dtype, form):
    """Both forms: the token loop, and chunks of 16 (the default from T = 16 on; T = 1 and 15 are one padded chunk)."""
    args = inputs(2, T, 2, 32, dtype, seed=T)
    copies = [t.clone() for t in args]
    y, s = tri.wkv7_triton(*args, chunk_len=0 if form == "loop" else 16)
    y_ref, s_ref = reference(*args)
    assert y.shape == (2, T, 2, 32) and s.shape == (2, 2, 32, 32) and y.dtype == s.dtype == torch.float32
    assert close(y, y_ref, dtype) and close(s, s_ref, dtype)
    assert all(torch.equal(a, c) for a, c in zip(args, copies))      # the state (and inputs) are not modified


def test_row_tiles_agree():
    """Splitting the state's rows over programs (as on a GPU) changes nothing: the rows evolve independently."""
    args = inputs(1, 20, 3, 32, torch.float32, seed=2)
    y_ref, s_ref = reference(*args)
    for block_v, chunk_len in ((8, 0), (16, 0), (16, 16), (32, 16)):
        y, s = tri.wkv7_triton(*args, block_v=block_v, chunk_len=chunk_len)
        assert close(y, y_ref) and close(s, s_ref), (block_v, chunk_len)


def test_split_invariance():
    """40 tokens at once (chunked) equal 13 (token loop) then 27 (chunked, one padded chunk) carrying the state."""
    r, w, k, v, a, b, s0 = inputs(1, 40, 2, 32, torch.float32, seed=7)
    fn = get_wkv7("triton")
    y_all, s_all = fn(r, w, k, v, a, b, s0)
    y1, s1 = fn(*(t[:, :13] for t in (r, w, k, v, a, b)), s0)
    y2, s2 = fn(*(t[:, 13:] for t in (r, w, k, v, a, b)), s1)
    assert rel_err(torch.cat((y1, y2), 1).cpu(), y_all.cpu()) < 1e-6 and rel_err(s2.cpu(), s_all.cpu()) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_in_place(dtype):
    args = inputs(3, 1, 2, 32, dtype, seed=5)
    y_ref, s_ref = reference(*args)
    state = args[-1].clone()
    y = get_wkv7("triton_step_")(*args[:-1], state)
    assert y.shape == (3, 1, 2, 32) and close(y, y_ref, dtype) and close(state, s_ref, dtype)


def test_step_on_a_strided_pool_view():
    """Decode updates the layer's slice of the state pool in place, whatever its strides; the rest is untouched."""
    r, w, k, v, a, b, s0 = inputs(2, 1, 2, 32, torch.float32, seed=9)
    pool = torch.randn(3, 2, 2, 32, 32, device=DEV)              # [L, B, H, N, N]
    pool[1] = s0
    before = pool.clone()
    y_ref, s_ref = reference(r, w, k, v, a, b, s0)
    y = tri.wkv7_triton_step_(r, w, k, v, a, b, pool[1])
    assert close(y, y_ref) and close(pool[1], s_ref)
    assert torch.equal(pool[0], before[0]) and torch.equal(pool[2], before[2])
    transposed = s0.transpose(-1, -2).contiguous().transpose(-1, -2)     # same values, column-major rows
    tri.wkv7_triton_step_(r, w, k, v, a, b, transposed)
    assert close(transposed, s_ref)


def test_step_rejects_sequences():
    with pytest.raises(ValueError, match="exactly one token"):
        get_wkv7("triton_step_")(*inputs(1, 3, 1, 16, torch.float32))


@pytest.mark.parametrize("chunk_len", [0, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_variable_lengths_in_one_launch(dtype, chunk_len):
    """Packed sequences of lengths 5, 0, 17, 1 and 16, each with its own initial state and final state."""
    lengths = [5, 0, 17, 1, 16]
    H, N = 2, 32
    seqs = [inputs(1, n, H, N, dtype, seed=20 + i) for i, n in enumerate(lengths)]
    packed = [torch.cat([s[j][0] for s in seqs]) for j in range(6)]               # [total, H, N]
    states = torch.cat([s[-1] for s in seqs])                                    # [S, H, N, N]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    y, final = tri.wkv7_triton_varlen(*packed, states, cu, chunk_len=chunk_len)
    assert y.shape == (sum(lengths), H, N) and final.shape == states.shape
    for i, s in enumerate(seqs):
        y_ref, s_ref = reference(*s)
        assert close(final[i:i + 1], s_ref, dtype), i
        if lengths[i]:
            assert close(y[cu[i]:cu[i + 1]].unsqueeze(0), y_ref, dtype), i


def test_varlen_rejects_bad_offsets():
    s = inputs(2, 1, 1, 16, torch.float32)[-1]                     # two initial states
    packed = [t.reshape(12, 1, 16) for t in inputs(1, 12, 1, 16, torch.float32)[:-1]]
    with pytest.raises(ValueError, match="end at total"):
        tri.wkv7_triton_varlen(*packed, s, torch.tensor([0, 5, 11]))
    with pytest.raises(ValueError, match="S = len"):
        tri.wkv7_triton_varlen(*packed, s, torch.tensor([0, 12]))


def test_registry_and_model_choice():
    from engine.model.rwkv7 import SEQUENCE_BACKENDS
    assert "triton" in SEQUENCE_BACKENDS
    assert get_wkv7("triton") is tri.wkv7_triton and get_wkv7("triton_step_") is tri.wkv7_triton_step_


@pytest.fixture(scope="module")
def parity_pair(ckpt_dir):
    from rwkv.model import RWKV
    from bench.random_checkpoint import write_checkpoint
    from engine import load_model
    stem = ckpt_dir / "triton-parity"
    write_checkpoint(f"{stem}.pth", PARITY_SHAPES["c128-n32-v0present"], seed=3)
    ours = load_model(f"{stem}.pth", f"{DEV.type} fp32", wkv_backend="triton")
    return ours, RWKV(str(stem), "cpu fp32")


def test_model_forward_matches_rwkv_package(parity_pair):
    """The whole model through wkv_backend="triton" (a 17-token prompt, then decode steps) against the package."""
    ours, theirs = parity_pair
    assert ours.wkv_backend == "triton" and ours.decode_kernel == "triton"
    tokens = torch.randint(0, ours.config.vocab_size, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    expected, _ = theirs.forward(tokens, None, full_output=True)
    logits, state = ours.forward(torch.tensor([tokens[:17]], device=DEV), None, full_output=True)   # chunked form
    assert rel_err(logits[0].float().cpu(), expected[:17].float()) <= 1e-4
    for t in range(17, 20):                                       # T = 1: the in-place decode step
        logits, state = ours.forward(torch.tensor([[tokens[t]]], device=DEV), state)
        assert rel_err(logits[0].float().cpu(), expected[t].float()) <= 1e-4, t


# ------------------------------------------------------------------------------- GPU only: real head sizes
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_head64_long_prompts(dtype):
    args = inputs(4, 700, 8, 64, dtype, seed=31)
    y_ref, s_ref = reference(*args)
    for chunk_len in (0, 16, 32):
        y, s = tri.wkv7_triton(*args, chunk_len=chunk_len)
        assert close(y, y_ref, dtype) and close(s, s_ref, dtype), chunk_len
    state = args[-1].clone()
    y1 = get_wkv7("triton_step_")(*(t[:, :1] for t in args[:-1]), state)
    y1_ref, s1_ref = reference(*(t[:, :1] for t in args[:-1]), args[-1])
    assert close(y1, y1_ref, dtype) and close(state, s1_ref, dtype)


@pytest.mark.slow
@pytest.mark.skipif(CUDA, reason="checks the CPU-only refusal")
def test_without_cuda_or_interpreter_the_backend_says_why(tiny_pth):
    """On a CPU without the interpreter, choosing triton fails at load time with the reason, not at the first
    prompt (a fresh process: this one has the interpreter on)."""
    import subprocess
    code = ("from engine import load_model\nfrom engine.errors import ModelLoadError\n"
            f"try:\n    load_model({str(tiny_pth)!r}, 'cpu fp32', wkv_backend='triton')\n"
            "except ModelLoadError as exc:\n    print(exc)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "Triton kernels need a CUDA device" in out.stdout, out.stdout + out.stderr
