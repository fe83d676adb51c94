"""StateStore's memory and disk tiers: round trips, restarts, LRU budgets, TTL, damaged files, deletes, counters."""
import os
import threading
import time

import pytest

import engine.states.store as store_mod
from engine.model.state import RNNState
from engine.states import StateKey, StateStore, StoreConfig
from engine.states.codec import KIND_RECORD, KIND_STATE, encode_state
from tests.test_state_codec import CFG, random_state, same

MODEL = "c" * 64


def key(name: str, initial: str = "") -> StateKey:
    return StateKey(MODEL, initial, name)


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def make_store(tmp_path):
    stores = []

    def make(**kw):
        kw.setdefault("disk_dir", str(tmp_path / "states"))
        clock = kw.pop("clock", time.time)
        store = StateStore(StoreConfig(**kw), clock=clock)
        stores.append(store)
        return store
    yield make
    for s in stores:
        s.close()


def blob_path(store: StateStore, k: StateKey, kind: int = KIND_STATE):
    digest = k.digest(kind)
    return store.disk.root / digest[:2] / f"{digest}.gst"


def test_memory_tier_round_trip(make_store):
    store = make_store(disk_dir=None)
    s = random_state()
    store.put_state(key("r1"), s, background=False)
    assert same(store.get_state(key("r1"), CFG), s)
    assert store.get_state(key("r2"), CFG) is None
    assert store.get_state(key("r1", initial="tuned"), CFG) is None   # another initial state is another key
    st = store.stats().tiers["memory"]
    assert (st.hits, st.misses, st.entries, st.writes) == (1, 2, 1, 1)
    assert abs(st.bytes - len(encode_state(key("r1"), s, created=time.time()))) <= 8   # digits of the time


def test_disk_tier_round_trip_and_restart(make_store):
    store = make_store(memory_bytes=0)
    s = random_state(seed=3)
    store.put_state(key("r1"), s, background=False)
    assert blob_path(store, key("r1")).exists()
    assert same(store.get_state(key("r1"), CFG), s)
    store.close()
    again = make_store()                          # a restarted server on the same directory
    assert again.stats().tiers["disk"].entries == 1
    assert same(again.get_state(key("r1"), CFG), s)
    st = again.stats().tiers
    assert (st["memory"].misses, st["disk"].hits, st["memory"].entries) == (1, 1, 1)   # promoted into memory
    assert same(again.get_state(key("r1"), CFG), s) and again.stats().tiers["memory"].hits == 1


def test_background_put_is_visible_at_once_then_written(make_store):
    store = make_store()
    s = random_state(seed=4)
    store.put_state(key("r1"), s)                 # background: a snapshot now, writes on the writer thread
    s.wkv[0].zero_()                              # the caller's state moves on; the snapshot does not
    got = store.get_state(key("r1"), CFG)
    assert same(got, random_state(seed=4))
    assert store.flush(10)
    assert blob_path(store, key("r1")).exists() and store.stats().pending == 0
    assert store.stats().writer.done >= 1
    assert same(store.get_state(key("r1"), CFG), random_state(seed=4))


def test_memory_budget_evicts_least_recently_used(make_store):
    size = len(encode_state(key("x"), random_state(), created=time.time())) + 50      # room for the header
    store = make_store(disk_dir=None, memory_bytes=2 * size)
    for name in ("a", "b"):
        store.put_state(key(name), random_state(), background=False)
    store.get_state(key("a"), CFG)                # a is now more recent than b
    store.put_state(key("c"), random_state(), background=False)
    assert store.get_state(key("b"), CFG) is None
    assert store.get_state(key("a"), CFG) is not None and store.get_state(key("c"), CFG) is not None
    st = store.stats().tiers["memory"]
    assert st.evictions == 1 and st.entries == 2 and st.bytes <= 2 * size


