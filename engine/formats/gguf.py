"""GGUF (llama.cpp) for RWKV-7, reading: arch ``rwkv7`` back to BlinkDL names, tensor by tensor from a memory map;
also what gguf_write.py shares with it (the arch name, the gguf import, World token escaping).

Layout and metadata keys follow the reference notes §3.3 (llama.cpp `conversion/rwkv.py`, `conversion/base.py`,
`src/models/rwkv7.cpp`).
"""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from engine.errors import ModelLoadError
from engine.formats.hf import TokenizerData
from engine.model.quant import Int4Weight, Int8Weight, quantizable

ARCH = "rwkv7"


def require_gguf():
    """The gguf package, or a ModelLoadError saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise ModelLoadError("GGUF support needs the 'gguf' package: pip install gguf") from None
    return gguf


# ----------------------------------------------------------------------------------------------- token escaping
def escape_rwkv_token(token: bytes) -> str:
    """llama.cpp's text form of a World token: Python's repr of the bytes without b'' (conversion/base.py)."""
    return repr(token)[2:-1]


def unescape_rwkv_token(text: str) -> bytes:
    """Inverse of escape_rwkv_token, with llama.cpp's rule (llama_unescape_rwkv_token): \\t \\n \\r \\xHH, \\c -> c."""
    out = bytearray()
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c != "\\" or i + 1 == n:
            out += c.encode("utf-8")
            i += 1
            continue
        e = text[i + 1]
        if e == "x":
            out.append(int(text[i + 2:i + 4], 16))
            i += 4
            continue
        out += {"t": b"\t", "n": b"\n", "r": b"\r"}.get(e) or e.encode("utf-8")
        i += 2
    return bytes(out)


# ----------------------------------------------------------------------------------------------- reading
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}


class _Tensor(NamedTuple):
    name: str
    tensor_type: object        # gguf.GGMLQuantizationType
    shape: list[int]           # ggml order (innermost first)
    data: np.ndarray           # numpy order; uint8 bytes for quantized types


