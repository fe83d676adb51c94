"""Quantized safetensors from `goose convert --dtype i8|i4` (engine/formats/quantized.py): the stored codes load
as the strategies quantize, the layout is the documented plain one, and mismatched or bad files are refused."""
import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bench.random_checkpoint import CheckpointShape, write_checkpoint
from engine import ModelLoadError, load_model
from engine.formats.convert import main as convert_main
from engine.model import quant
from tests.conftest import PARITY_SHAPES, rel_err

SHAPES = {**PARITY_SHAPES,     # c192-f500: K = 500 is neither a multiple of 8 nor of the int4 group
          "c256-plain": CheckpointShape(n_layer=2, n_embd=256, head_size=64, vocab_size=1000)}
MATRICES = ("head.weight", "blocks.1.att.receptance.weight", "blocks.0.att.output.weight",
            "blocks.1.ffn.key.weight", "blocks.0.ffn.value.weight")


@pytest.fixture(scope="module", params=sorted(SHAPES))
def src(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("qfiles") / f"{request.param}.pth"
    write_checkpoint(path, SHAPES[request.param], seed=7)
    return path


def convert_to(src, dst, kind):
    assert convert_main([str(src), str(dst), "--dtype", kind, "--quiet"]) == 0
    return dst


def logits_of(model, T=24):
    toks = torch.arange(2 * T).view(2, T) * 7919 % model.config.vocab_size
    return model.forward(toks, None, full_output=True)[0]


@pytest.mark.parametrize("kind", ["i8", "i4"])
def test_stored_codes_give_the_logits_of_quantizing_at_load(src, tmp_path, kind):
    path = convert_to(src, tmp_path / f"q{kind}.safetensors", kind)
    for act in ("fp32", "bf16"):
        strategy = f"cpu {act}{kind}"
        at_load, from_file = load_model(src, strategy), load_model(path, strategy)
        assert torch.equal(logits_of(from_file), logits_of(at_load)), strategy
        w_file, w_load = from_file.layers[1].ffn_value, at_load.layers[1].ffn_value
        assert type(w_file) is type(w_load) and w_file.nbytes == w_load.nbytes
        assert torch.equal(w_file.dequantize(), w_load.dequantize())


def test_int8_layout_is_plain(src, tmp_path):
    path = convert_to(src, tmp_path / "q8.safetensors", "i8")
    stored, float_sd = load_file(path), torch.load(src, weights_only=True)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["goose.format"] == "rwkv7-quantized" and meta["goose.format_version"] == "2"
    assert meta["goose.quantization"] == "int8" and "goose.group_size" not in meta
    for name in MATRICES:
        w = float_sd[name]
        q, scale = stored[name], stored[name + "_scale"]
        assert q.dtype == torch.int8 and tuple(q.shape) == tuple(w.shape) and int(q.abs().max()) <= 127
        assert scale.dtype == torch.float32 and tuple(scale.shape) == (w.shape[0], 1)     # one scale per row
        deq = q.float() * scale
        assert torch.equal(deq, quant.quantize_int8(w).dequantize())
        assert rel_err(deq, w) < 0.01
    for name in ("emb.weight", "blocks.0.att.w1", "blocks.1.att.x_r", "ln_out.weight"):
        assert torch.equal(stored[name], float_sd[name])         # the rest as stored


def test_int4_layout_is_ggml_nibble_order(src, tmp_path):
    path = convert_to(src, tmp_path / "q4.safetensors", "i4")
    stored, float_sd = load_file(path), torch.load(src, weights_only=True)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    G = int(meta["goose.group_size"])
    assert meta["goose.quantization"] == "int4" and G == quant.GROUP_SIZE
    in_features = json.loads(meta.get("goose.in_features", "{}"))
    for name in MATRICES:
        w = float_sd[name]
        N, K = w.shape
        K32 = -(-K // 32) * 32
        assert in_features.get(name, K32) == K
        packed, scale, zero = stored[name], stored[name + "_scale"], stored[name + "_zero"]
        groups = -(-K // G)
        assert packed.dtype == torch.uint8 and tuple(packed.shape) == (N, K32 // 2)
        assert tuple(scale.shape) == tuple(zero.shape) == (N, groups) and scale.dtype == zero.dtype == torch.bfloat16
        blocks = packed.view(N, K32 // 32, 16)          # per 32 columns: j in the low nibble of byte j, j + 16 high
        codes = torch.cat((blocks & 15, blocks >> 4), dim=2).reshape(N, K32)[:, :K].float()
        expand = lambda t: t.float().repeat_interleave(G, 1)[:, :K]  # noqa: E731
        deq = (codes - 8) * expand(scale) + expand(zero)
        assert torch.equal(deq, quant.quantize_int4(w, G).dequantize())
        assert rel_err(deq, w) < 0.15


@pytest.mark.parametrize("kind", ["i8", "i4"])
def test_float_strategy_dequantizes_and_convert_goes_back_to_float(src, tmp_path, kind):
    path = convert_to(src, tmp_path / f"q{kind}.safetensors", kind)
    back = tmp_path / "back.safetensors"
    assert convert_main([str(path), str(back), "--quiet"]) == 0
    sd_back, sd_src = load_file(back), torch.load(src, weights_only=True)
    assert set(sd_back) == set(sd_src)
    fn = quant.quantize_int8 if kind == "i8" else quant.quantize_int4
    for name in MATRICES:
        assert torch.equal(sd_back[name], fn(sd_src[name]).dequantize())
    assert torch.equal(logits_of(load_model(path, "cpu fp32")), logits_of(load_model(back, "cpu fp32")))


def test_mismatched_strategy_is_refused_naming_the_file_and_the_strategies(tmp_path):
    src = tmp_path / "src.pth"
    write_checkpoint(src, SHAPES["c256-plain"], seed=3)
    q4 = convert_to(src, tmp_path / "q4.safetensors", "i4")
    q8 = convert_to(src, tmp_path / "q8.safetensors", "i8")
    with pytest.raises(ModelLoadError, match=r"q4\.safetensors: holds int4 weights.*cpu fp32i4 or cpu bf16i4"):
        load_model(q4, "cpu bf16i8")
    with pytest.raises(ModelLoadError, match=r"q8\.safetensors: holds int8 weights.*cpu fp32i8 or cpu bf16i8"):
        load_model(q8, "cpu fp32i4")


def _rewrite(path, out, edit):
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    sd = load_file(path)
    edit(sd, meta)
    save_file(sd, str(out), metadata=meta)
    return out


@pytest.mark.parametrize("kind, case, pattern", [
    ("i8", "missing_scale", r"bad\.safetensors: quantized tensor 'blocks\.1\.att\.key\.weight' has no "
                            r"'blocks\.1\.att\.key\.weight_scale'"),
    ("i4", "missing_zero", r"bad\.safetensors: quantized tensor 'head\.weight' has no 'head\.weight_zero'"),
    ("i8", "scale_shape", r"bad\.safetensors: tensor 'head\.weight_scale' is .*expected a float32, bfloat16 or "
                          r"float16 tensor of shape"),
    ("i4", "codes_shape", r"bad\.safetensors: tensor 'blocks\.0\.ffn\.key\.weight_scale' is .*expected"),
    ("i8", "version", r"bad\.safetensors: quantized file format 'rwkv7-quantized' version '9' is not supported"),
    ("i8", "kind", r"bad\.safetensors: unknown goose\.quantization 'int3'"),
    ("i4", "group", r"bad\.safetensors: int4 group size 48 is not a positive multiple of 32"),
    ("i8", "lora", r"bad\.safetensors: tensor 'blocks\.0\.att\.w1' is stored quantized"),
    ("i8", "orphan", r"bad\.safetensors: tensor 'blocks\.0\.att\.w1_scale' has no quantized matrix"),
])
def test_bad_quantized_files_are_refused_naming_file_and_tensor(tmp_path, kind, case, pattern):
    src = tmp_path / "src.pth"
    write_checkpoint(src, SHAPES["c256-plain"], seed=3)
    good = convert_to(src, tmp_path / "good.safetensors", kind)

    def edit(sd, meta):
        if case == "missing_scale":
            del sd["blocks.1.att.key.weight_scale"]
        elif case == "missing_zero":
            del sd["head.weight_zero"]
        elif case == "scale_shape":
            sd["head.weight_scale"] = sd["head.weight_scale"][:-1].clone()
        elif case == "codes_shape":       # whole groups of columns too few: the scales no longer match the codes
            sd["blocks.0.ffn.key.weight"] = sd["blocks.0.ffn.key.weight"][:, :-64].clone()
        elif case == "version":
            meta["goose.format_version"] = "9"
        elif case == "kind":
            meta["goose.quantization"] = "int3"
        elif case == "group":
            meta["goose.group_size"] = "48"
        elif case == "lora":
            sd["blocks.0.att.w1"] = sd["blocks.0.att.w1"].to(torch.int8)
        elif case == "orphan":
            sd["blocks.0.att.w1_scale"] = torch.ones(4, dtype=torch.bfloat16)
    bad = _rewrite(good, tmp_path / "bad.safetensors", edit)
    with pytest.raises(ModelLoadError, match=pattern):
        load_model(bad, f"cpu bf16{kind}")


def test_convert_refuses_what_it_cannot_write(tmp_path, capsys):
    src = tmp_path / "src.pth"
    write_checkpoint(src, SHAPES["c256-plain"], seed=3)
    assert convert_main([str(src), str(tmp_path / "out.gguf"), "--dtype", "i8"]) == 1
    assert re.search(r"--dtype i8 writes a quantized \.safetensors file, not gguf", capsys.readouterr().err)
    q8 = convert_to(src, tmp_path / "q8.safetensors", "i8")
    assert convert_main([str(q8), str(tmp_path / "again.safetensors"), "--dtype", "i4"]) == 1
    assert re.search(r"q8\.safetensors: is already quantized \(i8\)", capsys.readouterr().err)


def test_quantized_file_is_smaller_and_loads_without_float_matrices(tmp_path):
    src = tmp_path / "src.safetensors"
    write_checkpoint(src, SHAPES["c256-plain"], seed=3, dtype=torch.bfloat16)
    sizes = {kind: convert_to(src, tmp_path / f"q{kind}.safetensors", kind).stat().st_size for kind in ("i8", "i4")}
    assert sizes["i4"] < sizes["i8"] < 0.65 * src.stat().st_size     # a tiny model: float emb and LoRA weigh
    model = load_model(tmp_path / "qi4.safetensors", "cpu bf16i4")
    assert isinstance(model.head, quant.Int4Weight)
    assert all(isinstance(w, quant.Int4Weight) for lw in model.layers
               for w in (lw.w_r, lw.w_k, lw.w_v, lw.w_out, lw.ffn_key, lw.ffn_value))
