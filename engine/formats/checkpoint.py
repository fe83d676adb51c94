"""Read RWKV-7 checkpoints (.pth, .safetensors, fla-hub HF directories) into BlinkDL names; infer dims from shapes."""
from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from engine.config import ModelConfig
from engine.errors import ModelLoadError
from engine.model.quant import kind_of

SUPPORTED = ("RWKV-7 x070 checkpoints: a BlinkDL .pth or .safetensors, a fla-hub Hugging Face "
             "directory (config.json + safetensors) or its safetensors file, or a GGUF file (arch rwkv7)")

_LAYER = re.compile(r"^blocks\.(\d+)\.")
_VECTOR_KEYS = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a")


# ----------------------------------------------------------------------------------------------- reading
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class RawCheckpoint(NamedTuple):
    """A checkpoint opened lazily, in its own names: what it holds (meta tensors) and one tensor at a time."""
    kind: str                                       # "pth" | "safetensors" | "hf" | "gguf"
    meta: dict[str, torch.Tensor]                   # stored key -> tensor on the meta device (shape, dtype)
    get: Callable[[str], torch.Tensor]
    gguf: object = None                             # the GGUFCheckpoint of a .gguf (BlinkDL names already)
    quantized: str | None = None                    # "i8" | "i4": a quantized safetensors (formats/quantized.py),
                                                    # whose get() returns Int8Weight / Int4Weight for its matrices


def open_checkpoint(path: str | Path, quant: str | None = None) -> RawCheckpoint:
    """The one place a checkpoint's format is recognised (.pth/.pt, .safetensors, .gguf, an HF directory).
    ``quant``: the strategy's quantization ("i8"/"i4"), under which a GGUF's Q8_0/Q4_0 matrices stay quantized
    (engine/formats/gguf.py GGUFCheckpoint)."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory")
    if path.is_dir():
        return RawCheckpoint("hf", *_open_safetensors(_hf_shards(path))[:2])
    if path.suffix in (".pth", ".pt"):
        sd = _read_pth(path)
        for key, value in sd.items():
            if not isinstance(value, torch.Tensor):
                raise ModelLoadError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        return RawCheckpoint("pth", {k: _meta(v.shape, v.dtype) for k, v in sd.items()}, sd.__getitem__)
    if path.suffix == ".safetensors":
        meta, get, info = _open_safetensors([path])
        if "goose.format" in info:                  # written by goose convert --dtype i8|i4
            from engine.formats.quantized import open_quantized
            meta, get, kind = open_quantized(path, meta, get, info)
            return RawCheckpoint("safetensors", meta, get, quantized=kind)
        return RawCheckpoint("safetensors", meta, get)
    if path.suffix == ".gguf":
        from engine.formats.gguf import GGUFCheckpoint
        ck = GGUFCheckpoint(path, quant)
        return RawCheckpoint("gguf", dict(ck.meta), ck.get, ck)
    raise ModelLoadError(f"{path}: unknown checkpoint type {path.suffix!r}; supported: {SUPPORTED}")


def _meta(shape, dtype) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device="meta")


def _read_pth(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap can only be used" not in str(exc):
            raise ModelLoadError(f"{path}: cannot read this PyTorch checkpoint (truncated or corrupt file?): "
                                 f"{_first_line(exc)}") from None
        obj = _read_pth_legacy(path)
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise ModelLoadError(f"{path}: cannot read this PyTorch checkpoint (truncated, corrupt, or it holds "
                             f"objects other than tensors): {_first_line(exc)}") from None
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):
            if "emb.weight" not in obj and isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path}: expected a dict of tensors, found a {type(obj).__name__}")
    return obj


def _read_pth_legacy(path: Path) -> dict:
    # Files written without the zip container cannot be memory-mapped: read them whole.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as exc:
        raise ModelLoadError(f"{path}: cannot read this PyTorch checkpoint (truncated or corrupt file?): "
                             f"{_first_line(exc)}") from None


def _open_safetensors(files: list[Path]) -> tuple[dict, Callable[[str], torch.Tensor], dict[str, str]]:
    """Shapes and dtypes from the headers; tensors memory-mapped one at a time; the first file's metadata."""
    from safetensors import SafetensorError, safe_open
    meta, where, info = {}, {}, None
    for f in files:
        try:
            handle = safe_open(str(f), framework="pt", device="cpu")
            if info is None:
                info = handle.metadata() or {}
            for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if key in meta:
                    raise ModelLoadError(f"{f}: tensor {key!r} also appears in another shard")
                sl = handle.get_slice(key)
                meta[key] = _meta(sl.get_shape(), ST_DTYPES.get(sl.get_dtype(), torch.uint8))
                where[key] = handle
        except (SafetensorError, OSError, ValueError) as exc:
            if isinstance(exc, ModelLoadError):
                raise
            raise ModelLoadError(f"{f}: cannot read this safetensors file (truncated or corrupt?): "
                                 f"{_first_line(exc)}") from None
    return meta, lambda key: where[key].get_tensor(key), info or {}


