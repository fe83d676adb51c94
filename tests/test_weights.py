"""Checkpoint loading: formats, key layouts, and a clear error for every kind of bad input."""
import json

import pytest
import torch
from safetensors.torch import save_file

from engine import ModelLoadError, load_model, parse_strategy
from engine.formats.checkpoint import load_weights
from tests.conftest import rel_err


def blinkdl_to_fla(sd: dict) -> dict:
    """The fla-hub Hugging Face layout, written independently from the mapping table in the reference notes."""
    out = {}
    for key, t in sd.items():
        if key == "emb.weight":
            out["model.embeddings.weight"] = t
        elif key.startswith("ln_out."):
            out["model.norm." + key.split(".")[-1]] = t
        elif key == "head.weight":
            out["lm_head.weight"] = t
        else:
            _, i, rest = key.split(".", 2)
            p = f"model.layers.{i}."
            part, _, name = rest.partition(".")
            if part in ("ln0", "ln1", "ln2"):
                out[p + {"ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm"}[part] + "." + name] = t
            elif part == "ffn":
                out[p + "ffn." + name] = t.reshape(-1) if name == "x_k" else t
            elif name in ("w0", "a0", "v0"):
                if i == "0" and name == "v0":
                    continue
                out[p + f"attn.{name[0]}_lora.lora.2.bias"] = t.reshape(-1)
            elif name in ("w1", "a1", "v1", "g1", "w2", "a2", "v2", "g2"):
                if i == "0" and name[0] == "v":
                    continue
                out[p + f"attn.{name[0]}_lora.lora.{0 if name[1] == '1' else 2}.weight"] = t.t().contiguous()
            elif name in ("k_k", "k_a"):
                out[p + "attn." + name] = t.reshape(-1)
            elif name.startswith("x_") or name == "r_k":
                out[p + "attn." + name] = t
            elif name.startswith("ln_x."):
                out[p + "attn.g_norm." + name.split(".")[1]] = t
            else:
                proj = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj"}
                out[p + "attn." + proj[name.split(".")[0]] + ".weight"] = t
    return out


@pytest.fixture(scope="module")
def tiny_sd(tiny_pth):
    return torch.load(tiny_pth, weights_only=True)


def logits_of(model, T=33):
    return model.forward(torch.arange(T).view(1, T) % model.config.vocab_size, None, full_output=True)[0]


