"""The int8 Triton product (kernels/quant_triton.py) and the `cuda fp16i8` / `cuda bf16i8` strategies.

Without CUDA the kernel runs on CPU tensors under the Triton interpreter, switched on by tests/test_triton.py's
import (which skips this module too when triton is missing): against a float64 reference for odd M, N and K, both
scale layouts (one fp32 scale per row; fp16 scales per 32 columns, GGUF Q8_0) and odd groups, fp16 and bf16
activations, and against the torch fallback. The model-level path runs on the CPU too: quant.TRITON_DEVICES is
the hook that gives a CPU model the Triton product, so a random checkpoint loaded with it (native kernels off) goes
through every quantized product of a CUDA model (projections, FFN, head; prompts on tl.dot, decode on the FMA
path; the static decode step of engine/cuda_graphs.py) and is compared with the same model on dequantized float
weights. The tests marked gpu load `cuda fp16i8` / `cuda bf16i8` for real (skipped here; bench/gpu_check.sh).
"""
from __future__ import annotations

import pytest
import torch

from tests.conftest import PARITY_SHAPES, rel_err
from tests.test_triton import CUDA, DEV  # importing it turns the interpreter on without CUDA

import kernels.quant_triton as qt  # noqa: E402
from engine.model import quant  # noqa: E402

if not CUDA and not qt.interpreting():      # imported earlier, compiled for a GPU: load it again, interpreted
    import importlib
    qt = importlib.reload(qt)

