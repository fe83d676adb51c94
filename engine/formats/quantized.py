"""Quantized safetensors: the big matrices stored as the `cpu ...i8` / `cpu ...i4` strategies hold them.

`goose convert SRC DST.safetensors --dtype i8|i4` writes them (engine/formats/convert.py); open_checkpoint reads
them (engine/formats/checkpoint.py), and load_model uses the stored codes as they are: no float copy and no second
quantization. The layout is plain and portable (it does not depend on torch's build-specific int4 packing):

- metadata (the safetensors header's __metadata__, all strings): ``goose.format`` = ``rwkv7-quantized``,
  ``goose.format_version`` = ``1``, ``goose.quantization`` = ``int8`` or ``int4``, ``goose.group_size`` (int4);
  ``goose.in_features`` (int4, only when some matrix's K is not a multiple of the group): a JSON object
  {tensor name: K}.
- int8, for a matrix ``X.weight`` [N, K]: ``X.weight`` int8 [N, K] (symmetric, |q| <= 127) and
  ``X.weight_scale`` bf16 [N]: W[n, k] ~ q[n, k] * scale[n].
- int4, groups of G input columns: ``X.weight`` uint8 [N, Kp / 2] with Kp = K rounded up to a multiple of G, two
  codes per byte, column 2j in the low nibble and column 2j + 1 in the high one; ``X.weight_scale`` and
  ``X.weight_zero`` bf16 [N, Kp / G]: W[n, k] ~ (q[n, k] - 8) * scale[n, k // G] + zero[n, k // G], q in 0..15.
  Columns K..Kp-1 are padding and ignored.

Which matrices: the projections (receptance, key, value, output), the FFN (key, value) and the head, as far as
engine/model/quant.py's QUANTIZED families go; every other tensor stays float, in the source's dtype.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.errors import ModelLoadError
from engine.model import quant                     # the one dependence on it: its public names, read at call time
from engine.model.allocator import release_pages
from engine.model.quant import Int4Weight, Int8Weight

FORMAT, VERSION = "rwkv7-quantized", "1"
KINDS = {"i8": "int8", "i4": "int4"}                   # strategy suffix / --dtype -> goose.quantization
STRATEGIES = {"int8": ("cpu fp32i8", "cpu bf16i8"), "int4": ("cpu fp32i4", "cpu bf16i4")}
MATRIX = re.compile(r"^(head|blocks\.\d+\.(att\.(receptance|key|value|output)|ffn\.(key|value)))\.weight$")
_INT4_ROWS = 32          # Int4Weight keeps N padded to a multiple of this (engine/model/quant.py's quantize_int4)
_CHUNK = 2048            # rows converted at once (a multiple of _INT4_ROWS)
_BF16 = torch.bfloat16


def quantized_matrix(name: str) -> bool:
    """Whether `goose convert --dtype i8|i4` stores this BlinkDL tensor quantized."""
    return bool(MATRIX.match(name)) and quant.family(name) in quant.QUANTIZED


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
        return [(name, (N, K), torch.int8), (name + "_scale", (N,), _BF16)]
    G = group_size()
    Kp = -(-K // G) * G
    return [(name, (N, Kp // 2), torch.uint8), (name + "_scale", (N, Kp // G), _BF16),
            (name + "_zero", (N, Kp // G), _BF16)]


def encode(kind: str, w: torch.Tensor) -> list[torch.Tensor]:
    """A float matrix [N, K] quantized exactly as the strategy quantizes it at load, in the file's layout (the
    tensors plan() lists, in its order)."""
    N, K = w.shape
    if kind == "i8":
        qw = quant.quantize_int8(w)
        return [qw.q[:, :K].contiguous(), qw.scale]
    qw = quant.quantize_int4(w, group_size())
    Kp = -(-K // qw.group) * qw.group
    codes = quant.unpack_int4(qw.packed)[:N, :Kp]                                      # [N, Kp] uint8, 0..15
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    sz = qw.scale_zero[:, :N].transpose(0, 1)                                   # [N, Kp / G, 2]
    return [packed, sz[..., 0].contiguous(), sz[..., 1].contiguous()]


def write_file(path: Path, names: list[str], meta: dict[str, torch.Tensor], get: Callable[[str], torch.Tensor],
               kind: str, bar=None) -> str:
    """Stream a quantized safetensors file: the big matrices of get() (float, BlinkDL names) quantized as the
    `cpu ...{kind}` strategies quantize them, every other tensor as stored. bar: a tqdm bar or None."""
    from engine.formats.convert import write_safetensors
    if kind == "i4":
        check_int4_layout()
    entries, in_features = [], {}
    for n in names:
        shape = tuple(meta[n].shape)
        if quantized_matrix(n):
            entries += plan(kind, n, shape)
            if shape[1] % group_size():
                in_features[n] = shape[1]
        else:
            entries.append((n, shape, meta[n].dtype))
    if bar:
        bar.reset(total=sum(torch.Size(s).numel() * d.itemsize for _, s, d in entries))
    pending: dict[str, torch.Tensor] = {}

    def produce(name: str) -> torch.Tensor:          # a matrix's companions come right after it (plan's order)
        if name in pending:
            return pending.pop(name)
        if not quantized_matrix(name):
            return get(name)
        parts = encode(kind, get(name))
        companions = plan(kind, name, tuple(meta[name].shape))[1:]
        pending.update(zip((entry[0] for entry in companions), parts[1:]))
        return parts[0]
    write_safetensors(path, entries, produce, bar.update if bar else None, metadata=metadata(kind, in_features))
    n_mat = sum(map(quantized_matrix, names))
    return f"{n_mat} matrices {KINDS[kind]}, {len(names) - n_mat} tensors as stored"


def check_int4_layout() -> None:
    """Writing int4 reads the codes back from torch's packing (unpack_int4): refuse where that layout is not known.
    (Reading needs no check: torch packs the plain codes itself.)"""
    codes = torch.randint(0, 16, (64, 128), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    w = _int4_weight(codes[:, 0::2] | (codes[:, 1::2] << 4), torch.ones(64, 2, dtype=_BF16),
                     torch.zeros(64, 2, dtype=_BF16), 128, 64)
    if not torch.equal(quant.unpack_int4(w.packed)[:64].to(torch.uint8), codes):
        raise ModelLoadError(f"this torch build ({torch.__version__}) packs int4 weights in a layout Goose does not "
                             f"know, so int4 files cannot be written here (they can be read); use --dtype i8")


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
    if kind == "i4":
        try:
            group = int(info.get("goose.group_size", ""))
            in_features = json.loads(info.get("goose.in_features", "{}"))
        except ValueError:
            raise ModelLoadError(f"{path}: unreadable goose.group_size or goose.in_features metadata") from None
        if group <= 0 or group % 32:
            raise ModelLoadError(f"{path}: int4 group size {group} is not a positive multiple of 32")
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
        if not MATRIX.match(name):
            raise ModelLoadError(f"{path}: tensor {name!r} is stored quantized ({t.dtype}), but only the projection, "
                                 f"FFN and head matrices may be")
        if t.dim() != 2:
            raise ModelLoadError(f"{path}: quantized tensor {name!r} has shape {list(t.shape)}, expected 2 dimensions")
        N = t.shape[0]
        if kind == "i8":
            K, want = t.shape[1], {"_scale": (N,)}
        else:
            Kp = 2 * t.shape[1]
            K = int(in_features.get(name, Kp))
            if Kp % group or not Kp - group < K <= Kp:
                raise ModelLoadError(f"{path}: int4 tensor {name!r} holds {Kp} columns, which is not a multiple "
                                     f"of the group size {group} covering {K} input columns")
            want = {"_scale": (N, Kp // group), "_zero": (N, Kp // group)}
        for suffix, shape in want.items():
            companion = meta.get(name + suffix)
            if companion is None:
                raise ModelLoadError(f"{path}: quantized tensor {name!r} has no {name + suffix!r}")
            if tuple(companion.shape) != shape or not companion.is_floating_point():
                raise ModelLoadError(f"{path}: tensor {name + suffix!r} is {companion.dtype} {list(companion.shape)}, "
                                     f"expected a float tensor of shape {list(shape)} for {name!r}")
        out[name] = torch.empty((N, K), dtype=float_dtype, device="meta")
        matrices[name] = K

    def get_weight(name: str):
        if name not in matrices:
            return get(name)
        if kind == "i8":
            return _int8_weight(get(name), get(name + "_scale"), matrices[name])
        return _int4_weight(get(name), get(name + "_scale"), get(name + "_zero"), matrices[name], group)
    return out, get_weight, kind


def _int8_weight(q: torch.Tensor, scale: torch.Tensor, k: int) -> Int8Weight:
    # codes copied out of the file mapping (the mapping is released after loading); K padded to a multiple of 8 as
    # the product needs (engine/model/quant.py)
    codes = F.pad(q, (0, -k % 8)) if k % 8 else q.clone()
    release_pages(q)
    return Int8Weight(codes, scale.to(_BF16, copy=True), k)       # a copy: no view keeps the file mapped


def _int4_weight(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, k: int, group: int) -> Int4Weight:
    """Plain nibbles [N, Kp / 2] and [N, Kp / G] scales/zeros -> Int4Weight (torch's CPU packing, rows padded to
    a multiple of 32 with code 8 and scale 0, so they read as zero)."""
    N, Kp = packed.shape[0], 2 * packed.shape[1]
    Np = -(-N // _INT4_ROWS) * _INT4_ROWS
    pieces = []
    for i in range(0, Np, _CHUNK):
        rows = packed[i:i + _CHUNK]
        codes = torch.stack((rows & 15, rows >> 4), dim=-1).view(rows.shape[0], Kp).to(torch.int32)
        codes = F.pad(codes, (0, 0, 0, min(_CHUNK, Np - i) - rows.shape[0]), value=8)
        pieces.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
    release_pages(packed)
    sz = torch.stack((scale.to(_BF16), zero.to(_BF16)), dim=-1)                 # [N, Kp / G, 2]
    sz = F.pad(sz, (0, 0, 0, 0, 0, Np - N)).transpose(0, 1).contiguous()        # [Kp / G, Np, 2]
    return Int4Weight(torch.cat(pieces) if len(pieces) > 1 else pieces[0], sz, N, k, group)


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