def test_hf_directory_and_file_give_same_logits(tmp_path, tiny_sd, tiny_model):
    fla = blinkdl_to_fla(tiny_sd)
    d = tmp_path / "hf"
    d.mkdir()
    keys = sorted(fla)
    save_file({k: fla[k] for k in keys[: len(keys) // 2]}, str(d / "model-00001-of-00002.safetensors"))
    save_file({k: fla[k] for k in keys[len(keys) // 2:]}, str(d / "model-00002-of-00002.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "rwkv7", "hidden_size": 192}))
    expected = logits_of(tiny_model)
    assert rel_err(logits_of(load_model(d)), expected) < 1e-6
    save_file(fla, str(tmp_path / "single.safetensors"))
    assert rel_err(logits_of(load_model(tmp_path / "single.safetensors")), expected) < 1e-6


def test_legacy_fla_fused_token_shift(tmp_path, tiny_sd, tiny_model):
    fla = blinkdl_to_fla(tiny_sd)
    for i in range(3):
        p = f"model.layers.{i}.attn."
        fla[p + "x_x"] = torch.cat([fla.pop(p + f"x_{c}").reshape(1, -1) for c in "rwkvag"])
    save_file(fla, str(tmp_path / "legacy.safetensors"))
    assert rel_err(logits_of(load_model(tmp_path / "legacy.safetensors")), logits_of(tiny_model)) < 1e-6


def test_squeezed_vectors_and_wrapped_state_dict(tmp_path, tiny_sd, tiny_model):
    sd = {k: (v.reshape(-1) if k.endswith(("x_r", "w0", "k_k")) else v) for k, v in tiny_sd.items()}
    torch.save({"state_dict": sd}, tmp_path / "wrapped.pth")
    assert torch.equal(logits_of(load_model(tmp_path / "wrapped.pth")), logits_of(tiny_model))


def test_layer0_value_lora_is_optional(tmp_path, tiny_sd):
    sd = dict(tiny_sd)
    C = sd["emb.weight"].shape[1]
    sd.update({"blocks.0.att.v0": torch.zeros(1, 1, C), "blocks.0.att.v1": torch.zeros(C, 4),
               "blocks.0.att.v2": torch.zeros(4, C)})
    torch.save(sd, tmp_path / "v0.pth")
    _, cfg = load_weights(tmp_path / "v0.pth")
    assert cfg.value_lora == 8


def save_variant(tmp_path, sd, name="bad.pth"):
    torch.save(sd, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("mutate,message", [
    (lambda sd: sd.pop("blocks.1.att.key.weight"), r"missing tensor 'blocks\.1\.att\.key\.weight'"),
    (lambda sd: sd.pop("blocks.0.att.r_k"), r"missing tensor 'blocks\.0\.att\.r_k'"),
    (lambda sd: sd.update({"blocks.2.ffn.value.weight": torch.zeros(192, 7)}),
     r"'blocks\.2\.ffn\.value\.weight' has shape \[192, 7\], expected \[192, 500\]"),
    (lambda sd: sd.update({"blocks.0.ffn.s_emb.weight": torch.zeros(777, 32)}), r"DeepEmbed.*s_emb"),
    (lambda sd: sd.update({"blocks.0.att.time_maa_x": torch.zeros(1, 1, 192)}), r"RWKV-6"),
    (lambda sd: sd.update({"blocks.0.att.time_decay": torch.zeros(192)}), r"RWKV-4/5/6"),
    (lambda sd: sd.update({"blocks.0.mlp.gate_proj.weight": torch.zeros(4, 4)}), r"ARWKV"),
    (lambda sd: sd.update({"blocks.1.att.mystery": torch.zeros(3)}), r"unexpected tensor 'blocks\.1\.att\.mystery'"),
    (lambda sd: sd.update({"blocks.1.att.w0": torch.zeros(1, 1, 192, dtype=torch.long)}), r"dtype torch\.int64"),
    (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("blocks.1.")], r"no tensors for layer 1"),
])
def test_bad_checkpoints_are_named(tmp_path, tiny_sd, mutate, message):
    sd = dict(tiny_sd)
    mutate(sd)
    with pytest.raises(ModelLoadError, match=message) as info:
        load_model(save_variant(tmp_path, sd))
    assert str(tmp_path / "bad.pth") in str(info.value)
    assert "Traceback" not in str(info.value)


def test_rwkv6_layout_is_refused(tmp_path):
    sd = {"emb.weight": torch.zeros(10, 8), "blocks.0.att.time_faaaa": torch.zeros(2, 4)}
    with pytest.raises(ModelLoadError, match=r"RWKV-5.*time_faaaa.*supported: RWKV-7"):
        load_model(save_variant(tmp_path, sd))


def test_unrecognised_layout(tmp_path):
    with pytest.raises(ModelLoadError, match=r"unrecognised checkpoint layout.*transformer\.wte"):
        load_model(save_variant(tmp_path, {"transformer.wte.weight": torch.zeros(3, 3)}))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_files(tmp_path, tiny_pth, suffix):
    data = tiny_pth.read_bytes()
    if suffix == ".safetensors":
        src = tmp_path / "full.safetensors"
        save_file(torch.load(tiny_pth, weights_only=True), str(src))
        data = src.read_bytes()
    bad = tmp_path / f"truncated{suffix}"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"truncated.*\?") as info:
        load_model(bad)
    assert str(bad) in str(info.value)


def test_garbage_and_pickles_are_refused(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ModelLoadError, match="junk.pth: cannot read"):
        load_model(junk)
    torch.save({"emb.weight": torch.zeros(2, 2), "extra": {1, 2}}, tmp_path / "objects.pth")
    with pytest.raises(ModelLoadError, match="objects.pth"):
        load_model(tmp_path / "objects.pth")


def test_missing_paths_and_unknown_types(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(tmp_path / "nope.pth")
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"unknown checkpoint type '\.onnx'"):
        load_model(tmp_path / "w.onnx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors"):
        load_model(tmp_path / "empty")
    (tmp_path / "arwkv").mkdir()
    (tmp_path / "arwkv" / "config.json").write_text('{"model_type": "arwkv"}')
    with pytest.raises(ModelLoadError, match="model_type is 'arwkv'"):
        load_model(tmp_path / "arwkv")


@pytest.mark.parametrize("text", ["cpu fp32", "cpu bf16", "cuda fp16", "cuda:1 bf16", " cuda fp32 "])
def test_valid_strategies(text):
    s = parse_strategy(text)
    assert s.device.type in ("cpu", "cuda")


@pytest.mark.parametrize("text,hint", [
    ("cpu fp64", "valid forms"), ("gpu fp16", "valid forms"), ("cpu fp16", "cpu bf16"),
    ("cuda fp16 *10 -> cpu fp32", "layer-split"), ("cuda fp16i4", "CPU only"), ("", "valid forms"),
])
def test_invalid_strategies(tiny_pth, text, hint):
    with pytest.raises(ModelLoadError, match=hint) as info:
        load_model(tiny_pth, text)
    assert "cpu fp32" in str(info.value)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cuda_strategy_without_cuda(tiny_pth):
    with pytest.raises(ModelLoadError, match="no CUDA device"):
        load_model(tiny_pth, "cuda fp16")


def test_unknown_backend(tiny_pth):
    with pytest.raises(ModelLoadError, match="unknown WKV-7 backend 'fast'"):
        load_model(tiny_pth, "cpu fp32", wkv_backend="fast")