def _hf_shards(path: Path) -> list[Path]:
    config_path = path / "config.json"
    if config_path.exists():
        try:
            hf_config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{config_path}: invalid JSON: {exc}") from None
        model_type = hf_config.get("model_type") if isinstance(hf_config, dict) else None
        if model_type not in (None, "rwkv7"):
            raise ModelLoadError(f"{config_path}: model_type is {model_type!r}; supported: {SUPPORTED}")
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        if list(path.glob("*.pth")) or list(path.glob("*.bin")):
            raise ModelLoadError(f"{path}: found no .safetensors files; pass the .pth file itself, "
                                 f"or convert .bin weights to safetensors")
        raise ModelLoadError(f"{path}: no *.safetensors weights in this directory; supported: {SUPPORTED}")
    return shards


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def read_checkpoint(path: str | Path, quant: str | None = None) -> dict[str, torch.Tensor]:
    """Read any supported file or directory into a dict of tensors in BlinkDL naming and shapes (with ``quant``,
    a GGUF's matching quantized matrices as engine/model/quant.py weights)."""
    raw = open_checkpoint(path, quant)
    sd = {key: raw.get(key) for key in raw.meta}
    check_variant(sd, path)
    return to_blinkdl_names(sd, path)


# ----------------------------------------------------------------------------------------------- variants
def check_variant(sd: dict, where) -> None:
    """Refuse checkpoints of other RWKV versions or variants, saying what was found."""
    keys = list(sd)
    found = lambda pattern: next((k for k in keys if re.search(pattern, k)), None)  # noqa: E731
    rules = (
        (r"s_emb", "RWKV-7a DeepEmbed (ffn.s_emb*)"),
        (r"time_maa", "RWKV-6"),
        (r"time_faaaa", "RWKV-5"),
        (r"time_first|time_decay|time_mix_k", "RWKV-4/5/6"),
        (r"mlp\.(gate|up|down)_proj|self_attn\.", "ARWKV-7 (or another transformer hybrid)"),
        (r"^rwkv\.", "EmbeddingRWKV"),
    )
    for pattern, variant in rules:
        key = found(pattern)
        if key is not None:
            raise ModelLoadError(f"{where}: this looks like a {variant} checkpoint (found key {key!r}); "
                                 f"supported: {SUPPORTED}")
    if "emb.weight" not in sd and not any(k.endswith("embeddings.weight") for k in keys):
        sample = ", ".join(sorted(keys)[:5]) or "no tensors"
        raise ModelLoadError(f"{where}: unrecognised checkpoint layout (keys: {sample}, ...); expected "
                             f"emb.weight (BlinkDL) or model.embeddings.weight (fla-hub); supported: {SUPPORTED}")


# ----------------------------------------------------------------------------------------------- fla names
_HF_LAYER_MAP = {
    "attn_norm": "ln1", "ffn_norm": "ln2", "pre_norm": "ln0",
    "attn.r_proj.weight": "att.receptance.weight", "attn.k_proj.weight": "att.key.weight",
    "attn.v_proj.weight": "att.value.weight", "attn.o_proj.weight": "att.output.weight",
    "attn.g_norm": "att.ln_x", "attn.k_k": "att.k_k", "attn.k_a": "att.k_a", "attn.r_k": "att.r_k",
    "ffn.x_k": "ffn.x_k", "ffn.key.weight": "ffn.key.weight", "ffn.value.weight": "ffn.value.weight",
}


