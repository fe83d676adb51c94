"""Stored RNN states and records: the byte format (codec.py), the tiers (tiers.py: memory, a local directory,
Redis), the background writer (writer.py) and the StateStore that ties them together (store.py)."""
from engine.states.codec import BlobError, BlobMismatch, CorruptBlob, StateKey, decode_record, decode_state
from engine.states.codec import encode_record, encode_state
from engine.states.store import StateStore, StoreConfig, StoreStats
from engine.states.tiers import TierStats
from engine.states.writer import WriterStats

__all__ = ["BlobError", "BlobMismatch", "CorruptBlob", "StateKey", "decode_record", "decode_state", "encode_record",
           "encode_state", "StateStore", "StoreConfig", "StoreStats", "TierStats", "WriterStats"]
