"""The byte format of stored states and records: a checked header, then fp32 tensors or JSON.

Layout (little-endian):
    prefix   8s magic "GOOSTATE", u16 format version, u8 kind (1 state, 2 record), u8 reserved (0),
             u32 header length, u64 payload length, u32 CRC-32 of header + payload
    header   UTF-8 JSON: {"key": [model identity, initial-state name, key], "created": unix seconds,
             states also "n_layer", "n_embd", "n_head", "head_size", "dtype": "<f4"}
    payload  a state: per layer att_x [C], wkv [H, N, N] (rows = value index), ffn_x [C], fp32
             (the rwkv package's state list 3i+0/1/2, flattened); a record: UTF-8 JSON

Reading checks everything and raises CorruptBlob (truncated, bad magic/version/CRC, malformed header) or
BlobMismatch (another key, model identity or shape), never returns a wrong state. CRC-32 detects damage, not
tampering: whoever can write the store's directory or Redis can write states (the store is trusted storage).
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from engine.config import ModelConfig
from engine.model.state import RNNState

MAGIC = b"GOOSTATE"
VERSION = 1
KIND_STATE, KIND_RECORD = 1, 2
KIND_NAMES = {KIND_STATE: "state", KIND_RECORD: "record"}
_PREFIX = struct.Struct("<8sHBBIQI")
MAX_HEADER = 1 << 16                      # a header is a few hundred bytes; a larger length is garbage
_F32 = np.dtype("<f4")


class BlobError(ValueError):
    """A stored blob that must not be used; the store turns it into a miss and deletes the copy."""


class CorruptBlob(BlobError):
    """Truncated, damaged (CRC), not ours (magic), or written by another format version."""


class BlobMismatch(BlobError):
    """A sound blob for something else: another key, model identity, kind or state shape."""


@dataclass(frozen=True)
class StateKey:
    """What a stored state or record is for: states are only shared between equal models and initial states."""
    model: str              # RWKV7.identity (a SHA-256 hex over weights and config)
    initial: str            # name of the initial state the tokens ran from ("" = the zero state)
    key: str                # the caller's key, e.g. a response id

    def __post_init__(self):
        for name in ("model", "initial", "key"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"StateKey.{name} must be a str, got {type(getattr(self, name)).__name__}")
        if not self.model or not self.key:
            raise ValueError("StateKey.model and StateKey.key must be non-empty")

    def digest(self, kind: int) -> str:
        """SHA-256 hex of (kind, model, initial, key): the name of the blob in every tier."""
        parts = (KIND_NAMES[kind], self.model, self.initial, self.key)
        return hashlib.sha256("\0".join(parts).encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class BlobInfo:
    """The checked prefix and header of a blob (the CRC is checked only by the decode functions)."""
    kind: int
    header: dict
    payload_offset: int
    payload_len: int
    crc: int

    @property
    def created(self) -> float:
        return self.header["created"]

    @property
    def key(self) -> StateKey:
        return StateKey(*self.header["key"])


def _pack(kind: int, header: dict, payload: bytes | memoryview) -> bytes:
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    crc = zlib.crc32(payload, zlib.crc32(head))
    return b"".join((_PREFIX.pack(MAGIC, VERSION, kind, 0, len(head), len(payload), crc), head, payload))


def peek(blob: bytes) -> BlobInfo:
    """Parse and check the prefix and header (lengths, magic, version, JSON); O(header), no CRC."""
    view = memoryview(blob)
    if len(view) < _PREFIX.size:
        raise CorruptBlob(f"truncated: {len(view)} bytes, shorter than the {_PREFIX.size}-byte prefix")
    magic, version, kind, _, head_len, payload_len, crc = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise CorruptBlob(f"not a Goose state blob (magic {bytes(magic)!r})")
    if version != VERSION:
        raise CorruptBlob(f"format version {version}, this build reads version {VERSION}")
    if kind not in KIND_NAMES:
        raise CorruptBlob(f"unknown kind {kind}")
    if head_len > MAX_HEADER or len(view) != _PREFIX.size + head_len + payload_len:
        raise CorruptBlob(f"truncated or padded: {len(view)} bytes, the prefix says "
                          f"{_PREFIX.size + head_len + payload_len}")
    try:
        header = json.loads(bytes(view[_PREFIX.size:_PREFIX.size + head_len]))
        key = header["key"]
        ok = (isinstance(key, list) and len(key) == 3 and all(isinstance(p, str) for p in key)
              and isinstance(header["created"], (int, float)) and math.isfinite(header["created"]))
    except (ValueError, KeyError, TypeError) as exc:      # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CorruptBlob(f"malformed header: {exc}") from None
    if not ok:
        raise CorruptBlob("malformed header: key or created has the wrong type")
    return BlobInfo(kind, header, _PREFIX.size + head_len, payload_len, crc)


def _open(blob: bytes, kind: int, key: StateKey, verify: bool) -> tuple[BlobInfo, memoryview]:
    info = peek(blob)
    view = memoryview(blob)
    if verify and zlib.crc32(view[_PREFIX.size:]) != info.crc:
        raise CorruptBlob("CRC mismatch: the blob is damaged")
    if info.kind != kind:
        raise BlobMismatch(f"a {KIND_NAMES[info.kind]} blob, a {KIND_NAMES[kind]} was asked for")
    if tuple(info.header["key"]) != (key.model, key.initial, key.key):
        raise BlobMismatch(f"the blob is for key {info.header['key']}, not {[key.model, key.initial, key.key]}")
    return info, view[info.payload_offset:]


# ------------------------------------------------------------------------------------------------ states

def _shape_header(cfg: ModelConfig) -> dict:
    return {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head, "head_size": cfg.head_size,
            "dtype": _F32.str}


def encode_state(key: StateKey, state: RNNState, *, created: float) -> bytes:
    """A batch-of-one state (on any device, any float dtype) as a blob; the state is copied, not kept."""
    if state.batch_size != 1:
        raise ValueError(f"encode_state takes a batch of one, got {state.batch_size} sequences")
    L = state.n_layer
    _, H, N, _ = state.wkv[0].shape
    C = state.att_x[0].shape[1]
    parts = [t for i in range(L) for t in (state.att_x[i], state.wkv[i], state.ffn_x[i])]
    flat = torch.cat([t.detach().reshape(-1).to("cpu", torch.float32) for t in parts])
    payload = flat.numpy().astype(_F32, copy=False).data        # a view on little-endian hosts: no copy
    header = {"key": [key.model, key.initial, key.key], "created": float(created),
              "n_layer": L, "n_embd": C, "n_head": H, "head_size": N, "dtype": _F32.str}
    return _pack(KIND_STATE, header, payload.cast("B"))


def decode_state(blob: bytes, key: StateKey, config: ModelConfig, *, verify: bool = True) -> RNNState:
    """The batch-of-one fp32 CPU state in ``blob``, checked against ``key`` and ``config``'s shapes.

    verify=False skips the CRC (for blobs that never left this process's memory)."""
    info, payload = _open(blob, KIND_STATE, key, verify)
    want = _shape_header(config)
    got = {k: info.header.get(k) for k in want}
    if got != want:
        raise BlobMismatch(f"state shapes {got} do not fit this model {want}")
    L, C, H, N = config.n_layer, config.n_embd, config.n_head, config.head_size
    per_layer = 2 * C + H * N * N
    if info.payload_len != 4 * L * per_layer:
        raise CorruptBlob(f"payload of {info.payload_len} bytes, the shapes need {4 * L * per_layer}")
    flat = torch.from_numpy(np.frombuffer(payload, dtype=_F32).astype(np.float32))     # one copy, writable
    layers = flat.view(L, per_layer)
    return RNNState(att_x=[layers[i, :C].view(1, C) for i in range(L)],
                    wkv=[layers[i, C:C + H * N * N].view(1, H, N, N) for i in range(L)],
                    ffn_x=[layers[i, C + H * N * N:].view(1, C) for i in range(L)])


# ------------------------------------------------------------------------------------------------ records

def encode_record(key: StateKey, record: dict, *, created: float) -> bytes:
    """A JSON-serializable dict as a blob (raises TypeError/ValueError for values JSON cannot hold)."""
    if not isinstance(record, dict):
        raise TypeError(f"a record is a dict, got {type(record).__name__}")
    payload = json.dumps(record, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    return _pack(KIND_RECORD, {"key": [key.model, key.initial, key.key], "created": float(created)}, payload)


def decode_record(blob: bytes, key: StateKey, *, verify: bool = True) -> dict:
    _, payload = _open(blob, KIND_RECORD, key, verify)
    try:
        record = json.loads(bytes(payload))
    except ValueError as exc:
        raise CorruptBlob(f"record payload is not JSON: {exc}") from None
    if not isinstance(record, dict):
        raise CorruptBlob(f"record payload is a {type(record).__name__}, not an object")
    return record
