"""The native quantized products (kernels/csrc/quant_cpu.cpp) against float, and GGUF Q8_0/Q4_0 loaded as stored."""
import numpy as np
import pytest
import torch

from bench.random_checkpoint import CheckpointShape, write_checkpoint
from engine import ModelLoadError, load_model
from engine.formats.convert import convert
from engine.formats.gguf import GGUFFile, require_gguf
from engine.model import quant
from kernels import native_build
from kernels.quant_native import quant_dequantize, quant_matmul
from tests.conftest import rel_err

pytestmark = pytest.mark.skipif(not native_build.available(), reason="the native kernels do not build here")

# odd N, K not a multiple of 8 or of the group, M across the row-tile sizes (1, 3, 4 + 1, ...) and the dense cut
SHAPES = [(1, 7, 13), (3, 33, 100), (17, 80, 96), (64, 50, 777), (5, 19, 2048)]


def _weights(bits, n, k, group, scale_dtype, zeros, g):
    groups = -(-k // group)
    scales = (torch.rand(n, groups, generator=g) * 0.1 + 0.01).to(scale_dtype)
    if bits == 8:
        codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        return quant.Int8Weight(codes, scales, group)
    codes = quant.pack_int4(torch.randint(0, 16, (n, -(-k // 32) * 32), generator=g))
    z = (torch.randn(n, groups, generator=g) * 0.05).to(scale_dtype) if zeros else None
    return quant.Int4Weight(codes, scales, z, group, k)


def _reference(w) -> torch.Tensor:
    """W in float64 from the codes, with torch only (the native dequantize is under test too)."""
    bits, codes, scales, zeros, group, k = w.parts()
    if bits == 8:
        q = codes.double()
    else:
        b = codes.view(codes.shape[0], -1, 16)
        q = torch.cat((b & 15, b >> 4), dim=2).reshape(codes.shape[0], -1)[:, :k].double() - 8
    out = q * scales.double().repeat_interleave(group, 1)[:, :k]
    return out if zeros is None else out + zeros.double().repeat_interleave(group, 1)[:, :k]


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,group,scale_dtype,zeros", [
    (8, 32, torch.float16, False),        # GGUF Q8_0
    (8, None, torch.float32, False),      # one scale per row (cpu fp32i8)
    (4, 32, torch.float16, False),        # GGUF Q4_0
    (4, 64, torch.bfloat16, True),        # cpu fp32i4 (asymmetric, group 64)
])
def test_native_product_matches_float(m, n, k, xdtype, bits, group, scale_dtype, zeros):
    g = torch.Generator().manual_seed(m * 1000 + n)
    w = _weights(bits, n, k, group or k, scale_dtype, zeros, g)
    x = torch.randn(m, k, generator=g).to(xdtype)
    want = x.double() @ _reference(w).t()
    y = quant_matmul(x, *w.parts())
    assert y.dtype == xdtype and y.shape == (m, n)
    # fp32 sums throughout; on CPUs with AVX-512 VNNI, int4 (and int8 with one scale a row beyond 4 rows of x) round
    # x to int16 first (kernels/csrc/products_cpu.cpp)
    exact = 2e-6 if bits == 8 and (m <= 4 or group) else 5e-4
    assert rel_err(y.float(), want) < (exact if xdtype == torch.float32 else 1e-2)
    assert rel_err(quant_matmul(x, *w.parts(), out_dtype=torch.float32), want) < exact
    assert rel_err(quant_dequantize(*w.parts()), _reference(w)) < 1e-7
    assert rel_err(quant_matmul(x[:, :].t().contiguous().t(), *w.parts()).float(), want) < 1e-2   # strided x


@pytest.mark.parametrize("kind", ["i8", "i4"])
def test_few_rows_native_many_rows_dense_agree(kind, monkeypatch):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(96, 200, generator=g)
    qw = quant.quantize_int8(w) if kind == "i8" else quant.quantize_int4(w)
    x = torch.randn(3, 40, 200, generator=g)
    native = quant.quantized_product(x, qw)               # 120 rows > DENSE_ROWS: dense
    monkeypatch.setattr(quant, "DENSE_ROWS", 1000)
    assert rel_err(quant.quantized_product(x, qw), native) < 5e-4        # the kernel may round x to int16 (VNNI)
    assert native.shape == (3, 40, 96)


def test_fp32_rows_are_not_rounded_to_bf16():
    """The old path rounded fp32 rows to bf16 (~3e-3 relative); the native product keeps them."""
    g = torch.Generator().manual_seed(6)
    qw = quant.quantize_int8(torch.randn(64, 256, generator=g))
    x = torch.randn(2, 256, generator=g)
    assert rel_err(quant.quantized_product(x, qw), x.double() @ qw.dequantize().double().t()) < 1e-6


def test_bad_quantized_weights_are_refused():
    with pytest.raises(ValueError, match="int8 scales must be"):
        quant.Int8Weight(torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 3), 32)
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.Int4Weight(torch.zeros(4, 32, dtype=torch.uint8), torch.ones(4, 3), None, 24, 64)
    with pytest.raises(ValueError, match=r"x must be float32 or bfloat16 CPU rows \[M, 64\]"):
        quant_matmul(torch.zeros(2, 63), 8, torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 2), None, 32, 64)


# ------------------------------------------------------------------------------------------ GGUF Q8_0 / Q4_0
SHAPE = CheckpointShape(n_layer=2, n_embd=128, vocab_size=300, dim_ffn=224, logit_scale=4.0)
# FFN rows of 200 (not a multiple of 32): the FFN value matrix stays F16 in the file and is quantized at load
ODD = CheckpointShape(n_layer=1, n_embd=128, vocab_size=300, dim_ffn=200)


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    d = tmp_path_factory.mktemp("qgguf")
    write_checkpoint(d / "m.pth", SHAPE, seed=3)
    write_checkpoint(d / "odd.pth", ODD, seed=4)
    for src, dtype in (("m", "q8_0"), ("m", "q4_0"), ("odd", "q4_0")):
        convert(d / f"{src}.pth", d / f"{src}-{dtype}.gguf", dtype=dtype, progress=False, note=lambda text: None)
    return d


@pytest.mark.parametrize("dtype,strategy,cls,bits", [
    ("q8_0", "cpu fp32i8", quant.Int8Weight, 8), ("q8_0", "cpu bf16i8", quant.Int8Weight, 8),
    ("q4_0", "cpu fp32i4", quant.Int4Weight, 4), ("q4_0", "cpu bf16i4", quant.Int4Weight, 4),
])
def test_gguf_loads_quantized_as_stored(ggufs, dtype, strategy, cls, bits):
    path = ggufs / f"m-{dtype}.gguf"
    model = load_model(path, strategy)
    floats = load_model(path, "cpu fp32" if strategy.startswith("cpu fp32") else "cpu bf16")   # expanded
    toks = torch.randint(0, SHAPE.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    got, _ = model.forward(toks, None, full_output=True)
    want, _ = floats.forward(toks, None, full_output=True)
    assert rel_err(got, want) < ((1e-5 if bits == 8 else 1e-3) if "fp32" in strategy else 0.05)
    # the file's blocks as they are: group 32, fp16 scales, codes byte for byte; no float matrix
    Q = require_gguf().GGMLQuantizationType
    stored = {t.name: t for t in GGUFFile(path).tensors}["blk.1.time_mix_key.weight"]
    assert stored.tensor_type == getattr(Q, dtype.upper())
    w = model.layers[1].w_k
    assert isinstance(w, cls) and w.group == 32 and w.scales.dtype == torch.float16
    blocks = np.asarray(stored.data).reshape(w.shape[0], w.shape[1] // 32, -1)
    assert np.array_equal(w.codes.numpy().view(np.uint8).reshape(blocks.shape[0], blocks.shape[1], -1), blocks[..., 2:])
    assert w.nbytes == blocks.nbytes and w.codes.dtype == (torch.int8 if bits == 8 else torch.uint8)
    for lw in model.layers:
        for name in ("w_r", "w_k", "w_v", "w_out", "ffn_key", "ffn_value"):
            assert isinstance(getattr(lw, name), cls), name
    assert isinstance(model.head, cls)


def test_gguf_matrix_stored_float_is_quantized_at_load(ggufs):
    path = ggufs / "odd-q4_0.gguf"
    types = {t.name: t.tensor_type.name for t in GGUFFile(path).tensors}
    assert types["blk.0.channel_mix_value.weight"] == "F16" and types["blk.0.channel_mix_key.weight"] == "Q4_0"
    model = load_model(path, "cpu fp32i4")
    lw = model.layers[0]
    assert lw.ffn_key.group == 32 and lw.ffn_key.zeros is None                 # as stored
    assert lw.ffn_value.group == quant.GROUP_SIZE and lw.ffn_value.zeros is not None    # quantized at load
    toks = torch.randint(0, ODD.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
    got, _ = model.forward(toks, None, full_output=True)
    want, _ = load_model(path, "cpu fp32").forward(toks, None, full_output=True)
    assert rel_err(got, want) < 0.2                                           # one int4 rounding of one matrix


def test_gguf_quantized_under_the_other_kind_is_refused(ggufs):
    with pytest.raises(ModelLoadError, match=r"m-q4_0\.gguf: tensor 'blk\.0\.[a-z_]+\.weight' is Q4_0, which an i8 "
                                             r"strategy does not use; load this file with 'cpu fp32i4' or 'cpu bf16i4'"):
        load_model(ggufs / "m-q4_0.gguf", "cpu fp32i8")
    with pytest.raises(ModelLoadError, match=r"is Q8_0, which an i4 strategy does not use.*'cpu fp32i8' or "
                                             r"'cpu bf16i8'.*'cpu fp32'"):
        load_model(ggufs / "m-q8_0.gguf", "cpu bf16i4")


def test_unsupported_gguf_type_is_refused(tmp_path):
    gguf = require_gguf()
    path = tmp_path / "q41.gguf"
    w = gguf.GGUFWriter(str(path), "rwkv7")
    w.add_wkv_head_size(64)
    data = gguf.quants.quantize(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32),
                                gguf.GGMLQuantizationType.Q4_1)
    w.add_tensor("blk.0.time_mix_key.weight", data, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match=r"q41\.gguf: tensor 'blk\.0\.time_mix_key\.weight' has type Q4_1, which "
                                             r"Goose does not load; supported tensor types: F32, F16, BF16, F64, "
                                             r"Q8_0, Q4_0"):
        load_model(path, "cpu fp32")


def test_q4_0_writer_matches_gguf_reference(ggufs):
    """Goose's Q4_0 file holds exactly gguf's Q4_0 blocks (18 bytes per 32 weights) of the source matrix."""
    gguf = require_gguf()
    src = torch.load(ggufs / "m.pth", weights_only=True)["blocks.0.att.key.weight"].float().numpy()
    stored = {t.name: t for t in GGUFFile(ggufs / "m-q4_0.gguf").tensors}["blk.0.time_mix_key.weight"]
    ref = gguf.quants.quantize(src, gguf.GGMLQuantizationType.Q4_0)
    assert ref.shape[-1] == src.shape[1] // 32 * 18 and np.array_equal(np.asarray(stored.data), ref)