def test_disk_budget_evicts_least_recently_used_across_restarts(make_store):
    size = len(encode_state(key("x"), random_state(), created=time.time())) + 50
    store = make_store(memory_bytes=0, disk_bytes=3 * size)
    for i, name in enumerate("abc"):
        store.put_state(key(name), random_state(), background=False)
        os.utime(blob_path(store, key(name)), (1000 + i, 1000 + i))    # distinct mtimes: a oldest
    store.close()
    store = make_store(memory_bytes=0, disk_bytes=3 * size)
    assert store.get_state(key("a"), CFG) is not None                 # a read refreshes a's mtime
    store.put_state(key("d"), random_state(), background=False)
    assert not blob_path(store, key("b")).exists()
    assert all(blob_path(store, key(n)).exists() for n in "acd")
    store.close()
    small = make_store(memory_bytes=0, disk_bytes=2 * size)             # a smaller budget applies at start
    assert small.stats().tiers["disk"].entries == 2 and small.stats().tiers["disk"].bytes <= 2 * size
    assert not blob_path(small, key("c")).exists()


def test_ttl_expires_in_memory_and_on_disk(make_store):
    clock = Clock()
    store = make_store(ttl_s=60, clock=clock)
    store.put_state(key("r1"), random_state(), background=False)
    store.put_record(key("r1"), {"id": "resp_1"})
    clock.now += 59
    assert store.get_state(key("r1"), CFG) is not None and store.get_record(key("r1")) == {"id": "resp_1"}
    clock.now += 2
    assert store.get_state(key("r1"), CFG) is None and store.get_record(key("r1")) is None
    assert not blob_path(store, key("r1")).exists() and not blob_path(store, key("r1"), KIND_RECORD).exists()
    st = store.stats()
    assert st.expired == 4 and st.tiers["memory"].entries == 0 and st.tiers["disk"].entries == 0


def test_ttl_counts_from_the_write_not_the_promotion(make_store):
    clock = Clock()
    store = make_store(ttl_s=60, clock=clock)
    store.put_state(key("r1"), random_state(), background=False)
    store.close()
    clock.now += 50
    again = make_store(ttl_s=60, clock=clock)
    assert again.get_state(key("r1"), CFG) is not None      # disk hit, promoted to memory
    clock.now += 11
    assert again.get_state(key("r1"), CFG) is None


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "garbage"])
def test_damaged_file_is_a_miss_and_deleted(make_store, damage):
    store = make_store(memory_bytes=0)
    store.put_state(key("r1"), random_state(), background=False)
    path = blob_path(store, key("r1"))
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "empty":
        data = b""
    else:
        data = os.urandom(len(data))
    path.write_bytes(bytes(data))
    assert store.get_state(key("r1"), CFG) is None
    assert not path.exists()
    st = store.stats()
    assert st.corrupt == 1 and st.tiers["disk"].errors == 1 and st.tiers["disk"].entries == 0


def test_other_models_file_is_a_miss_and_deleted(make_store):
    """A file for another model (or key) under this key's name is refused, never used as this key's state."""
    store = make_store(memory_bytes=0)
    other = StateKey("d" * 64, "", "r1")
    store.put_state(other, random_state(), background=False)
    os.makedirs(blob_path(store, key("r1")).parent, exist_ok=True)
    os.replace(blob_path(store, other), blob_path(store, key("r1")))
    store.close()
    store = make_store(memory_bytes=0)
    assert store.get_state(key("r1"), CFG) is None
    assert not blob_path(store, key("r1")).exists() and store.stats().corrupt == 1


def test_other_shapes_are_a_miss(make_store):
    store = make_store()
    store.put_state(key("r1"), random_state(), background=False)
    bigger = type(CFG)(**{**vars(CFG), "n_layer": 3})
    assert store.get_state(key("r1"), bigger) is None


def test_records_round_trip_restart_and_delete(make_store):
    store = make_store()
    record = {"response": {"id": "resp_1", "output": []}, "input_items": [{"type": "message"}], "state": "k"}
    store.put_record(key("resp_1"), record)
    got = store.get_record(key("resp_1"))
    assert got == record
    got["response"]["id"] = "changed"                             # a copy
    assert store.get_record(key("resp_1")) == record
    store.close()
    store = make_store()
    assert store.get_record(key("resp_1")) == record
    store.delete_record(key("resp_1"))
    assert store.get_record(key("resp_1")) is None
    assert not blob_path(store, key("resp_1"), KIND_RECORD).exists()


