"""Quantized safetensors: the big matrices stored as the `cpu ...i8` / `cpu ...i4` strategies hold them.

`goose convert SRC DST.safetensors --dtype i8|i4` writes them (engine/formats/convert.py); open_checkpoint reads
them (engine/formats/checkpoint.py), and load_model uses the stored codes as they are: no float copy and no second
quantization. The layout is plain and portable (it does not depend on torch's build-specific int4 packing):

- metadata (the safetensors header's __metadata__, all strings): ``goose.format`` = ``rwkv7-quantized``,
  ``goose.format_version`` = ``2``, ``goose.quantization`` = ``int8`` or ``int4``, ``goose.group_size`` (int4,
  and int8 when its scales are per group rather than per row); ``goose.in_features`` (only when some int4
  matrix's K is not a multiple of 32): a JSON object {tensor name: K}.
- int8, for a matrix ``X.weight`` [N, K]: ``X.weight`` int8 [N, K] (symmetric, |q| <= 127) and
  ``X.weight_scale`` float32/bfloat16/float16 [N, ceil(K / G)] (G = K without a group size: one scale per row,
  which is what Goose writes): W[n, k] ~ q[n, k] * scale[n, k // G].
- int4, groups of G input columns (a multiple of 32): ``X.weight`` uint8 [N, ceil(K / 32) * 16], each 32 columns in
  16 bytes in ggml's Q4_0 nibble order (column j of the block in the low nibble of byte j, column j + 16 in the high
  one); ``X.weight_scale`` and ``X.weight_zero`` [N, ceil(K / G)] (bfloat16 as written):
  W[n, k] ~ (q[n, k] - 8) * scale[n, k // G] + zero[n, k // G], q in 0..15. Columns past K are padding.
  (Version 1, written for a few hours during development, packed int4 in another order and is refused.)

Which matrices: the projections (receptance, key, value, output), the FFN (key, value) and the head, as far as
engine/model/quant.py's QUANTIZED families go; every other tensor stays float, in the source's dtype.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from engine.errors import ModelLoadError
from engine.model import quant                     # the one dependence on it: its public names, read at call time
from engine.model.allocator import release_pages
from engine.model.quant import Int4Weight, Int8Weight

FORMAT, VERSION = "rwkv7-quantized", "2"
KINDS = {"i8": "int8", "i4": "int4"}                   # strategy suffix / --dtype -> goose.quantization
STRATEGIES = {"int8": ("cpu fp32i8", "cpu bf16i8", "cuda fp16i8", "cuda bf16i8"),
              "int4": ("cpu fp32i4", "cpu bf16i4")}
_SCALES = (torch.float32, torch.bfloat16, torch.float16)


def group_size() -> int:
    """The int4 group size the strategies use now (engine/model/quant.py's GROUP_SIZE)."""
    return quant.GROUP_SIZE


# ----------------------------------------------------------------------------------------------- writing
def metadata(kind: str, in_features: dict[str, int]) -> dict[str, str]:
    meta = {"goose.format": FORMAT, "goose.format_version": VERSION, "goose.quantization": KINDS[kind]}
    if kind == "i4":
        meta["goose.group_size"] = str(group_size())
        if in_features:
            meta["goose.in_features"] = json.dumps(in_features, separators=(",", ":"))
    return meta


def plan(kind: str, name: str, shape: tuple[int, int]) -> list[tuple[str, tuple, torch.dtype]]:
    """The file's entries for one quantized matrix [N, K]: (name, shape, dtype)."""
    N, K = shape
    if kind == "i8":
        return [(name, (N, K), torch.int8), (name + "_scale", (N, 1), torch.float32)]
    groups = -(-K // group_size())
    return [(name, (N, -(-K // 32) * 16), torch.uint8), (name + "_scale", (N, groups), torch.bfloat16),
            (name + "_zero", (N, groups), torch.bfloat16)]


def encode(kind: str, w: torch.Tensor) -> list[torch.Tensor]:
    """A float matrix [N, K] quantized exactly as the strategy quantizes it at load, in the file's layout (the
    tensors plan() lists, in its order): the in-memory form of engine/model/quant.py, as it is."""
    if kind == "i8":
        qw = quant.quantize_int8(w)
        return [qw.codes, qw.scales]
    qw = quant.quantize_int4(w, group_size())
    return [qw.codes, qw.scales, qw.zeros]


def write_file(path: Path, names: list[str], meta: dict[str, torch.Tensor], get: Callable[[str], torch.Tensor],
               kind: str, bar=None) -> str:
    """Stream a quantized safetensors file: the big matrices of get() (float, BlinkDL names) quantized as the
    `cpu ...{kind}` strategies quantize them, every other tensor as stored. bar: a tqdm bar or None."""
    from engine.formats.convert import write_safetensors
    entries, in_features = [], {}
    for n in names:
        shape = tuple(meta[n].shape)
        if quant.quantizable(n):
            entries += plan(kind, n, shape)
            if kind == "i4" and shape[1] % 32:
                in_features[n] = shape[1]
        else:
            entries.append((n, shape, meta[n].dtype))
    if bar:
        bar.reset(total=sum(torch.Size(s).numel() * d.itemsize for _, s, d in entries))
    pending: dict[str, torch.Tensor] = {}

    def produce(name: str) -> torch.Tensor:          # a matrix's companions come right after it (plan's order)
        if name in pending:
            return pending.pop(name)
        if not quant.quantizable(name):
            return get(name)
        parts = encode(kind, get(name))
        companions = plan(kind, name, tuple(meta[name].shape))[1:]
        pending.update(zip((entry[0] for entry in companions), parts[1:]))
        return parts[0]
    write_safetensors(path, entries, produce, bar.update if bar else None, metadata=metadata(kind, in_features))
    n_mat = sum(map(quant.quantizable, names))
    return f"{n_mat} matrices {KINDS[kind]}, {len(names) - n_mat} tensors as stored"


# ----------------------------------------------------------------------------------------------- reading
def open_quantized(path: Path, meta: dict[str, torch.Tensor], get: Callable[[str], torch.Tensor],
                   info: dict[str, str]) -> tuple[dict, Callable, str]:
    """The reader's view of a quantized file: (meta with each matrix as its float [N, K], get returning
    Int8Weight / Int4Weight for them, "i8" or "i4"). Every quantized tensor's companions and shapes are checked
    here, from the header, so a bad file fails before any weight is read."""
    version = info.get("goose.format_version")
    if info.get("goose.format") != FORMAT or version != VERSION:
        raise ModelLoadError(f"{path}: quantized file format {info.get('goose.format')!r} version {version!r} is "
                             f"not supported; this Goose reads {FORMAT!r} version {VERSION}")
    qname = info.get("goose.quantization")
    kind = {v: k for k, v in KINDS.items()}.get(qname)
    if kind is None:
        raise ModelLoadError(f"{path}: unknown goose.quantization {qname!r}; expected one of {', '.join(STRATEGIES)}")
    group, in_features = 0, {}
    if kind == "i4" or "goose.group_size" in info:
        try:
            group = int(info.get("goose.group_size", ""))
            in_features = json.loads(info.get("goose.in_features", "{}"))
        except ValueError:
            raise ModelLoadError(f"{path}: unreadable goose.group_size or goose.in_features metadata") from None
        if group <= 0 or (kind == "i4" and group % 32):
            raise ModelLoadError(f"{path}: {KINDS[kind]} group size {group} is not a positive "
                                 f"{'multiple of 32' if kind == 'i4' else 'number'}")
    code_dtype = torch.int8 if kind == "i8" else torch.uint8
    float_dtype = meta["emb.weight"].dtype if "emb.weight" in meta else torch.float32
    out, matrices = {}, {}
    companions = ("_scale",) if kind == "i8" else ("_scale", "_zero")
    for name, t in meta.items():
        if name.endswith(("_scale", "_zero")):
            base = name.rsplit("_", 1)[0]
            if base not in meta or meta[base].dtype != code_dtype or not name.endswith(companions):
                raise ModelLoadError(f"{path}: tensor {name!r} has no quantized matrix {base!r} beside it")
            continue
        if t.dtype != code_dtype:
            out[name] = t
            continue
        if not quant.quantizable(name):
            raise ModelLoadError(f"{path}: tensor {name!r} is stored quantized ({t.dtype}), but only the projection, "
                                 f"FFN and head matrices may be")
        if t.dim() != 2:
            raise ModelLoadError(f"{path}: quantized tensor {name!r} has shape {list(t.shape)}, expected 2 dimensions")
        N = t.shape[0]
        if kind == "i8":
            K = t.shape[1]
            want = {"_scale": (N, -(-K // group) if group else 1)}
        else:
            Kp = 2 * t.shape[1]
            K = int(in_features.get(name, Kp))
            if Kp % 32 or not Kp - 32 < K <= Kp:
                raise ModelLoadError(f"{path}: int4 tensor {name!r} holds {Kp} columns (16 bytes per 32), which do "
                                     f"not cover {K} input columns")
            want = {"_scale": (N, -(-K // group)), "_zero": (N, -(-K // group))}
        dtypes = set()
        for suffix, shape in want.items():
            companion = meta.get(name + suffix)
            if companion is None:
                raise ModelLoadError(f"{path}: quantized tensor {name!r} has no {name + suffix!r}")
            if tuple(companion.shape) != shape or companion.dtype not in _SCALES:
                raise ModelLoadError(f"{path}: tensor {name + suffix!r} is {companion.dtype} {list(companion.shape)}, "
                                     f"expected a float32, bfloat16 or float16 tensor of shape {list(shape)} for "
                                     f"{name!r}")
            dtypes.add(companion.dtype)
        if len(dtypes) > 1:
            raise ModelLoadError(f"{path}: the scales and zeros of {name!r} have different dtypes")
        out[name] = torch.empty((N, K), dtype=float_dtype, device="meta")
        matrices[name] = K

    def get_weight(name: str):
        if name not in matrices:
            return get(name)
        codes = _owned_copy(get(name))           # copies: no view keeps the file mapped after loading
        if kind == "i8":
            return Int8Weight(codes, _owned_copy(get(name + "_scale")), group or matrices[name])
        return Int4Weight(codes, _owned_copy(get(name + "_scale")), _owned_copy(get(name + "_zero")), group,
                          matrices[name])
    return out, get_weight, kind


def _owned_copy(t: torch.Tensor) -> torch.Tensor:
    """t copied out of the file mapping, whose pages are then handed back (engine/model/allocator.py)."""
    copy = t.clone()
    release_pages(t)
    return copy


# ----------------------------------------------------------------------------------------------- loading
def for_strategy(sd: dict, quant_kind: str | None, dtype: torch.dtype, where) -> dict:
    """The weights of a quantized file for a strategy ("i8", "i4" or None for float): as stored for the matching
    iN strategy; dequantized (to the strategy's dtype, matrix by matrix) for a float one; refused for the other
    quantization. Weights read from a float file pass through."""
    stored = next((v for v in sd.values() if not isinstance(v, torch.Tensor)), None)
    if stored is None:
        return sd
    file_kind = "i8" if isinstance(stored, Int8Weight) else "i4"
    if quant_kind == file_kind:
        return sd
    if quant_kind is not None:
        name = KINDS[file_kind]
        raise ModelLoadError(f"{where}: holds {name} weights, which a {quant_kind} strategy cannot use without "
                             f"quantizing them twice; load it with {' or '.join(STRATEGIES[name])} (or a float "
                             f"strategy, which dequantizes them), or convert the float checkpoint with "
                             f"--dtype {quant_kind}")
    return {k: v if isinstance(v, torch.Tensor) else v.dequantize(torch.float32).to(dtype) for k, v in sd.items()}