def _hf_layer_key(rest: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    m = re.fullmatch(r"attn\.([wavg])_lora\.lora\.(0\.weight|2\.weight|2\.bias)", rest)
    if m:
        letter, part = m.groups()
        if part == "2.bias":
            return [(f"att.{letter}0", tensor.reshape(1, 1, -1))]
        return [(f"att.{letter}{part[0] == '0' and 1 or 2}", tensor.t())]
    m = re.fullmatch(r"attn\.x_([rwkvag])", rest)
    if m:
        return [(f"att.x_{m.group(1)}", tensor.reshape(1, 1, -1))]
    if rest == "attn.x_x":   # legacy fla: the six token-shift mixes fused as [6, C] in order r, w, k, v, a, g
        return [(f"att.x_{c}", tensor[i].reshape(1, 1, -1)) for i, c in enumerate("rwkvag")]
    for hf, blink in _HF_LAYER_MAP.items():
        if rest == hf or rest.startswith(hf + "."):
            return [(blink + rest[len(hf):], tensor)]
    return [("?" + rest, tensor)]


def to_blinkdl_names(sd: dict, where) -> dict[str, torch.Tensor]:
    """Map fla-hub HF names to BlinkDL ones (detected from the keys); BlinkDL input passes through."""
    if "emb.weight" in sd:
        return dict(sd)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        name = key[len("model."):] if key.startswith("model.") else key
        if name == "embeddings.weight":
            out["emb.weight"] = tensor
        elif name.startswith("norm."):
            out["ln_out." + name[len("norm."):]] = tensor
        elif name == "lm_head.weight":
            out["head.weight"] = tensor
        elif name.startswith("layers."):
            _, idx, rest = name.split(".", 2)
            for blink, value in _hf_layer_key(rest, tensor):
                if blink.startswith("?"):
                    raise ModelLoadError(f"{where}: unexpected Hugging Face tensor {key!r}; supported: {SUPPORTED}")
                out[f"blocks.{idx}.{blink}"] = value
        else:
            raise ModelLoadError(f"{where}: unexpected Hugging Face tensor {key!r}; supported: {SUPPORTED}")
    return out


# ----------------------------------------------------------------------------------------------- shapes
def _shape(sd: dict, key: str, where, dims: int) -> tuple[int, ...]:
    if key not in sd:
        raise ModelLoadError(f"{where}: missing tensor {key!r}")
    shape = tuple(sd[key].shape)
    if len(shape) != dims:
        raise ModelLoadError(f"{where}: tensor {key!r} has shape {list(shape)}, expected {dims} dimensions")
    return shape


def infer_config(sd: dict, where="checkpoint") -> ModelConfig:
    """Read every dimension from tensor shapes."""
    V, C = _shape(sd, "emb.weight", where, 2)
    H, N = _shape(sd, "blocks.0.att.r_k", where, 2)
    layers = {int(m.group(1)) for k in sd if (m := _LAYER.match(k))}
    L = max(layers) + 1
    missing = sorted(set(range(L)) - layers)
    if missing:
        raise ModelLoadError(f"{where}: no tensors for layer {missing[0]} (layers 0..{L - 1} expected)")
    F = _shape(sd, "blocks.0.ffn.key.weight", where, 2)[0]
    value_lora = _shape(sd, "blocks.1.att.v1", where, 2)[1] if L > 1 else 0
    return ModelConfig(
        n_layer=L, n_embd=C, n_head=H, head_size=N, vocab_size=V, dim_ffn=F,
        decay_lora=_shape(sd, "blocks.0.att.w1", where, 2)[1],
        iclr_lora=_shape(sd, "blocks.0.att.a1", where, 2)[1],
        value_lora=value_lora,
        gate_lora=_shape(sd, "blocks.0.att.g1", where, 2)[1],
    )


def expected_shapes(cfg: ModelConfig, *, layer0_value: int | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor of a BlinkDL x070 checkpoint and its shape; layer0_value adds blocks.0.att.v0/v1/v2."""
    C, A, F, V = cfg.n_embd, cfg.dim_att, cfg.dim_ffn, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {
        "emb.weight": (V, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,),
        "ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C),
    }
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            shapes[f"{p}{ln}.weight"] = shapes[f"{p}{ln}.bias"] = (C,)
        for x in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            shapes[f"{p}att.{x}"] = (1, 1, C)
        loras = [("w", cfg.decay_lora), ("a", cfg.iclr_lora), ("g", cfg.gate_lora)]
        rank_v = cfg.value_lora if i > 0 else layer0_value
        if rank_v:
            loras.append(("v", rank_v))
        for letter, rank in loras:
            if letter != "g":
                shapes[f"{p}att.{letter}0"] = (1, 1, A)
            shapes[f"{p}att.{letter}1"] = (C, rank)
            shapes[f"{p}att.{letter}2"] = (rank, A)
        shapes[f"{p}att.k_k"] = shapes[f"{p}att.k_a"] = (1, 1, A)
        shapes[f"{p}att.r_k"] = (cfg.n_head, cfg.head_size)
        for proj in ("receptance", "key", "value"):
            shapes[f"{p}att.{proj}.weight"] = (A, C)
        shapes[f"{p}att.output.weight"] = (C, A)
        shapes[f"{p}att.ln_x.weight"] = shapes[f"{p}att.ln_x.bias"] = (A,)
        shapes[f"{p}ffn.x_k"] = (1, 1, C)
        shapes[f"{p}ffn.key.weight"] = (F, C)
        shapes[f"{p}ffn.value.weight"] = (C, F)
    return shapes


def validate(sd: dict, cfg: ModelConfig, where) -> dict[str, torch.Tensor]:
    """Check every key and shape; vectors stored squeezed ([C] for [1,1,C]) are accepted and reshaped."""
    layer0_value = sd["blocks.0.att.v1"].shape[1] if "blocks.0.att.v1" in sd and sd["blocks.0.att.v1"].dim() == 2 else None
    want = expected_shapes(cfg, layer0_value=layer0_value)
    out = {}
    for key, shape in want.items():
        if key not in sd:
            raise ModelLoadError(f"{where}: missing tensor {key!r} (expected shape {list(shape)})")
        tensor = sd[key]
        if tuple(tensor.shape) != shape:
            if key.rsplit(".", 1)[-1] in _VECTOR_KEYS and tensor.numel() == shape[-1]:
                tensor = tensor.reshape(shape)
            else:
                raise ModelLoadError(f"{where}: tensor {key!r} has shape {list(tensor.shape)}, "
                                     f"expected {list(shape)} for a model with {_describe(cfg)}")
        if kind_of(tensor) is None and not tensor.is_floating_point():
            raise ModelLoadError(f"{where}: tensor {key!r} has dtype {tensor.dtype}, expected a float type")
        out[key] = tensor
    extra = sorted(set(sd) - set(want))
    if extra:
        raise ModelLoadError(f"{where}: unexpected tensor {extra[0]!r} ({len(extra)} unexpected in all); "
                             f"this variant is not supported; supported: {SUPPORTED}")
    return out


def _describe(cfg: ModelConfig) -> str:
    return (f"L={cfg.n_layer} C={cfg.n_embd} H={cfg.n_head} N={cfg.head_size} F={cfg.dim_ffn} V={cfg.vocab_size}")


def load_weights(path: str | Path, quant: str | None = None) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Read, check and describe a checkpoint: (BlinkDL-named tensors, ModelConfig); ``quant`` as in read_checkpoint."""
    sd = read_checkpoint(path, quant)
    cfg = infer_config(sd, path)
    return validate(sd, cfg, path), cfg


IDENTITY_SAMPLES = 16          # evenly spaced 4 KiB pieces of each tensor enter the hash (and its whole metadata)


def weights_identity(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> str:
    """A SHA-256 over the config and every tensor's name, shape, dtype and sampled bytes: equal models agree, and
    any retrained or converted-with-loss checkpoint differs, at ~1 ms per GB (a full hash of a 7B model would
    take seconds at every start)."""
    import dataclasses
    import hashlib
    h = hashlib.sha256(repr(sorted(dataclasses.asdict(cfg).items())).encode())
    for name in sorted(sd):
        t = sd[name]
        if kind_of(t) is not None:                      # a quantized matrix: its codes, then its scales
            h.update(f"{name}:{kind_of(t)}:{tuple(t.shape)}:{t.group}".encode())
            _hash_samples(h, t.codes)
            _hash_samples(h, t.scales)
            continue
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        _hash_samples(h, t)
    return h.hexdigest()


def _hash_samples(h, t: torch.Tensor) -> None:
    """The tensor's bytes into h: whole when small, else IDENTITY_SAMPLES evenly spaced 4 KiB pieces."""
    flat = t.detach().reshape(-1).contiguous().view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    n, piece = flat.numel(), 4096
    if n <= piece * IDENTITY_SAMPLES:
        h.update(flat.numpy().tobytes())
        return
    for k in range(IDENTITY_SAMPLES):
        start = (n - piece) * k // (IDENTITY_SAMPLES - 1)
        h.update(flat[start:start + piece].numpy().tobytes())
