"""The stored-state byte format: exact round trips, and every damaged or foreign blob refused with a typed error."""
import struct
import zlib

import pytest
import torch

from engine.config import ModelConfig
from engine.model.state import RNNState
from engine.states import (BlobMismatch, CorruptBlob, StateKey, decode_record, decode_state, encode_record,
                           encode_state)
from engine.states.codec import MAGIC, VERSION, peek

CFG = ModelConfig(n_layer=2, n_embd=64, n_head=2, head_size=32, vocab_size=100, dim_ffn=128, decay_lora=8,
                  iclr_lora=8, value_lora=8, gate_lora=8)
KEY = StateKey("a" * 64, "", "resp_1")


def random_state(cfg=CFG, seed=0) -> RNNState:
    g = torch.Generator().manual_seed(seed)
    s = RNNState.zeros(cfg, 1)
    for t in s.tensors():
        t.copy_(torch.randn(t.shape, generator=g))
    return s


def same(a: RNNState, b: RNNState) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors(), strict=True))


def test_round_trip_is_exact_and_writable():
    s = random_state()
    blob = encode_state(KEY, s, created=123.5)
    assert len(blob) - CFG.state_bytes < 400          # the header is small
    out = decode_state(blob, KEY, CFG)
    assert same(s, out)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in out.tensors())
    assert out.wkv[0].shape == (1, 2, 32, 32) and out.att_x[1].shape == (1, 64)
    out.wkv[1].add_(1)                                 # a fresh, writable copy: the blob is untouched
    assert same(s, decode_state(blob, KEY, CFG))
    assert peek(blob).created == 123.5 and peek(blob).key == KEY


def test_state_from_a_row_of_a_batch():
    big = RNNState.cat([random_state(seed=1), random_state(seed=2)])
    row = big.narrow(1, 1)
    assert same(decode_state(encode_state(KEY, row, created=0), KEY, CFG), random_state(seed=2))
    with pytest.raises(ValueError, match="batch of one"):
        encode_state(KEY, big, created=0)


@pytest.mark.parametrize("cut", [0, 5, 30, 100, -1])
def test_truncated_blob_is_corrupt(cut):
    blob = encode_state(KEY, random_state(), created=0)
    with pytest.raises(CorruptBlob, match="truncated"):
        decode_state(blob[:cut], KEY, CFG)


def test_flipped_payload_byte_fails_the_crc():
    blob = bytearray(encode_state(KEY, random_state(), created=0))
    blob[-7] ^= 0x10
    with pytest.raises(CorruptBlob, match="CRC"):
        decode_state(bytes(blob), KEY, CFG)
    decode_state(bytes(blob), KEY, CFG, verify=False)  # (only memory-tier blobs skip the check)


def test_wrong_magic_version_and_garbage():
    blob = encode_state(KEY, random_state(), created=0)
    with pytest.raises(CorruptBlob, match="magic"):
        decode_state(b"NOTGOOSE" + blob[8:], KEY, CFG)
    newer = blob[:8] + struct.pack("<H", VERSION + 1) + blob[10:]
    with pytest.raises(CorruptBlob, match="version"):
        decode_state(newer, KEY, CFG)
    with pytest.raises(CorruptBlob):
        decode_state(b"\x00" * 4096, KEY, CFG)
    with pytest.raises(CorruptBlob):
        decode_state(MAGIC + b"\x01" * 40, KEY, CFG)


def test_malformed_header_with_a_valid_crc_is_corrupt():
    head = b'{"key": "not a list", "created": 0}'
    crc = zlib.crc32(head)
    blob = struct.pack("<8sHBBIQI", MAGIC, VERSION, 1, 0, len(head), 0, crc) + head
    with pytest.raises(CorruptBlob, match="header"):
        decode_state(blob, KEY, CFG)


def test_other_key_model_or_initial_state_is_a_mismatch():
    blob = encode_state(KEY, random_state(), created=0)
    for other in (StateKey("b" * 64, "", "resp_1"), StateKey("a" * 64, "tuned", "resp_1"),
                  StateKey("a" * 64, "", "resp_2")):
        with pytest.raises(BlobMismatch, match="key"):
            decode_state(blob, other, CFG)


def test_other_shapes_are_a_mismatch():
    blob = encode_state(KEY, random_state(), created=0)
    for change in ({"n_layer": 3}, {"n_embd": 128, "n_head": 4}, {"n_head": 4, "head_size": 16}):
        cfg = ModelConfig(**{**vars(CFG), **change})
        with pytest.raises(BlobMismatch, match="shapes"):
            decode_state(blob, KEY, cfg)


def test_record_round_trip_and_kind_check():
    record = {"id": "resp_1", "output": [{"text": "héllo ✓"}], "n": 3, "ok": True, "none": None}
    blob = encode_record(KEY, record, created=5)
    assert decode_record(blob, KEY) == record
    with pytest.raises(BlobMismatch, match="record"):
        decode_state(blob, KEY, CFG)
    with pytest.raises(BlobMismatch, match="state"):
        decode_record(encode_state(KEY, random_state(), created=0), KEY)
    with pytest.raises(ValueError):
        encode_record(KEY, {"x": float("nan")}, created=0)


def test_digest_depends_on_every_part_and_the_kind():
    digests = {k.digest(kind) for k in (KEY, StateKey("b" * 64, "", "resp_1"), StateKey("a" * 64, "x", "resp_1"),
                                        StateKey("a" * 64, "", "resp_2")) for kind in (1, 2)}
    assert len(digests) == 8 and all(len(d) == 64 for d in digests)
    with pytest.raises(ValueError):
        StateKey("", "", "k")
