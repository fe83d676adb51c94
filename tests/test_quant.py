"""Quantized weights (engine/model/quant.py): int8/int4 products against float, model closeness, strategy errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import ModelLoadError, load_model, parse_strategy
from engine.model import quant
from bench.random_checkpoint import CheckpointShape, write_checkpoint
from tests.conftest import rel_err

# odd sizes, K not a multiple of 8 (int8's kernel) nor of the int4 group, N not a multiple of 16/32
SHAPES = [(1, 96, 80), (3, 13, 7), (5, 500, 192), (64, 192, 500), (2, 100, 33), (300, 130, 64)]


def _xw(m, k, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_product_matches_its_dequantized_weight(m, k, n, dtype):
    x, w = _xw(m, k, n)
    qw = quant.quantize_int8(w)
    assert qw.shape == (n, k) and qw.codes.dtype == torch.int8
    deq = qw.dequantize()
    assert rel_err(deq, w) < 0.01                       # per-channel rounding: |err| <= scale / 2 = max|w| / 254
    y = quant.int8_product(x.to(dtype), qw)
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y.float(), x.to(dtype).float() @ deq.t()) < 0.01     # bf16 activations and output
    assert rel_err(y.float(), x @ w.t()) < 0.02


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_product_matches_its_dequantized_weight(m, k, n, dtype, group):
    x, w = _xw(m, k, n, seed=1)
    qw = quant.quantize_int4(w, group)
    assert qw.shape == (n, k)
    deq = qw.dequantize()
    assert deq.shape == (n, k)
    assert rel_err(deq, w) < 0.15                       # 16 levels per group
    y = quant.int4_product(x.to(dtype), qw)
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y.float(), x.to(dtype).float() @ deq.t()) < 0.01
    assert rel_err(y.float(), x @ w.t()) < 0.2


@pytest.mark.parametrize("kind", ["i8", "i4"])
def test_quantizing_by_row_chunks_changes_nothing(monkeypatch, kind):
    x, w = _xw(4, 96, 200, seed=4)
    fn = quant.quantize_int8 if kind == "i8" else quant.quantize_int4
    whole = fn(w)
    monkeypatch.setattr(quant, "CHUNK_ROWS", 64)
    chunked = fn(w)
    assert torch.equal(whole.dequantize(), chunked.dequantize())
    product = quant.int8_product if kind == "i8" else quant.int4_product
    assert torch.equal(product(x, whole), product(x, chunked))


def test_int4_codes_use_ggml_q4_0_nibble_order():
    """Column j of each 32-block in the low nibble of byte j, column j + 16 in the high one (gguf's Q4_0)."""
    q = torch.arange(64).remainder(16).view(1, 64)
    packed = quant.pack_int4(q)
    assert packed.shape == (1, 32)
    assert packed[0, 3].item() == (3 | (3 << 4)) and packed[0, 16 + 2].item() == (2 | (2 << 4))
    q = torch.randint(0, 16, (3, 64), generator=torch.Generator().manual_seed(0))
    w = quant.Int4Weight(quant.pack_int4(q), torch.ones(3, 2), None, 32, 64)
    assert torch.equal(w.dequantize(), q.float() - 8)


def test_dense_path_for_many_fp32_rows_agrees(monkeypatch):
    x, w = _xw(40, 200, 96, seed=2)
    q8, q4 = quant.quantize_int8(w), quant.quantize_int4(w)
    kernel = quant.int8_product(x, q8), quant.int4_product(x, q4)
    monkeypatch.setattr(quant, "DENSE_ROWS", 8)
    dense = quant.int8_product(x, q8), quant.int4_product(x, q4)
    assert rel_err(dense[0], kernel[0]) < 1e-5            # fp32 rows both ways
    assert rel_err(dense[1], kernel[1]) < 5e-4            # the int4 kernel may round x to int16 (AVX-512 VNNI)
    assert rel_err(dense[0], x @ q8.dequantize().t()) < 1e-5


def test_int4_group_must_be_a_multiple_of_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.quantize_int4(torch.randn(32, 64), 48)


@pytest.fixture(scope="module")
def quant_pth(tmp_path_factory):
    path = tmp_path_factory.mktemp("quant") / "q.pth"
    shape = CheckpointShape(n_layer=3, n_embd=192, vocab_size=777, dim_ffn=500, logit_scale=4.0)
    write_checkpoint(path, shape, seed=3)
    return path


# max |logit - fp32 logit| / max |fp32 logit| and top-1 agreement on a random model (its weights are Gaussian,
# the hardest case for 4-bit groups; trained weights do better, see the README's quality table)
BOUNDS = {"cpu bf16": (0.03, 0.95), "cpu fp32i8": (0.06, 0.9), "cpu bf16i8": (0.06, 0.9),
          "cpu fp32i4": (0.6, 0.5), "cpu bf16i4": (0.6, 0.5)}


@pytest.mark.parametrize("strategy", list(BOUNDS))
def test_quantized_model_close_to_fp32(quant_pth, strategy):
    toks = torch.randint(0, 777, (2, 40), generator=torch.Generator().manual_seed(0))
    ref, _ = load_model(quant_pth, "cpu fp32").forward(toks, None, full_output=True)
    model = load_model(quant_pth, strategy)
    out, state = model.forward(toks, None, full_output=True)
    dev = float((out - ref).abs().max() / ref.abs().max())
    agree = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    max_dev, min_agree = BOUNDS[strategy]
    assert dev < max_dev and agree >= min_agree, (dev, agree)
    # decode token by token continues the same sequence as the prompt pass
    steps, _ = model.forward(toks[:, :20], None, full_output=True)
    s = model.zero_state(2)
    for t in range(20):
        one, s = model.forward(toks[:, t:t + 1], s)
    # bf16 models: single-token steps take the LoRA chains in fp32 (kernels/native_decode.py), prompts in bf16;
    # each is ~2% of the max logit from fp32 on this random model, so they differ by about 1%
    assert rel_err(one, steps[:, -1]) < (2e-2 if "bf16" in strategy else 1e-2)


def test_quantized_strategy_names_its_weights(quant_pth):
    model = load_model(quant_pth, "cpu bf16i8")
    assert model.strategy.text == "cpu bf16i8" and model.strategy.quant == "i8"
    assert isinstance(model.head, quant.Int8Weight) and isinstance(model.layers[0].ffn_key, quant.Int8Weight)
    assert isinstance(model.layers[0].w1[0], torch.Tensor)                      # LoRA stays float
    assert isinstance(load_model(quant_pth, "cpu fp32i4").layers[1].w_r, quant.Int4Weight)


@pytest.mark.parametrize("text", ["cpu fp32i8", "cpu bf16i8", "cpu fp32i4", " cpu bf16i4 "])
def test_quantized_strategies_parse(text):
    s = parse_strategy(text)
    assert s.quant in ("i8", "i4") and s.text == text.strip()


@pytest.mark.parametrize("text", ["cuda fp16i8", "cuda bf16i8", "cuda:1 fp16i8", " cuda:0 bf16i8 "])
def test_cuda_int8_strategies_parse(text):
    s = parse_strategy(text)
    assert s.quant == "i8" and s.device.type == "cuda" and s.text == text.strip()
    assert s.dtype == (torch.float16 if "fp16" in text else torch.bfloat16)


@pytest.mark.parametrize("text,hint", [
    ("cuda:1 bf16i4", "int4 weights \\(i4\\) are implemented for the CPU only"), ("cuda fp16i4", "CPU only"),
    ("cuda fp32i8", "int8 weights on CUDA take fp16 or bf16 activations"), ("cpu fp16i8", "cpu bf16"),
    ("cpu fp32i3", "valid forms"), ("cpu i8", "valid forms"), ("cpu fp32 i8", "valid forms"),
])
def test_impossible_quantized_strategies_are_refused(quant_pth, text, hint):
    with pytest.raises(ModelLoadError, match=hint) as info:
        load_model(quant_pth, text)
    assert "cpu fp32i8" in str(info.value) and "cpu bf16i4" in str(info.value)
    assert "cuda fp16i8" in str(info.value) and "cuda bf16i8" in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_int8_strategy_without_cuda(quant_pth):
    with pytest.raises(ModelLoadError, match="'cuda bf16i8' asks for CUDA, but torch sees no CUDA device"):
        load_model(quant_pth, "cuda bf16i8")


_RSS_SCRIPT = """
import gc, json, resource, sys, torch
from engine import load_model
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) * 1024
base = rss()
model = load_model(sys.argv[1], sys.argv[2])
gc.collect()
weights = 0
for t in [model.head] + [v for lw in model.layers for v in vars(lw).values()]:
    parts = t if isinstance(t, tuple) else (t,)
    weights += sum(p.nbytes for p in parts if p is not None)
print(json.dumps({"rss": rss() - base, "weights": weights + model.emb.nbytes}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/self/status")
def test_rss_after_loading_holds_no_float_copy(tmp_path):
    """A 0.1B-shaped fp32 checkpoint (~0.7 GB of float weights): after loading in cpu bf16i8, the process has
    grown by about the quantized model (int8 matrices, bf16 embedding), not by a float copy."""
    from bench.random_checkpoint import SHAPE_0B1
    path = tmp_path / "m.pth"
    write_checkpoint(path, SHAPE_0B1, seed=0)
    float_bytes = path.stat().st_size
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path), "cpu bf16i8"], check=True,
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["weights"] < 0.4 * float_bytes
    assert got["rss"] < got["weights"] + 0.15 * float_bytes, (got, float_bytes)


@pytest.mark.parametrize("kind", ["i8", "i4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_dense_path_dequantizes_big_weights_by_chunks_of_rows(kind, dtype, monkeypatch):
    """Many rows of x take the weight dequantized DENSE_CHUNK_BYTES at a time (a whole head would be fresh memory
    every call); the chunks give the product of the whole weight, bf16 rows through oneDNN's bf16 GEMM where it is
    native."""
    x, w = _xw(40, 200, 330, seed=7)
    qw = quant.quantize_int8(w) if kind == "i8" else quant.quantize_int4(w)
    x = x.to(dtype)
    monkeypatch.setattr(quant, "DENSE_ROWS", 8)
    monkeypatch.setattr(quant, "DENSE_ROWS_BF16", 8)
    whole = quant.quantized_product(x, qw)
    monkeypatch.setattr(quant, "DENSE_CHUNK_BYTES", 64 * 200 * 4)          # 64 rows a chunk: 6 chunks, one short
    chunked = quant.quantized_product(x, qw)
    assert chunked.dtype == dtype and chunked.shape == (40, 330)
    assert torch.equal(chunked, whole)
    want = x.double() @ qw.dequantize().double().t()
    assert rel_err(chunked, want) < (1e-5 if dtype == torch.float32 else 1e-2)
    part = qw.rows(64, 130)
    assert part.shape == (66, 200) and torch.equal(part.dequantize(), qw.dequantize()[64:130])