class GGUFFile:
    """A minimal little-endian GGUF v2/v3 parser: metadata as Python values, tensors as memory-mapped numpy views.

    gguf-py's GGUFReader builds a numpy view for every element of every array (seconds for a 65536-token vocab);
    this reads the same structure with struct in a single pass. Raises ModelLoadError naming the file on bad input.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{self.path}: cannot read this GGUF file: {exc}") from None
        self._buf = memoryview(self._mm)
        try:
            self._parse()
        except (struct.error, UnicodeDecodeError, ValueError, IndexError, OverflowError) as exc:
            if isinstance(exc, ModelLoadError):
                raise
            raise ModelLoadError(f"{self.path}: cannot read this GGUF file (truncated or corrupt?): "
                                 f"{exc}") from None

    def _parse(self) -> None:
        gguf = require_gguf()
        if bytes(self._buf[:4]) != b"GGUF":
            raise ModelLoadError(f"{self.path}: cannot read this GGUF file: not GGUF (bad magic "
                                 f"{bytes(self._buf[:4])!r})")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", self._buf, 4)
        if version not in (2, 3):
            raise ModelLoadError(f"{self.path}: cannot read this GGUF file: unsupported GGUF version {version} "
                                 f"(big-endian files are not supported)")
        self._off = 24
        self.fields: dict[str, object] = {}
        for _ in range(n_kv):
            key = self._str()
            self.fields[key] = self._value(self._u32())
        infos = []
        for _ in range(n_tensors):
            name = self._str()
            n_dims = self._u32()
            dims = list(struct.unpack_from(f"<{n_dims}Q", self._buf, self._off))
            self._off += 8 * n_dims
            ttype, offset = struct.unpack_from("<IQ", self._buf, self._off)
            self._off += 12
            infos.append((name, dims, ttype, offset))
        align = int(self.fields.get("general.alignment", 32))
        start = -(-self._off // align) * align
        self.tensors: list[_Tensor] = []
        seen = set()
        for name, dims, ttype, offset in infos:
            if name in seen:
                raise ModelLoadError(f"{self.path}: tensor {name!r} appears twice")
            seen.add(name)
            try:
                qtype = gguf.GGMLQuantizationType(ttype)
            except ValueError:
                raise ModelLoadError(f"{self.path}: tensor {name!r} has unknown ggml type {ttype}") from None
            np_shape = tuple(reversed(dims))
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            n_bytes = int(np.prod(np_shape, dtype=np.int64)) // block * size
            begin = start + offset
            if begin + n_bytes > len(self._mm):
                raise ModelLoadError(f"{self.path}: cannot read this GGUF file: tensor {name!r} lies past the "
                                     f"end of the file (truncated?)")
            raw = self._mm[begin:begin + n_bytes]
            plain = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16,
                     gguf.GGMLQuantizationType.F64: np.float64}.get(qtype)
            data = raw.view(plain).reshape(np_shape) if plain is not None else \
                raw.reshape(gguf.quants.quant_shape_to_byte_shape(np_shape, qtype))
            self.tensors.append(_Tensor(name, qtype, dims, data))

    def _u32(self) -> int:
        (v,) = struct.unpack_from("<I", self._buf, self._off)
        self._off += 4
        return v

    def _str(self) -> str:
        (n,) = struct.unpack_from("<Q", self._buf, self._off)
        end = self._off + 8 + n
        if end > len(self._buf):
            raise ValueError("string runs past the end of the file")
        text = bytes(self._buf[self._off + 8:end]).decode("utf-8")
        self._off = end
        return text

    def _value(self, vtype: int):
        if vtype == 8:
            return self._str()
        if vtype in _SCALARS:
            fmt = _SCALARS[vtype]
            (v,) = struct.unpack_from(fmt, self._buf, self._off)
            self._off += struct.calcsize(fmt)
            return v
        if vtype == 9:
            sub = self._u32()
            (count,) = struct.unpack_from("<Q", self._buf, self._off)
            self._off += 8
            if sub in _NP:
                dt = np.dtype(_NP[sub])
                values = np.frombuffer(self._buf, dtype=dt, count=count, offset=self._off).tolist()
                self._off += dt.itemsize * count
                return values
            return [self._value(sub) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {vtype}")


_GLOBAL = {"token_embd.weight": "emb.weight", "token_embd_norm.weight": "blocks.0.ln0.weight",
           "token_embd_norm.bias": "blocks.0.ln0.bias", "output_norm.weight": "ln_out.weight",
           "output_norm.bias": "ln_out.bias", "output.weight": "head.weight"}
_LAYER = {  # GGUF name within blk.i -> (BlinkDL name within blocks.i, transform)
    "attn_norm.weight": ("ln1.weight", None), "attn_norm.bias": ("ln1.bias", None),
    "attn_norm_2.weight": ("ln2.weight", None), "attn_norm_2.bias": ("ln2.bias", None),
    "time_mix_k_k.weight": ("att.k_k", "vec"), "time_mix_k_a.weight": ("att.k_a", "vec"),
    "time_mix_r_k.weight": ("att.r_k", "rk"),
    "time_mix_key.weight": ("att.key.weight", None), "time_mix_value.weight": ("att.value.weight", None),
    "time_mix_receptance.weight": ("att.receptance.weight", None),
    "time_mix_output.weight": ("att.output.weight", None),
    "time_mix_ln.weight": ("att.ln_x.weight", None), "time_mix_ln.bias": ("att.ln_x.bias", None),
    "channel_mix_lerp_k.weight": ("ffn.x_k", "vec"),
    "channel_mix_key.weight": ("ffn.key.weight", None), "channel_mix_value.weight": ("ffn.value.weight", None),
}
for _x in "wavg":
    for _j, _how in (("0", "vec"), ("1", "t"), ("2", "t")):
        if not (_x == "g" and _j == "0"):
            _LAYER[f"time_mix_{_x}{_j}.weight"] = (f"att.{_x}{_j}", _how)


# what Goose reads, and which quantized type each quantized strategy keeps as it is (engine/model/quant.py)
LOADABLE_TYPES = ("F32", "F16", "BF16", "F64", "Q8_0", "Q4_0")
KEPT_TYPE = {"i8": "Q8_0", "i4": "Q4_0"}
_STRATEGIES = {"i8": "'cpu fp32i8' or 'cpu bf16i8' (on a GPU 'cuda fp16i8' or 'cuda bf16i8')",
               "i4": "'cpu fp32i4' or 'cpu bf16i4'"}


class GGUFCheckpoint:
    """A GGUF rwkv7 file opened lazily (memory-mapped): BlinkDL names, meta tensors, and one tensor at a time.

    ``quant`` ("i8", "i4" or None): the strategy's quantization. With "i8", the Q8_0 matrices a quantized strategy
    quantizes (quant.quantizable) come back from get() as Int8Weight over the file's own codes and fp16 scales (a
    byte copy, no float copy, no requantization); with "i4" the Q4_0 ones as Int4Weight. Every other tensor, and
    every tensor without ``quant``, comes back as float (quantized types expanded: a float strategy asked for float).
    A Q4_0 matrix under "i8" or a Q8_0 one under "i4" is refused (re-quantizing would compound two roundings), and
    so is any tensor type outside LOADABLE_TYPES, naming the file and tensor."""

    def __init__(self, path: str | Path, quant: str | None = None):
        self.path = Path(path)
        self.reader = GGUFFile(self.path)
        for t in self.reader.tensors:
            if t.tensor_type.name not in LOADABLE_TYPES:
                raise ModelLoadError(f"{self.path}: tensor {t.name!r} has type {t.tensor_type.name}, which Goose "
                                     f"does not load; supported tensor types: {', '.join(LOADABLE_TYPES)} (convert "
                                     f"the model again, e.g. goose convert SRC model.gguf --dtype q8_0)")
        arch = self.field("general.architecture")
        if arch != ARCH:
            raise ModelLoadError(f"{self.path}: general.architecture is {arch!r}; only RWKV-7 GGUF files "
                                 f"(architecture 'rwkv7') are supported")
        self.head_size = self.field(f"{ARCH}.wkv.head_size")
        if not isinstance(self.head_size, int) or self.head_size <= 0:
            raise ModelLoadError(f"{self.path}: missing or invalid metadata key {ARCH}.wkv.head_size")
        shift = self.field(f"{ARCH}.token_shift_count")
        if shift not in (None, 2):
            raise ModelLoadError(f"{self.path}: {ARCH}.token_shift_count is {shift}; RWKV-7 needs 2")
        self.tensors = {t.name: t for t in self.reader.tensors}
        self._how: dict[str, tuple[str, object]] = {}
        self.meta: dict[str, torch.Tensor] = {}
        self.kept: set[str] = set()          # keys get() returns quantized
        for gname, t in self.tensors.items():
            for key, how in self._map(gname):
                self._how[key] = (gname, how)
                if quant is not None and how is None and quantizable(key) and t.tensor_type.name in ("Q8_0", "Q4_0"):
                    if t.tensor_type.name != KEPT_TYPE[quant]:
                        other = next(k for k, v in KEPT_TYPE.items() if v == t.tensor_type.name)
                        raise ModelLoadError(
                            f"{self.path}: tensor {gname!r} is {t.tensor_type.name}, which an {quant} strategy does "
                            f"not use; load this file with {_STRATEGIES[other]} (kept as stored) or a float "
                            f"strategy such as 'cpu fp32' (expanded), or convert the source model again with "
                            f"--dtype {KEPT_TYPE[quant].lower()}")
                    self.kept.add(key)
                np_shape = tuple(int(d) for d in reversed(t.shape))
                self.meta[key] = self._transform(torch.empty(np_shape, device="meta", dtype=self._dtype(t)), how)

    def field(self, key: str):
        return self.reader.fields.get(key)

    def _map(self, gname: str) -> list[tuple[str, object]]:
        if gname in _GLOBAL:
            return [(_GLOBAL[gname], None)]
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", gname)
        if m:
            i, rest = m.groups()
            if rest == "time_mix_lerp_fused.weight":
                return [(f"blocks.{i}.att.x_{c}", ("lerp", j)) for j, c in enumerate("rwkvag")]
            if i == "0" and re.fullmatch(r"time_mix_v[012]\.weight", rest):
                return []                    # llama.cpp's layer-0 placeholders (copies of a0/a1/a2): unused
            if rest in _LAYER:
                key, how = _LAYER[rest]
                return [(f"blocks.{i}.{key}", how)]
        raise ModelLoadError(f"{self.path}: unexpected tensor {gname!r} for an RWKV-7 GGUF")

    def _dtype(self, t) -> torch.dtype:
        Q = require_gguf().GGMLQuantizationType
        return {Q.F16: torch.float16, Q.BF16: torch.bfloat16}.get(t.tensor_type, torch.float32)

    def _transform(self, t: torch.Tensor, how) -> torch.Tensor:
        if how is None:
            return t
        if how == "vec":
            return t.reshape(1, 1, -1)
        if how == "t":
            if t.dim() != 2:
                raise ModelLoadError(f"{self.path}: a LoRA matrix has shape {list(t.shape)}, expected 2 dimensions")
            return t.t()
        if how == "rk":
            if t.numel() % self.head_size:
                raise ModelLoadError(f"{self.path}: time_mix_r_k has {t.numel()} values, not a multiple of "
                                     f"head size {self.head_size}")
            return t.reshape(-1, self.head_size)
        _, j = how
        if t.numel() % 6:
            raise ModelLoadError(f"{self.path}: time_mix_lerp_fused has shape {list(t.shape)}; expected 6 mixes "
                                 f"(r, w, k, v, a, g)")
        return t.reshape(6, -1)[j].reshape(1, 1, -1)

    def raw(self, gname: str) -> torch.Tensor:
        """One GGUF tensor as torch in numpy order: F32/F16/BF16 as stored, quantized types dequantized to fp32."""
        gguf = require_gguf()
        Q = gguf.GGMLQuantizationType
        t = self.tensors[gname]
        np_shape = tuple(int(d) for d in reversed(t.shape))
        if t.tensor_type in (Q.F32, Q.F16, Q.F64):
            return torch.from_numpy(np.array(t.data)).reshape(np_shape)
        if t.tensor_type == Q.BF16:
            return torch.from_numpy(np.array(t.data).view(np.int16)).view(torch.bfloat16).reshape(np_shape)
        try:
            return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type))).reshape(np_shape)
        except NotImplementedError:
            raise ModelLoadError(f"{self.path}: tensor {gname!r} has type {t.tensor_type.name}, which gguf cannot "
                                 f"dequantize") from None

    def get(self, key: str) -> torch.Tensor:
        gname, how = self._how[key]
        if key in self.kept:
            return self.quantized(gname)
        return self._transform(self.raw(gname), how).contiguous()

    def quantized(self, gname: str):
        """A Q8_0 / Q4_0 matrix as Int8Weight / Int4Weight over the file's own codes and fp16 scales: one copy of
        the bytes out of the memory map (split into codes and scales), never a float copy."""
        t = self.tensors[gname]
        N, K = (int(d) for d in reversed(t.shape))
        blocks = t.data.reshape(N, K // 32, -1)                                  # [N, blocks, 34 or 18] bytes
        scales = torch.from_numpy(np.ascontiguousarray(blocks[..., :2]).view(np.float16).reshape(N, K // 32))
        codes = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:]).reshape(N, -1))
        if t.tensor_type.name == "Q8_0":
            return Int8Weight(codes.view(torch.int8), scales, 32)
        return Int4Weight(codes, scales, None, 32, K)

    # ------------------------------------------------------------------------------------------- tokenizer
    def tokenizer(self) -> TokenizerData | None:
        """The embedded tokenizer, or None when the file has none (or one this project cannot use)."""
        gguf = require_gguf()
        src = f"{self.path} (embedded)"
        hf_json = self.field(gguf.Keys.Tokenizer.HF_JSON)
        if isinstance(hf_json, str):
            return TokenizerData("bpe", hf_json=hf_json, source=src)
        model = self.field(gguf.Keys.Tokenizer.MODEL)
        if model not in ("rwkv", "gpt2"):
            return None
        tokens = self.field(gguf.Keys.Tokenizer.LIST) or []
        types = self.field(gguf.Keys.Tokenizer.TOKEN_TYPE) or [1] * len(tokens)
        TT = gguf.TokenType
        if model == "rwkv":
            vocab = {i: unescape_rwkv_token(t) for i, (t, ty) in enumerate(zip(tokens, types))
                     if i > 0 and ty == TT.NORMAL}
            return TokenizerData("world", world_vocab=vocab, source=src)
        merges = self.field(gguf.Keys.Tokenizer.MERGES) or []
        vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == TT.NORMAL}
        added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": ty == TT.CONTROL}
                 for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (TT.CONTROL, TT.USER_DEFINED)]
        spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
                "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                  "use_regex": True},
                "post_processor": None,
                "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
                "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                          "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                          "vocab": vocab, "merges": merges}}
        return TokenizerData("bpe", hf_json=json.dumps(spec, ensure_ascii=False), source=src)