ULP = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}     # the most relative rounding of a value: half an ulp
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def operands(M, K, N, group, dtype, scale_dtype=torch.float32, seed=0):
    """x [M, K] in dtype, codes [N, K] int8 and scales [N, ceil(K / group)] as a quantizer would give them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    codes = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    scales = (torch.rand(N, -(-K // group), generator=g) * 0.02 + 1e-3).to(scale_dtype)
    return x, codes, scales


def reference(x, codes, scales, group, round_weights_to=None):
    """x @ (codes * scales)^T in float64; round_weights_to rounds each weight first (what F.linear on a dequantized
    copy, and the kernel's odd-group tl.dot path, multiply)."""
    K = codes.shape[1]
    w = codes.double() * scales.double().repeat_interleave(group, 1)[:, :K]
    if round_weights_to is not None:
        w = w.to(round_weights_to).double()
    return x.double() @ w.t()


CASES = [  # M, K, N, group: the path each takes is checked in test_launch_config_covers_every_path
    (1, 100, 33, 100), (3, 70, 17, 70), (4, 129, 40, 32), (1, 96, 50, 32),         # FMA: per row, per group
    (5, 96, 40, 96), (17, 130, 70, 130), (70, 64, 9, 64),                          # tl.dot, one scale per row
    (6, 96, 33, 32), (33, 100, 70, 32), (65, 40, 20, 32),                          # tl.dot, Q8_0's groups of 32
    (7, 100, 19, 48), (9, 100, 19, 10), (2, 100, 19, 10),      # odd groups: blocks of 16; per weight; FMA
]


@pytest.mark.parametrize("M,K,N,group", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_matches_float64(M, K, N, group, dtype):
    """Exact up to the output's rounding (fp32 sums, scales applied in fp32), except odd groups on tl.dot, whose
    weights are rounded to x's dtype first (as F.linear on a dequantized copy would)."""
    scale_dtype = torch.float16 if group == 32 else torch.float32        # GGUF Q8_0: fp16 scales per 32 columns
    x, codes, scales = operands(M, K, N, group, dtype, scale_dtype, seed=M * K + N)
    cfg = qt.launch_config(M, K, group)
    rounded = cfg["USE_DOT"] and cfg["SCALE"] == qt.SCALE_ELEMENT
    want = reference(x, codes, scales, group, dtype if rounded else None)
    got = qt.int8_matmul_triton(x.to(DEV), codes.to(DEV), scales.to(DEV), group)
    assert got.dtype == dtype and got.shape == (M, N)
    assert rel_err(got.cpu(), want) <= ULP[dtype] + 1e-5
    fallback = quant.dequantized_product(x, quant.Int8Weight(codes, scales, group))     # W rounded to x's dtype
    assert rel_err(got.cpu(), fallback) <= 3 * ULP[dtype]


def test_launch_config_covers_every_path():
    """CASES reach the FMA path with both scale placements and tl.dot with all three."""
    seen = {(c["USE_DOT"], c["SCALE"]) for c in (qt.launch_config(M, K, g) for M, K, _, g in CASES)}
    assert seen == {(False, qt.SCALE_ROW), (False, qt.SCALE_ELEMENT), (True, qt.SCALE_ROW), (True, qt.SCALE_BLOCK),
                    (True, qt.SCALE_ELEMENT)}
    assert qt.launch_config(300, 768, 32)["BLOCK_K"] == 32 and qt.launch_config(300, 768, 48)["BLOCK_K"] == 16


def test_leading_dims_strided_rows_and_empty_inputs():
    """x [B, T, K] comes back [B, T, N]; a strided x (a column slice) is read as it is; M = 0 launches nothing."""
    x, codes, scales = operands(6, 80, 24, 80, torch.float16, seed=1)
    wide = torch.zeros(6, 100, dtype=torch.float16)
    wide[:, 10:90] = x
    want = reference(x, codes, scales, 80)
    dev = [t.to(DEV) for t in (codes, scales)]
    got = qt.int8_matmul_triton(wide.to(DEV)[:, 10:90], *dev, 80)
    assert rel_err(got.cpu(), want) <= ULP[torch.float16]
    got3 = qt.int8_matmul_triton(x.to(DEV).view(2, 3, 80), *dev, 80)
    assert got3.shape == (2, 3, 24) and torch.equal(got3.reshape(6, 24), qt.int8_matmul_triton(x.to(DEV), *dev, 80))
    assert qt.int8_matmul_triton(x[:0].to(DEV), *dev, 80).shape == (0, 24)


def test_bad_operands_are_refused_naming_what_is_wrong():
    x, codes, scales = operands(2, 64, 8, 64, torch.float16)
    with pytest.raises(ValueError, match="fp16 or bf16 activations, got torch.float32"):
        qt.int8_matmul_triton(x.float(), codes, scales, 64)
    with pytest.raises(ValueError, match="x has 63 columns but the int8 weight \\[8, 64\\] takes 64"):
        qt.int8_matmul_triton(x[:, :63], codes, scales, 64)
    with pytest.raises(ValueError, match="int8 scales must be .* \\[8, 2\\] for group 32"):
        qt.int8_matmul_triton(x, codes, scales, 32)
    with pytest.raises(ValueError, match="int8 codes must be a 2-D int8 tensor"):
        qt.int8_matmul_triton(x, codes.to(torch.uint8), scales, 64)


# ------------------------------------------------------------------------------- select_quantized on a "GPU"
@pytest.fixture
def triton_on_cpu(monkeypatch):
    """The hook: CPU models take the Triton int8 product (interpreted), as CUDA models do."""
    monkeypatch.setattr(quant, "TRITON_DEVICES", ("cuda", "cpu"))


def test_select_quantized_prepares_int8_weights_for_the_kernel(triton_on_cpu):
    from engine.model.linear import select_linear
    lin = quant.select_quantized("i8", DEV, select_linear(DEV, torch.bfloat16))
    assert lin.name == "int8-triton"
    w = torch.randn(40, 72, generator=torch.Generator().manual_seed(2))
    prepared = lin.prepare(w)                                # quantized on the CPU, codes and scales on the device
    assert isinstance(prepared, quant.Int8Weight) and prepared.codes.device.type == DEV.type
    assert torch.equal(prepared.codes.cpu(), quant.quantize_int8(w).codes)
    stored = quant.Int8Weight(*operands(1, 72, 40, 32, torch.float16, torch.float16)[1:], 32)     # a Q8_0 matrix
    kept = lin.prepare(stored)
    assert kept.group == 32 and kept.scales.dtype == torch.float16 and torch.equal(kept.codes.cpu(), stored.codes)
    with pytest.raises(ValueError, match="a i4 weight cannot serve an i8 strategy"):
        lin.prepare(quant.quantize_int4(w))
    x = torch.randn(3, 72).to(torch.bfloat16).to(DEV)
    assert rel_err(lin.fn(x, prepared).float().cpu(), x.float().cpu() @ prepared.dequantize().t()) < 2 * ULP[x.dtype]
    floats = torch.randn(8, 72).to(torch.bfloat16).to(DEV)  # a float matrix (no family left out today) takes F.linear
    assert torch.equal(lin.fn(x, floats), torch.nn.functional.linear(x, floats))


def test_select_quantized_refuses_int4_on_the_gpu_path(triton_on_cpu):
    from engine.model.linear import select_linear
    with pytest.raises(ValueError, match="int8 \\(i8\\) only; use an fp16i8 or bf16i8 strategy"):
        quant.select_quantized("i4", DEV, select_linear(DEV, torch.bfloat16))


def test_without_triton_the_gpu_product_dequantizes(triton_on_cpu, monkeypatch):
    """Where triton does not import, the same strategy runs dequantize + F.linear (with a warning)."""
    import builtins
    real_import = builtins.__import__

    def no_triton(name, *args, **kwargs):
        if name == "kernels.quant_triton":
            raise ImportError("no triton here")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_triton)
    from engine.model.linear import select_linear
    lin = quant.select_quantized("i8", torch.device("cpu"), select_linear(torch.device("cpu"), torch.bfloat16))
    assert lin.name == "int8-torch" and lin.fn is not None
    w = lin.prepare(torch.randn(16, 40))
    x = torch.randn(2, 40).to(torch.bfloat16)
    assert torch.equal(lin.fn(x, w), torch.nn.functional.linear(x, w.dequantize(torch.bfloat16)))


# ------------------------------------------------------------------------------- the model, on the CPU
@pytest.fixture(scope="module")
def checkpoint(ckpt_dir):
    from bench.random_checkpoint import write_checkpoint
    path = ckpt_dir / "quant-triton.pth"
    write_checkpoint(path, PARITY_SHAPES["c192-f500-v0absent"], seed=6)
    return path


def triton_model(path, dtype: torch.dtype, monkeypatch):
    """The checkpoint as a CUDA int8 strategy would load it, on DEV: the Triton product for every big matrix."""
    from engine.formats.checkpoint import load_weights
    from engine.model.rwkv7 import RWKV7
    from engine.model.strategy import Strategy
    monkeypatch.setattr(quant, "TRITON_DEVICES", ("cuda", "cpu"))
    sd, config = load_weights(path, "i8")
    name = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    strategy = Strategy(device=DEV, dtype=dtype, text=f"{DEV.type} {name}i8", quant="i8")
    return RWKV7(sd, config, strategy, native_kernels=False)


def dequantized_twin(path, dtype: torch.dtype):
    """The same model on float weights: each quantized matrix's dequantized values, in ``dtype``."""
    from engine.formats.checkpoint import load_weights
    from engine.model.rwkv7 import RWKV7
    from engine.model.strategy import Strategy
    sd, config = load_weights(path)
    for key in sd:
        if quant.quantizable(key):
            sd[key] = quant.quantize_int8(sd[key]).dequantize()
    return RWKV7(sd, config, Strategy(device=torch.device("cpu"), dtype=dtype, text="cpu", quant=None),
                 native_kernels=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_model_through_the_triton_product_matches_dequantized_floats(checkpoint, monkeypatch, dtype):
    """A 12-token prompt at batch 2 (tl.dot: 24 rows), then 3 decode steps (the FMA path, 2 rows), logits and
    states against the same model on dequantized float weights in the same activation dtype."""
    from engine.model.rwkv7 import RWKV7
    calls, real = [], qt.int8_matmul_triton
    monkeypatch.setattr(qt, "int8_matmul_triton", lambda *a: calls.append(tuple(a[0].shape)) or real(*a))
    model = triton_model(checkpoint, dtype, monkeypatch)
    assert isinstance(model, RWKV7) and model.linear_backend.startswith("int8-triton")
    for w in [model.head] + [getattr(lw, n) for lw in model.layers for n in ("w_r", "w_k", "w_v", "w_out",
                                                                               "ffn_key", "ffn_value")]:
        assert isinstance(w, quant.Int8Weight) and w.codes.device.type == DEV.type
    assert isinstance(model.layers[0].w1[0], torch.Tensor) and model.layers[0].w1[0].dtype == dtype   # LoRA float
    twin = dequantized_twin(checkpoint, dtype)
    tokens = torch.randint(0, model.config.vocab_size, (2, 15), generator=torch.Generator().manual_seed(1))
    got, state = model.forward(tokens[:, :12].to(DEV), None)
    want, want_state = twin.forward(tokens[:, :12], None)
    tol = 8 * ULP[dtype]
    assert rel_err(got.cpu(), want) < tol
    for t in range(12, 15):
        got, state = model.forward(tokens[:, t:t + 1].to(DEV), state)
        want, want_state = twin.forward(tokens[:, t:t + 1], want_state)
        assert rel_err(got.cpu(), want) < tol, t
    assert rel_err(state.wkv[-1].cpu(), want_state.wkv[-1]) < tol
    layers = model.config.n_layer
    assert len(calls) == 4 * (6 * layers + 1)                  # every big matrix of every forward took the kernel
    assert (2, 12, model.config.n_embd) in calls and (2, model.config.n_embd) in calls     # prompt, head, decode


def test_static_decode_step_runs_the_quantized_model(checkpoint, monkeypatch):
    """The engine's decode step over static buffers (engine/cuda_graphs.py; eager here, captured on CUDA): three
    sequences padded to bucket 4, their logits and greedy ids those of a plain forward of the same model."""
    from engine.cuda_graphs import DecodeGraphs
    from engine.request import SamplingParams
    from engine.sampling import SamplerRow, make_generator
    from engine.state_pool import StatePool
    model = triton_model(checkpoint, torch.bfloat16, monkeypatch)
    pool = StatePool(model, 4)
    graphs = DecodeGraphs(model, pool, capture=False)
    keys, tokens = ["a", "b", "c"], [5, 77, 300]
    for k in keys:
        pool.alloc(k)
    want, _ = model.forward(torch.tensor([[t] for t in tokens], device=DEV), model.zero_state(3))
    rows = [SamplerRow(SamplingParams(temperature=0), make_generator(0, i)) for i in range(3)]
    logits, ids = graphs.launch(keys, tokens, rows)
    assert rel_err(logits.float().cpu(), want.cpu()) < 1e-6
    assert ids() == want.argmax(-1).tolist()


@pytest.fixture(scope="module")
def stored_files(checkpoint, tmp_path_factory):
    """The checkpoint as GGUF Q8_0 (groups of 32, fp16 scales) and as a `goose convert --dtype i8` file."""
    from engine.formats.convert import convert
    d = tmp_path_factory.mktemp("quant-triton")
    for name, dtype in (("m-q8_0.gguf", "q8_0"), ("m-i8.safetensors", "i8")):
        convert(checkpoint, d / name, dtype=dtype, progress=False, note=lambda text: None)
    return d


@pytest.mark.parametrize("name,group", [("m-q8_0.gguf", 32), ("m-i8.safetensors", None)])
def test_stored_int8_weights_load_as_stored_through_the_triton_product(stored_files, triton_on_cpu, name, group):
    """load_model itself, as for `cuda bf16i8`: the file's codes and scales moved to the device as they are (a Q8_0
    file's groups of 32 take the kernel's per-group path), logits as the CPU's native int8 product gives them."""
    from engine import load_model
    path = stored_files / name
    model = load_model(path, f"{DEV.type} bf16i8", native_kernels=False)
    native = load_model(path, "cpu bf16i8", native_kernels=False)
    assert model.linear_backend.startswith("int8-triton")
    w, want_w = model.layers[1].w_k, native.layers[1].w_k
    assert w.group == want_w.group == (group or w.shape[1]) and w.scales.dtype == want_w.scales.dtype
    assert torch.equal(w.codes.cpu(), want_w.codes) and torch.equal(w.scales.cpu(), want_w.scales)
    toks = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(3))
    got, _ = model.forward(toks.to(DEV), None, full_output=True)
    want, _ = native.forward(toks, None, full_output=True)
    assert rel_err(got.float().cpu(), want) < 3e-2


# ------------------------------------------------------------------------------- on a GPU (bench/gpu_check.sh)
DEFAULT_MODEL = __import__("pathlib").Path(__file__).resolve().parent.parent / "models" / "rwkv7-austen" / \
    "model.safetensors"


def dequantized_on(device, path, dtype_name: str, backend: str):
    """``path`` as `cuda <dtype>` on the dequantized values of its int8 matrices: the float twin of `cuda ...i8`."""
    from engine.formats.checkpoint import load_weights
    from engine.model.rwkv7 import RWKV7
    from engine.model.strategy import parse_strategy, prepare_device
    sd, config = load_weights(path)
    for key in sd:
        if quant.quantizable(key):
            sd[key] = quant.quantize_int8(sd[key]).dequantize()
    strategy = parse_strategy(f"{device} {dtype_name}")
    prepare_device(strategy)
    return RWKV7(sd, config, strategy, wkv_backend=backend)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["chunked", "triton"])
