"""`goose convert`: round trips between .pth, safetensors, the fla-hub HF layout and GGUF; GGUF as llama.cpp reads it.

The GGUF expectations (names, shapes, types, metadata) are written here from the reference notes §3.3, independently of
engine/formats/gguf_write.py, and checked with gguf-py's own reader. The llama.cpp interop tests run only when
llama-cpp-python is installed (marker ``llamacpp``).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine import ModelLoadError, load_model
from engine.formats.convert import convert
from engine.formats.convert import main as convert_main
from bench.random_checkpoint import (
    SHAPE_0B1,
    CheckpointShape,
    random_state_dict,
    write_checkpoint,
)
from engine.text.tokenizer import (
    WORLD_VOCAB_PATH,
    HFTokenizer,
    WorldTokenizer,
    load_tokenizer,
    read_world_vocab,
)
from tests.conftest import PARITY_SHAPES, rel_err
from tests.test_weights import blinkdl_to_fla

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
AUSTEN_TOKENIZER = WORLD_VOCAB_PATH.parents[3] / "models" / "rwkv7-austen" / "tokenizer.json"
# Matrices that take the file type in GGUF (everything else is F32), in BlinkDL names.
FILE_TYPE_SUFFIXES = ("emb.weight", "head.weight", "att.receptance.weight", "att.key.weight", "att.value.weight",
                      "att.output.weight", "ffn.key.weight", "ffn.value.weight",
                      "att.a1", "att.a2", "att.v1", "att.v2", "att.g1", "att.g2")
Q8_STEPS = (0.5 + 127 * 2.0 ** -11) * 1.0001   # worst Q8_0 error in units of the block scale amax / 127
SHAPE_WORLD = CheckpointShape(n_layer=2, n_embd=64, head_size=32, vocab_size=65536, dim_ffn=224, decay_lora=32,
                              iclr_lora=32, value_lora=32, gate_lora=32)


def quiet_convert(*args, **kw):
    return convert(*args, progress=False, note=lambda text: None, **kw)


def layer0_value(key: str) -> bool:
    return key in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")


def takes_file_type(key: str) -> bool:
    return key.endswith(FILE_TYPE_SUFFIXES)


def logits_of(model, T=40):
    return model.forward(torch.arange(T).view(1, T) % model.config.vocab_size, None, full_output=True)[0]


@pytest.fixture(scope="module", params=sorted(PARITY_SHAPES))
def src(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("convert") / f"{request.param}.pth"
    write_checkpoint(path, PARITY_SHAPES[request.param], seed=5)
    return path


# ----------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("ftype", ["fp32", "fp16"])
def test_pth_gguf_safetensors_pth_round_trip(src, tmp_path, ftype):
    quiet_convert(src, tmp_path / "m.gguf", dtype=ftype)
    quiet_convert(tmp_path / "m.gguf", tmp_path / "m.safetensors")
    quiet_convert(tmp_path / "m.safetensors", tmp_path / "back.pth")
    orig, back = torch.load(src, weights_only=True), torch.load(tmp_path / "back.pth", weights_only=True)
    assert set(back) == {k for k in orig if not layer0_value(k)}      # layer-0 value LoRA is unused; GGUF drops it
    for key, want in orig.items():
        if layer0_value(key):
            continue
        got = back[key]
        assert got.shape == want.shape, key
        if ftype == "fp16" and takes_file_type(key):
            assert got.dtype == torch.float16, key
            assert torch.equal(got, want.half()), key
        else:
            assert got.dtype == torch.float32, key
            assert torch.equal(got, want), key


def test_fp16_source_round_trips_exactly(tmp_path):
    sd = random_state_dict(PARITY_SHAPES["c128-n32-v0present"], seed=2, dtype=torch.float16)
    torch.save(sd, tmp_path / "half.pth")
    quiet_convert(tmp_path / "half.pth", tmp_path / "m.gguf")           # file type follows the source: F16
    assert {t.tensor_type for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors} == {Q.F16, Q.F32}
    quiet_convert(tmp_path / "m.gguf", tmp_path / "m.safetensors", dtype="fp16")
    quiet_convert(tmp_path / "m.safetensors", tmp_path / "back.pth")
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    for key, want in sd.items():
        if not layer0_value(key):
            assert back[key].dtype == torch.float16 and torch.equal(back[key], want), key


def test_pth_safetensors_round_trip_keeps_everything(tmp_path):
    sd = random_state_dict(PARITY_SHAPES["c128-n32-v0present"], seed=4, dtype=torch.bfloat16)
    sd["blocks.1.ffn.x_k"] = sd["blocks.1.ffn.x_k"].reshape(-1)          # squeezed vectors are canonicalized
    torch.save(sd, tmp_path / "a.pth")
    quiet_convert(tmp_path / "a.pth", tmp_path / "a.safetensors")
    st = load_file(str(tmp_path / "a.safetensors"))                     # the official reader accepts our writer
    quiet_convert(tmp_path / "a.safetensors", tmp_path / "b.pth")
    back = torch.load(tmp_path / "b.pth", weights_only=True)
    assert set(st) == set(back) == set(sd)
    for key, want in sd.items():
        assert st[key].dtype == back[key].dtype == torch.bfloat16
        assert torch.equal(back[key].reshape(-1), want.reshape(-1)) and torch.equal(st[key], back[key])
    assert back["blocks.1.ffn.x_k"].shape == (1, 1, 128)
    quiet_convert(tmp_path / "a.pth", tmp_path / "c.safetensors", dtype="fp32")
    assert {t.dtype for t in load_file(str(tmp_path / "c.safetensors")).values()} == {torch.float32}


def test_q8_0_within_quantization_error(src, tmp_path, capsys):
    quiet_convert(src, tmp_path / "q.gguf", dtype="q8_0")
    reader = gguf.GGUFReader(tmp_path / "q.gguf")
    assert Q.Q8_0 in {t.tensor_type for t in reader.tensors}
    for t in reader.tensors:                    # ggml dim 0 is the row length; F16 only where it is not a multiple of 32
        assert t.tensor_type in (Q.Q8_0, Q.F32) or (t.tensor_type == Q.F16 and int(t.shape[0]) % 32), t.name
    quiet_convert(tmp_path / "q.gguf", tmp_path / "q.pth")
    orig, back = torch.load(src, weights_only=True), torch.load(tmp_path / "q.pth", weights_only=True)
    worst_abs = worst_rel = 0.0
    for key, want in orig.items():
        if layer0_value(key):
            continue
        got = back[key].float()
        if not takes_file_type(key):
            assert torch.equal(got, want), key
            continue
        if key.endswith(("1", "2")):                  # LoRA matrices are transposed in GGUF: quantized along dim 0
            got, want = got.t(), want.t()
        if want.shape[-1] % 32:                                           # F16 fallback
            assert torch.equal(got, want.half().float()), key
            continue
        blocks = want.reshape(-1, 32)
        # half a quantization step, plus the rounding of the per-block scale d = amax / 127 to fp16 (q <= 127)
        bound = blocks.abs().amax(1, keepdim=True) / 127 * Q8_STEPS + 1e-7
        err = (got.reshape(-1, 32) - blocks).abs()
        assert (err <= bound).all(), key
        worst_abs = max(worst_abs, err.max().item())
        worst_rel = max(worst_rel, (err / blocks.abs().amax(1, keepdim=True)).max().item())
    logit_err = rel_err(logits_of(load_model(tmp_path / "q.gguf")), logits_of(load_model(src)))
    with capsys.disabled():
        print(f"\n[Q8_0 {src.stem}] max |w - dq(q(w))| = {worst_abs:.2e} "
              f"({worst_rel:.2e} of the block max); logits rel err {logit_err:.2e}")
    assert worst_rel <= Q8_STEPS / 127
    assert logit_err < 0.05


# ----------------------------------------------------------------------------------------------- GGUF layout
def expected_gguf_tensors(sd: dict, L: int) -> dict[str, tuple[tuple[int, ...], np.ndarray]]:
    """GGUF name -> (numpy shape, data) straight from the reference notes' table."""
    C = sd["emb.weight"].shape[1]
    out = {"token_embd.weight": sd["emb.weight"], "token_embd_norm.weight": sd["blocks.0.ln0.weight"],
           "token_embd_norm.bias": sd["blocks.0.ln0.bias"], "output_norm.weight": sd["ln_out.weight"],
           "output_norm.bias": sd["ln_out.bias"], "output.weight": sd["head.weight"]}
    for i in range(L):
        b, p = f"blk.{i}.", f"blocks.{i}."
        out.update({b + "attn_norm.weight": sd[p + "ln1.weight"], b + "attn_norm.bias": sd[p + "ln1.bias"],
                    b + "attn_norm_2.weight": sd[p + "ln2.weight"], b + "attn_norm_2.bias": sd[p + "ln2.bias"],
                    b + "time_mix_lerp_fused.weight": torch.stack([sd[p + f"att.x_{c}"] for c in "rwkvag"])})
        for x in "wavg":
            s = "a" if (x == "v" and i == 0) else x
            if x != "g":
                out[b + f"time_mix_{x}0.weight"] = sd[p + f"att.{s}0"].reshape(C)
            out[b + f"time_mix_{x}1.weight"] = sd[p + f"att.{s}1"].T
            out[b + f"time_mix_{x}2.weight"] = sd[p + f"att.{s}2"].T
        out.update({b + "time_mix_k_k.weight": sd[p + "att.k_k"].reshape(C),
                    b + "time_mix_k_a.weight": sd[p + "att.k_a"].reshape(C),
                    b + "time_mix_r_k.weight": sd[p + "att.r_k"].reshape(C),
                    b + "time_mix_key.weight": sd[p + "att.key.weight"],
                    b + "time_mix_value.weight": sd[p + "att.value.weight"],
                    b + "time_mix_receptance.weight": sd[p + "att.receptance.weight"],
                    b + "time_mix_output.weight": sd[p + "att.output.weight"],
                    b + "time_mix_ln.weight": sd[p + "att.ln_x.weight"], b + "time_mix_ln.bias": sd[p + "att.ln_x.bias"],
                    b + "channel_mix_lerp_k.weight": sd[p + "ffn.x_k"].reshape(C),
                    b + "channel_mix_key.weight": sd[p + "ffn.key.weight"],
                    b + "channel_mix_value.weight": sd[p + "ffn.value.weight"]})
    return {k: (tuple(v.shape), v.float().numpy()) for k, v in out.items()}


