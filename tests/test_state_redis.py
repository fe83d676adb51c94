"""StateStore's Redis tier against a real redis-server: round trips, replicas sharing states, TTLs, outages."""
import shutil
import socket
import subprocess
import time

import pytest

from engine.states import StateKey, StateStore, StoreConfig
from engine.states.codec import KIND_STATE
from tests.test_state_codec import CFG, random_state, same

redis = pytest.importorskip("redis", reason="redis-py is not installed (pip install -e '.[test]')")
pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server is not installed (Debian: apt-get install redis-server)")
MODEL = "e" * 64


def key(name: str) -> StateKey:
    return StateKey(MODEL, "", name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A throwaway redis-server on a free loopback port, persisting nothing."""

    def __init__(self, tmp_path, port: int | None = None):
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.client.ping():
                    return
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.02)

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def server(tmp_path):
    srv = RedisServer(tmp_path)
    yield srv
    srv.stop()


@pytest.fixture
def make_store(tmp_path):
    stores = []

    def make(url, **kw):
        store = StateStore(StoreConfig(redis_url=url, redis_prefix="t:", **kw))
        stores.append(store)
        return store
    yield make
    for s in stores:
        s.close()


def test_redis_round_trip_with_ttl(server, make_store):
    store = make_store(server.url, memory_bytes=0, ttl_s=3600)
    s = random_state(seed=5)
    store.put_state(key("r1"), s, background=False)
    store.put_record(key("r1"), {"id": "resp_1"})
    name = "t:" + key("r1").digest(KIND_STATE)
    assert server.client.exists(name) and 3500 < server.client.ttl(name) <= 3600
    assert same(store.get_state(key("r1"), CFG), s) and store.get_record(key("r1")) == {"id": "resp_1"}
    assert store.get_state(key("r2"), CFG) is None
    st = store.stats().tiers["redis"]
    assert (st.hits, st.misses, st.writes, st.errors) == (2, 1, 2, 0) and st.entries is None
    store.delete_state(key("r1"))
    assert not server.client.exists(name) and store.get_state(key("r1"), CFG) is None


def test_no_ttl_means_no_expiry(server, make_store):
    store = make_store(server.url, ttl_s=0)
    store.put_state(key("r1"), random_state(), background=False)
    assert server.client.ttl("t:" + key("r1").digest(KIND_STATE)) == -1


def test_two_replicas_share_states_and_records(server, make_store, tmp_path):
    a = make_store(server.url, disk_dir=str(tmp_path / "a"))
    b = make_store(server.url, disk_dir=str(tmp_path / "b"))
    s = random_state(seed=6)
    a.put_state(key("resp_1"), s)                         # background, as the engine does
    a.put_record(key("resp_1"), {"id": "resp_1", "state": "resp_1"})
    assert a.flush(10)
    assert same(b.get_state(key("resp_1"), CFG), s) and b.get_record(key("resp_1"))["state"] == "resp_1"
    tiers = b.stats().tiers                               # records are read from Redis alone
    assert (tiers["memory"].misses, tiers["disk"].misses, tiers["redis"].hits) == (1, 1, 2)
    assert b.flush(10)                                    # the state hit is copied into b's faster tiers
    assert b.stats().tiers["disk"].entries == 1 and b.stats().tiers["memory"].entries == 1
    b.delete_state(key("resp_1"))                         # a delete reaches the shared tier
    assert a.redis.get(key("resp_1").digest(KIND_STATE)) is None
    b.delete_record(key("resp_1"))                        # and no replica keeps a record another deleted
    assert a.get_record(key("resp_1")) is None


def test_corrupt_redis_value_is_a_miss_and_deleted(server, make_store):
    store = make_store(server.url, memory_bytes=0)
    store.put_state(key("r1"), random_state(), background=False)
    name = "t:" + key("r1").digest(KIND_STATE)
    server.client.set(name, server.client.get(name)[:-3])
    assert store.get_state(key("r1"), CFG) is None and not server.client.exists(name)
    assert store.stats().corrupt == 1


def test_redis_down_means_misses_never_exceptions(make_store, tmp_path):
    store = make_store(f"redis://127.0.0.1:{free_port()}/0", disk_dir=str(tmp_path / "d"), redis_retry_s=60)
    s = random_state()
    store.put_state(key("r1"), s, background=False)      # memory and disk still work
    store.put_record(key("r1"), {"a": 1})
    assert same(store.get_state(key("r1"), CFG), s)
    assert store.get_state(key("nope"), CFG) is None and store.get_record(key("nope")) is None
    store.delete_state(key("r1"))
    st = store.stats().tiers["redis"]
    assert st.errors == 1                                 # then skipped for redis_retry_s: no timeout per call
    assert st.misses == 2 and st.hits == 0


def test_redis_going_away_and_coming_back(server, make_store, tmp_path):
    store = make_store(server.url, memory_bytes=0, redis_retry_s=0)
    store.put_state(key("r1"), random_state(seed=7), background=False)
    server.stop()
    t = time.monotonic()
    assert store.get_state(key("r1"), CFG) is None        # down: a miss, quickly
    store.put_state(key("r2"), random_state())            # and a write that goes nowhere
    assert store.flush(10)
    assert time.monotonic() - t < 5 and store.stats().tiers["redis"].errors >= 2
    again = RedisServer(tmp_path, port=server.port)       # back (empty: it persists nothing)
    try:
        store.put_state(key("r3"), random_state(seed=8), background=False)
        assert same(store.get_state(key("r3"), CFG), random_state(seed=8))
    finally:
        again.stop()