@pytest.mark.parametrize("dtype_name", ["fp16", "bf16"])
def test_cuda_int8_strategies_on_the_default_model(dtype_name, backend):
    """`cuda fp16i8` / `cuda bf16i8` for real: a 40-token prompt then 8 decode steps, within the int8 quantization's
    distance of `cuda fp16` / `cuda bf16` (1.6% of the max logit on CPU), and within a few roundings of the same
    model on dequantized float weights (which isolates the kernel)."""
    from engine import load_model
    model = load_model(DEFAULT_MODEL, f"cuda {dtype_name}i8", wkv_backend=backend)
    floats = load_model(DEFAULT_MODEL, f"cuda {dtype_name}", wkv_backend=backend)
    twin = dequantized_on("cuda", DEFAULT_MODEL, dtype_name, backend)
    assert model.linear_backend.startswith("int8-triton")
    assert model.head.codes.is_cuda and model.layers[0].ffn_key.codes.dtype == torch.int8
    toks = torch.randint(0, model.config.vocab_size, (2, 48), device="cuda",
                         generator=torch.Generator("cuda").manual_seed(0))
    got, s = model.forward(toks[:, :40], None, full_output=True)
    want, s_f = floats.forward(toks[:, :40], None, full_output=True)
    exact, s_t = twin.forward(toks[:, :40], None, full_output=True)
    tight = 8 * ULP[model.dtype]
    assert rel_err(got, want) < 0.05 and rel_err(got, exact) < tight
    for t in range(40, 48):
        got, s = model.forward(toks[:, t:t + 1], s)
        want, s_f = floats.forward(toks[:, t:t + 1], s_f)
        exact, s_t = twin.forward(toks[:, t:t + 1], s_t)
        assert rel_err(got, want) < 0.05 and rel_err(got, exact) < tight, t
        assert torch.isfinite(got).all()