def test_record_and_state_with_one_key_do_not_collide(make_store):
    store = make_store()
    store.put_state(key("resp_1"), random_state(), background=False)
    store.put_record(key("resp_1"), {"a": 1})
    assert store.get_record(key("resp_1")) == {"a": 1} and store.get_state(key("resp_1"), CFG) is not None
    store.delete_state(key("resp_1"))
    assert store.get_state(key("resp_1"), CFG) is None and store.get_record(key("resp_1")) == {"a": 1}


def test_delete_wins_over_a_queued_write(make_store):
    store = make_store()
    gate = threading.Event()
    store.writer.submit(gate.wait, 0)             # hold the writer so the next write stays queued
    store.put_state(key("r1"), random_state())
    assert store.get_state(key("r1"), CFG) is not None
    store.delete_state(key("r1"))
    assert store.get_state(key("r1"), CFG) is None
    gate.set()
    assert store.flush(10)
    assert store.get_state(key("r1"), CFG) is None and not blob_path(store, key("r1")).exists()


def test_newer_synchronous_write_is_not_overwritten_by_an_older_queued_one(make_store):
    store = make_store()
    gate = threading.Event()
    store.writer.submit(gate.wait, 0)
    store.put_state(key("r1"), random_state(seed=1))
    store.put_state(key("r1"), random_state(seed=2), background=False)
    gate.set()
    assert store.flush(10)
    store.close()
    assert same(make_store(memory_bytes=0).get_state(key("r1"), CFG), random_state(seed=2))


def test_full_write_queue_drops_and_counts(make_store):
    size = random_state().nbytes
    store = make_store(write_queue_bytes=size)
    gate = threading.Event()
    store.writer.submit(gate.wait, 0)
    store.put_state(key("a"), random_state())     # fits the queue
    store.put_state(key("b"), random_state())     # dropped: the queue already holds its budget
    assert store.get_state(key("b"), CFG) is None
    gate.set()
    assert store.flush(10)
    assert store.stats().writer.dropped == 1 and store.get_state(key("a"), CFG) is not None


def test_stale_temporary_files_are_removed_at_start(make_store, tmp_path):
    store = make_store()
    stale = store.disk.root / "tmp" / "x.tmp"
    fresh = store.disk.root / "tmp" / "y.tmp"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    os.utime(stale, (time.time() - 7200,) * 2)
    store.close()
    make_store()
    assert not stale.exists() and fresh.exists()


def test_config_checks():
    with pytest.raises(ValueError, match="memory_bytes"):
        StoreConfig(memory_bytes=-1)
    with pytest.raises(ValueError, match="redis_url"):
        StoreConfig(redis_url="http://localhost:6379")


def test_a_write_too_big_for_a_tier_removes_the_older_version(make_store):
    size = len(encode_state(key("x"), random_state(), created=time.time())) + 50
    store = make_store(memory_bytes=2 * size, disk_bytes=2 * size)
    store.put_state(key("r1"), random_state(), background=False)
    big = type(CFG)(**{**vars(CFG), "n_layer": 6})
    store.put_state(key("r1"), RNNState.zeros(big, 1), background=False)     # fits neither tier
    assert store.get_state(key("r1"), CFG) is None and not blob_path(store, key("r1")).exists()


def test_a_failed_background_write_is_logged_and_forgotten(make_store, monkeypatch, caplog):
    store = make_store()

    def broken(*args, **kwargs):
        raise RuntimeError("encoder broke")
    monkeypatch.setattr(store_mod, "encode_state", broken)
    store.put_state(key("r1"), random_state())
    assert store.flush(10)
    assert store.stats().pending == 0 and store.stats().writer.failed == 1
    assert store.get_state(key("r1"), CFG) is None and "background write failed" in caplog.text