def field(reader, key):
    return reader.fields[key].contents() if key in reader.fields else None


def test_gguf_metadata_names_shapes_and_types(src, tmp_path):
    quiet_convert(src, tmp_path / "m.gguf", dtype="fp16")
    sd = torch.load(src, weights_only=True)
    shape = PARITY_SHAPES[src.stem]
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    want_kv = {"general.architecture": "rwkv7", "general.file_type": 1, "general.quantization_version": 2,
               "rwkv7.context_length": 1048576, "rwkv7.embedding_length": shape.n_embd,
               "rwkv7.block_count": shape.n_layer, "rwkv7.wkv.head_size": shape.head_size,
               "rwkv7.attention.decay_lora_rank": shape.decay_lora, "rwkv7.attention.iclr_lora_rank": shape.iclr_lora,
               "rwkv7.attention.value_residual_mix_lora_rank": shape.value_lora,
               "rwkv7.attention.gate_lora_rank": shape.gate_lora, "rwkv7.feed_forward_length": shape.ffn,
               "rwkv7.attention.head_count": 0, "rwkv7.token_shift_count": 2}
    for key, value in want_kv.items():
        assert field(reader, key) == value, key
    assert field(reader, "rwkv7.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    assert reader.fields["rwkv7.token_shift_count"].types == [gguf.GGUFValueType.UINT32]
    want = expected_gguf_tensors(sd, shape.n_layer)
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(want)
    for name, (np_shape, data) in want.items():
        t = tensors[name]
        assert tuple(int(d) for d in t.shape) == tuple(reversed(np_shape)), name     # ggml order: dims reversed
        f32 = len(np_shape) == 1 or name.endswith(("time_mix_w1.weight", "time_mix_w2.weight",
                                                   "time_mix_lerp_fused.weight")) or not name.endswith(".weight")
        assert t.tensor_type == (Q.F32 if f32 else Q.F16), name
        got = np.asarray(t.data).reshape(np_shape)
        np.testing.assert_array_equal(got, data if f32 else data.astype(np.float16), err_msg=name)
    # layer-0 value-LoRA placeholders are copies of a0/a1/a2
    for j in "012":
        np.testing.assert_array_equal(np.asarray(tensors[f"blk.0.time_mix_v{j}.weight"].data),
                                      np.asarray(tensors[f"blk.0.time_mix_a{j}.weight"].data))
    assert field(reader, "tokenizer.ggml.model") == "none"                 # V=512/777: no tokenizer fits
    assert field(reader, "rwkv7.vocab_size") == shape.vocab_size


def test_gguf_loads_with_the_same_logits(src, tmp_path):
    quiet_convert(src, tmp_path / "m.gguf", dtype="fp32")
    assert rel_err(logits_of(load_model(tmp_path / "m.gguf")), logits_of(load_model(src))) < 1e-6
    quiet_convert(src, tmp_path / "h.gguf", dtype="fp16")
    assert rel_err(logits_of(load_model(tmp_path / "h.gguf")), logits_of(load_model(src))) < 2e-2


# ----------------------------------------------------------------------------------------------- HF layout
def test_hf_layout_matches_fla_and_gives_same_logits(src, tmp_path):
    out = tmp_path / "hf"
    quiet_convert(src, out)
    sd = torch.load(src, weights_only=True)
    written = load_file(str(out / "model.safetensors"))
    want = blinkdl_to_fla(sd)                      # the independent mapping of tests/test_weights.py
    assert set(written) == set(want)
    for key, value in want.items():
        assert torch.equal(written[key], value), key
    config = json.loads((out / "config.json").read_text())
    shape = PARITY_SHAPES[src.stem]
    assert config["model_type"] == "rwkv7" and config["architectures"] == ["RWKV7ForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["head_dim"], config["intermediate_size"]) == \
           (shape.n_embd, shape.n_layer, shape.head_size, shape.ffn)
    assert (config["decay_low_rank_dim"], config["a_low_rank_dim"], config["v_low_rank_dim"],
            config["gate_low_rank_dim"], config["vocab_size"]) == \
           (shape.decay_lora, shape.iclr_lora, shape.value_lora, shape.gate_lora, shape.vocab_size)
    assert config["norm_eps"] == 1e-5 and config["hidden_act"] == "sqrelu" and config["tie_word_embeddings"] is False
    assert rel_err(logits_of(load_model(out)), logits_of(load_model(src))) < 1e-6
    quiet_convert(out, tmp_path / "back.pth")
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert all(torch.equal(back[k], v) for k, v in sd.items() if not layer0_value(k))


# ----------------------------------------------------------------------------------------------- tokenizers
@pytest.fixture(scope="module")
def world_gguf(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    write_checkpoint(d / "w.pth", SHAPE_WORLD, seed=7)
    quiet_convert(d / "w.pth", d / "w.gguf")                             # V=65536: World by default
    return d / "w.gguf"


def test_world_vocab_in_gguf(world_gguf):
    reader = gguf.GGUFReader(world_gguf)
    vocab = read_world_vocab(WORLD_VOCAB_PATH)
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    assert field(reader, "tokenizer.ggml.model") == "rwkv"
    assert len(tokens) == len(types) == 65536
    assert tokens[0] == "<s>" and types[0] == gguf.TokenType.CONTROL
    assert tokens[261] == "\\n\\n" and tokens[11] == "\\n" and tokens[1] == "\\x00"
    assert tokens[65530:] == [f"[PAD{i}]" for i in range(65530, 65536)]
    assert set(types[1:65530]) == {gguf.TokenType.NORMAL} and set(types[65530:]) == {gguf.TokenType.UNUSED}
    assert (field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id"),
            field(reader, "tokenizer.ggml.eot_token_id")) == (0, 0, 261)
    assert "User: " in field(reader, "tokenizer.chat_template")
    for i, tok in vocab.items():                                         # Python's repr of the bytes, b'' stripped
        assert tokens[i] == repr(tok)[2:-1], i
    # llama.cpp's unescape rule (\t \n \r \xHH, \c -> c) recovers every token
    from engine.formats.gguf import unescape_rwkv_token
    assert all(unescape_rwkv_token(tokens[i]) == tok for i, tok in vocab.items())


def test_world_vocab_exports_back(world_gguf, tmp_path):
    assert convert_main([str(world_gguf), str(tmp_path / "tok"), "--to", "tokenizer", "-q"]) == 0
    exported = tmp_path / "tok" / "rwkv_vocab_v20230424.txt"
    assert read_world_vocab(exported) == read_world_vocab(WORLD_VOCAB_PATH)
    text = "Hello, 世界! \n\n User: <think> \x00\xff"
    assert WorldTokenizer(exported, fast=False).encode(text) == WorldTokenizer(fast=False).encode(text)
    quiet_convert(world_gguf, tmp_path / "hf")                            # the HF dir carries it too
    assert isinstance(load_tokenizer(tmp_path / "hf"), WorldTokenizer)
    assert read_world_vocab(tmp_path / "hf" / "rwkv_vocab_v20230424.txt") == read_world_vocab(WORLD_VOCAB_PATH)
    quiet_convert(tmp_path / "hf", tmp_path / "again.gguf")              # and back into GGUF from the HF dir
    from engine.formats.gguf import GGUFCheckpoint
    assert GGUFCheckpoint(tmp_path / "again.gguf").tokenizer().world_vocab == read_world_vocab(WORLD_VOCAB_PATH)


@pytest.mark.skipif(not AUSTEN_TOKENIZER.exists(), reason="models/rwkv7-austen/tokenizer.json not present")
def test_bpe_tokenizer_in_gguf(tmp_path):
    spec = json.loads(AUSTEN_TOKENIZER.read_text())
    n_vocab = len(spec["model"]["vocab"])
    write_checkpoint(tmp_path / "b.pth", CheckpointShape(n_layer=2, n_embd=64, head_size=32, vocab_size=n_vocab,
                                                         decay_lora=32, iclr_lora=32, value_lora=32, gate_lora=32))
    assert convert_main([str(tmp_path / "b.pth"), str(tmp_path / "b.gguf"), "--tokenizer", str(AUSTEN_TOKENIZER),
                         "-q"]) == 0
    reader = gguf.GGUFReader(tmp_path / "b.gguf")
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == n_vocab and tokens[0] == "<|endoftext|>"
    assert all(tokens[i] == t for t, i in spec["model"]["vocab"].items() if i)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    assert field(reader, "tokenizer.ggml.merges") == merges
    assert field(reader, "tokenizer.ggml.eos_token_id") == 0
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    assert field(reader, "tokenizer.ggml.token_type")[0] == gguf.TokenType.CONTROL
    assert convert_main([str(tmp_path / "b.gguf"), str(tmp_path / "tokenizer.json"), "-q"]) == 0
    assert (tmp_path / "tokenizer.json").read_text() == AUSTEN_TOKENIZER.read_text()
    text = "It is a truth universally acknowledged,\n\nthat a single man"
    assert HFTokenizer(tmp_path / "tokenizer.json").encode(text) == HFTokenizer(AUSTEN_TOKENIZER).encode(text)


def test_tokenizer_that_does_not_fit_is_refused(src, tmp_path, capsys):
    assert convert_main([str(src), str(tmp_path / "m.gguf"), "--tokenizer", "world"]) == 1
    err = capsys.readouterr().err
    assert "65529" in err and "--tokenizer none" in err and not (tmp_path / "m.gguf").exists()


# ----------------------------------------------------------------------------------------------- CLI behaviour
def test_refuses_to_overwrite_without_force(src, tmp_path, capsys):
    dst = tmp_path / "m.safetensors"
    dst.write_bytes(b"keep me")
    assert convert_main([str(src), str(dst)]) == 1
    assert "already exists" in capsys.readouterr().err and dst.read_bytes() == b"keep me"
    assert convert_main([str(src), str(dst), "--force", "-q"]) == 0
    assert len(load_file(str(dst))) > 0
    assert convert_main([str(dst), str(dst), "--force"]) == 1
    assert "source itself" in capsys.readouterr().err
    hf = tmp_path / "hf"
    assert convert_main([str(src), str(hf), "-q"]) == 0
    assert convert_main([str(src), str(hf), "-q"]) == 1
    assert convert_main([str(src), str(hf), "-q", "--force"]) == 0 and (hf / "config.json").exists()
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"...")
    assert convert_main([str(src), str(other), "--to", "hf", "--force", "-q"]) == 1
    assert "does not look like a model" in capsys.readouterr().err and (other / "cat.jpg").exists()
    assert not list(tmp_path.glob(".*partial*"))                          # no temporary leftovers


def test_goose_cli_has_convert(src, tmp_path):
    from goose.cli import main as goose
    assert goose(["convert", str(src), str(tmp_path / "m.gguf"), "-q"]) == 0
    assert goose(["info", str(tmp_path / "m.gguf")]) == 0


def _gguf_with(path, arch="rwkv7", tensors=(("token_embd.weight", (8, 4)),), head_size=4):
    w = gguf.GGUFWriter(str(path), arch)
    if head_size:
        w.add_wkv_head_size(head_size)
    for name, shape in tensors:
        w.add_tensor(name, np.zeros(shape, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("case, pattern", [
    ("missing", r"missing\.pth: no such file"),
    ("suffix", r"model\.bin: unknown checkpoint type '\.bin'"),
    ("garbage_gguf", r"bad\.gguf: cannot read this GGUF file"),
    ("truncated_gguf", r"cut\.gguf: cannot read this GGUF file"),
    ("llama_gguf", r"llama\.gguf: general\.architecture is 'llama'"),
    ("no_head_size", r"nohs\.gguf: missing or invalid metadata key rwkv7\.wkv\.head_size"),
    ("stray_tensor", r"stray\.gguf: unexpected tensor 'blk\.0\.attn_q\.weight'"),
    ("missing_tensor", r"short\.gguf: missing tensor 'blocks\.0\.att\.r_k'"),
    ("dst_suffix", r"out\.xyz: cannot tell the output format"),
    ("q8_pth", r"--dtype q8_0 is a GGUF file type"),
    ("rwkv6", r"RWKV-6"),
])
def test_bad_inputs_give_clear_errors(src, tmp_path, capsys, case, pattern):
    dst = tmp_path / "out.safetensors"
    args = None
    if case == "missing":
        args = [str(tmp_path / "missing.pth"), str(dst)]
    elif case == "suffix":
        (tmp_path / "model.bin").write_bytes(b"x")
        args = [str(tmp_path / "model.bin"), str(dst)]
    elif case == "garbage_gguf":
        (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all" * 10)
        args = [str(tmp_path / "bad.gguf"), str(dst)]
    elif case == "truncated_gguf":
        quiet_convert(src, tmp_path / "whole.gguf")
        data = (tmp_path / "whole.gguf").read_bytes()
        (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
        args = [str(tmp_path / "cut.gguf"), str(dst)]
    elif case == "llama_gguf":
        args = [str(_gguf_with(tmp_path / "llama.gguf", arch="llama")), str(dst)]
    elif case == "no_head_size":
        args = [str(_gguf_with(tmp_path / "nohs.gguf", head_size=0)), str(dst)]
    elif case == "stray_tensor":
        args = [str(_gguf_with(tmp_path / "stray.gguf", tensors=(("blk.0.attn_q.weight", (4, 4)),))), str(dst)]
    elif case == "missing_tensor":
        quiet_convert(src, tmp_path / "whole.gguf")
        r = gguf.GGUFReader(tmp_path / "whole.gguf")
        keep = [(t.name, tuple(reversed([int(d) for d in t.shape]))) for t in r.tensors if "r_k" not in t.name]
        args = [str(_gguf_with(tmp_path / "short.gguf", tensors=keep, head_size=PARITY_SHAPES[src.stem].head_size)),
                str(dst)]
    elif case == "dst_suffix":
        args = [str(src), str(tmp_path / "out.xyz")]
    elif case == "q8_pth":
        args = [str(src), str(tmp_path / "out.pth"), "--dtype", "q8_0"]
    elif case == "rwkv6":
        sd = torch.load(src, weights_only=True)
        sd["blocks.0.att.time_maa_x"] = torch.zeros(1, 1, 4)
        torch.save(sd, tmp_path / "v6.pth")
        args = [str(tmp_path / "v6.pth"), str(dst)]
    assert convert_main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("goose convert: ")
    import re
    assert re.search(pattern, err), err
    assert not dst.exists()
    if case in ("garbage_gguf", "llama_gguf", "missing_tensor"):
        with pytest.raises(ModelLoadError):
            load_model(args[0])


# ----------------------------------------------------------------------------------------------- llama.cpp
def _llama(path, n_ctx=256):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                           n_threads=2, verbose=False)


def _interop(path, ckpt, prompt_ids, n_greedy=16):
    """(max rel logit diff over the prompt, argmax agreement, our greedy ids, llama.cpp's greedy ids)."""
    ours = load_model(ckpt, "cpu fp32")
    llm = _llama(path)
    ids = torch.tensor([prompt_ids])
    logits, state = ours.forward(ids, None, full_output=True)
    llm.eval(list(prompt_ids))
    theirs = torch.from_numpy(np.array(llm.scores[: len(prompt_ids)], dtype=np.float32))
    rel = rel_err(theirs, logits[0])
    agree = (theirs.argmax(-1) == logits[0].argmax(-1)).float().mean().item()
    greedy_ours, greedy_theirs = [], []
    nxt = int(logits[0, -1].argmax())
    for _ in range(n_greedy):
        greedy_ours.append(nxt)
        out, state = ours.forward(torch.tensor([[nxt]]), state)
        nxt = int(out[0].argmax())
    nxt = int(theirs[-1].argmax())
    for _ in range(n_greedy):
        greedy_theirs.append(nxt)
        llm.eval([nxt])
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return rel, agree, greedy_ours, greedy_theirs


@pytest.mark.llamacpp
def test_llamacpp_random_0b1_matches(tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    write_checkpoint(tmp_path / "0b1.pth", SHAPE_0B1, seed=0)
    quiet_convert(tmp_path / "0b1.pth", tmp_path / "0b1.gguf", dtype="fp32")
    text = "The Goose server speaks RWKV-7. User: what is the capital of France?\n\nAssistant: Paris is"
    prompt = WorldTokenizer().encode(text * 4)[:64]
    assert len(prompt) == 64
    llm = _llama(tmp_path / "0b1.gguf")
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == WorldTokenizer().encode(text)
    del llm
    rel, agree, g_ours, g_theirs = _interop(tmp_path / "0b1.gguf", tmp_path / "0b1.pth", prompt)
    with capsys.disabled():
        print(f"\n[llama.cpp, random 0.1B, F32] max rel logit diff {rel:.2e}, argmax agreement {agree:.3f}, "
              f"greedy equal: {g_ours == g_theirs} ({g_ours[:8]} / {g_theirs[:8]})")
    assert rel < 1e-3 and agree == 1.0 and g_ours == g_theirs


def _avx512() -> bool:
    try:
        return "avx512f" in open("/proc/cpuinfo").read()
    except OSError:
        return False


# llama.cpp's CPU wkv7 kernel (ggml-cpu/ops.cpp) walks a head in steps of GGML_F32_STEP floats with no remainder
# loop that runs; an AVX-512 build steps by 64, so head sizes below 64 read past the head and give wrong logits.
N32_ON_AVX512 = pytest.mark.xfail(_avx512(), strict=False,
                                  reason="llama.cpp's CPU wkv7 needs head_size % GGML_F32_STEP == 0 (64 with AVX-512)")


@pytest.mark.llamacpp
@pytest.mark.parametrize("head_size", [64, pytest.param(32, marks=N32_ON_AVX512)])
def test_llamacpp_small_model_matches(tmp_path, capsys, head_size):
    pytest.importorskip("llama_cpp")
    ckpt = tmp_path / "small.pth"
    C = 192 if head_size == 32 else 256
    write_checkpoint(ckpt, CheckpointShape(n_layer=4, n_embd=C, head_size=head_size, vocab_size=4096,
                                           decay_lora=32, iclr_lora=32, value_lora=32, gate_lora=32,
                                           logit_scale=4.0), seed=1)
    _llamacpp_check(tmp_path, ckpt, capsys)


@pytest.mark.llamacpp
@pytest.mark.skipif(not (AUSTEN_TOKENIZER.parent / "model.safetensors").exists(), reason="default model not present")
def test_llamacpp_default_model_matches(tmp_path, capsys):
    """The shipped default model, exported to GGUF with its BPE tokenizer, runs in llama.cpp to the same logits."""
    pytest.importorskip("llama_cpp")
    _llamacpp_check(tmp_path, AUSTEN_TOKENIZER.parent / "model.safetensors", capsys)


def _llamacpp_check(tmp_path, ckpt, capsys):
    head_size = load_model(ckpt).config.head_size
    tok = ["--tokenizer", str(AUSTEN_TOKENIZER)] if AUSTEN_TOKENIZER.exists() else ["--tokenizer", "none"]
    assert convert_main([str(ckpt), str(tmp_path / "small.gguf"), "--dtype", "fp32", "-q", *tok]) == 0
    prompt = [(i * 7919 + 13) % load_model(ckpt).config.vocab_size for i in range(64)]
    rel, agree, g_ours, g_theirs = _interop(tmp_path / "small.gguf", ckpt, prompt)
    with capsys.disabled():
        print(f"\n[llama.cpp, {ckpt.name} N={head_size}, F32] max rel logit diff {rel:.2e}, argmax agreement "
              f"{agree:.3f}, greedy equal: {g_ours == g_theirs}")
    assert rel < 1e-3 and agree == 1.0 and g_ours == g_theirs