@pytest.mark.gpu
@gpu
def test_cuda_int8_loads_without_a_float_copy_on_the_device():
    """An fp32 state dict on the CPU whose FFN matrices (2048 x 8192, 64 MB each in fp32) dwarf the rest, loaded as
    `cuda fp16i8`: the device's peak during loading is the model it ends with (int8 matrices, fp16 embedding and
    LoRA) plus the embedding's fp32 layer norm and a few MB, never a float matrix."""
    from bench.random_checkpoint import CheckpointShape, random_state_dict
    from engine.formats.checkpoint import infer_config
    from engine.model.rwkv7 import RWKV7
    from engine.model.strategy import parse_strategy, prepare_device
    sd = random_state_dict(CheckpointShape(n_layer=2, n_embd=2048, vocab_size=1024, dim_ffn=8192), seed=0)
    emb_fp32 = sd["emb.weight"].numel() * 4
    strategy = parse_strategy("cuda fp16i8")
    prepare_device(strategy)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = RWKV7(sd, infer_config(sd, "ffn-heavy"), strategy, wkv_backend="triton")
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - base
    assert isinstance(model.head, quant.Int8Weight) and model.head.codes.is_cuda
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < kept + 2 * emb_fp32 + (16 << 20), (peak, kept)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("M", [1, 3, 64, 256, 1024])
@pytest.mark.parametrize("group", [None, 32])
def test_kernel_at_model_shapes(M, group):
    """The 1.5B shapes' products (2048 x 2048, FFN 8192 x 2048 and back, head 65536 x 2048) at decode and prefill
    row counts, fp16 and bf16, per-row and Q8_0 scales, against float64 on the same device."""
    g = torch.Generator("cuda").manual_seed(M)
    for N, K in ((2048, 2048), (8192, 2048), (2048, 8192), (65536, 2048)):
        grp = group or K
        codes = torch.randint(-127, 128, (N, K), generator=g, device="cuda", dtype=torch.int8)
        scales = (torch.rand(N, -(-K // grp), generator=g, device="cuda") * 0.02 + 1e-3).to(
            torch.float16 if group else torch.float32)
        for dtype in (torch.float16, torch.bfloat16):
            x = torch.randn(M, K, generator=g, device="cuda").to(dtype)
            got = qt.int8_matmul_triton(x, codes, scales, grp)
            w = codes.double() * scales.double().repeat_interleave(grp, 1)[:, :K]
            assert rel_err(got, x.double() @ w.t()) <= ULP[dtype] + 1e-4, (N, K, dtype)


@pytest.mark.gpu
@gpu
def test_cuda_int8_decode_graphs_equal_eager_and_need_no_host_sync():
    """`cuda fp16i8` through the engine's captured decode step: equal to the eager static step, and launching one
    raises nothing under sync debug mode "error" (the kernel neither syncs nor allocates by data)."""
    from engine import load_model
    from engine.cuda_graphs import DecodeGraphs
    from engine.request import SamplingParams
    from engine.sampling import SamplerRow, make_generator
    from engine.state_pool import StatePool
    model = load_model(DEFAULT_MODEL, "cuda fp16i8", wkv_backend="triton")
    pool, eager_pool = StatePool(model, 8), StatePool(model, 8)
    graphs = DecodeGraphs(model, pool)
    graphs.capture_all()
    eager = DecodeGraphs(model, eager_pool, capture=False)
    keys = ["a", "b", "c"]
    for p in (pool, eager_pool):
        for k in keys:
            p.alloc(k)
    rows = lambda: [SamplerRow(SamplingParams(temperature=0), make_generator(7, i)) for i in range(3)]  # noqa: E731
    toks = [11, 12, 13]
    for step in range(4):
        got_logits, got_ids = graphs.launch(keys, toks, rows())
        want_logits, want_ids = eager.launch(keys, toks, rows())
        assert rel_err(got_logits.float(), want_logits.float()) < 1e-3, step
        assert len(got_ids()) == 3
        toks = want_ids()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _, ids = graphs.launch(keys, toks, rows())
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert graphs.fallbacks == 0 and len(ids()) == 3
