"""Stored states: bytes per state, and milliseconds to store and to load one per tier, for real model shapes.

    python -m bench.state_store [--shapes default,0.1B,1.5B,7.2B] [--reps 5] [--dir /tmp] [--redis-url URL]

put = encode (copy + CRC) and write that tier; get = read that tier and decode (CRC checked except in
memory). snapshot = what put_state(background=True) costs the caller. Disk is timed with and without fsync;
Redis only with --redis-url, or when redis-server is installed (a throwaway server on a free port).
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import tempfile
import time

import torch

from engine.config import ModelConfig
from engine.model.state import RNNState
from engine.states import StateKey, StateStore, StoreConfig, decode_state, encode_state

SHAPES = {   # (n_layer, n_embd); head size 64
    "default": (4, 192), "0.1B": (12, 768), "0.4B": (24, 1024), "1.5B": (24, 2048), "2.9B": (32, 2560),
    "7.2B": (32, 4096),
}


def config(name: str) -> ModelConfig:
    L, C = SHAPES[name]
    return ModelConfig(n_layer=L, n_embd=C, n_head=C // 64, head_size=64, vocab_size=65536, dim_ffn=4 * C,
                       decay_lora=64, iclr_lora=64, value_lora=32, gate_lora=128)


def ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(1000 * statistics.median(times), 3)


def tier_times(store: StateStore, tier, cfg: ModelConfig, state: RNNState, reps: int) -> dict:
    key = StateKey("b" * 64, "", "bench")
    digest = key.digest(1)
    verify = tier is not store.memory
    put = ms(lambda: tier.put(digest, encode_state(key, state, created=time.time()), 3600), reps)
    get = ms(lambda: decode_state(tier.get(digest), key, cfg, verify=verify), reps)
    return {"put_ms": put, "get_ms": get}


def start_redis(tmp: str):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", tmp, "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis
    client = redis.Redis(port=port)
    for _ in range(500):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.02)
    client.close()
    return proc, f"redis://127.0.0.1:{port}/0"


def run(shapes: list[str], reps: int, root: str, redis_url: str | None) -> list[dict]:
    rows = []
    for name in shapes:
        cfg = config(name)
        state = RNNState.zeros(cfg, 1)
        for t in state.tensors():
            t.normal_()
        key = StateKey("b" * 64, "", "bench")
        blob = encode_state(key, state, created=0)
        row = {"shape": name, "state_bytes": cfg.state_bytes, "blob_bytes": len(blob),
               "encode_ms": ms(lambda: encode_state(key, state, created=0), reps),
               "decode_ms": ms(lambda: decode_state(blob, key, cfg), reps),
               "snapshot_ms": ms(lambda: state.clone(), reps)}
        for fsync in (True, False):
            d = tempfile.mkdtemp(dir=root)
            with StateStore(StoreConfig(memory_bytes=1 << 30, disk_dir=d, disk_bytes=1 << 34, redis_url=redis_url,
                                        fsync=fsync)) as store:
                if fsync:
                    row["memory"] = tier_times(store, store.memory, cfg, state, reps)
                    if store.redis is not None:
                        row["redis"] = tier_times(store, store.redis, cfg, state, reps)
                row["disk_fsync" if fsync else "disk_nofsync"] = tier_times(store, store.disk, cfg, state, reps)
            shutil.rmtree(d)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.state_store", description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="default,0.1B,1.5B,7.2B")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the disk tier writes (its filesystem)")
    ap.add_argument("--redis-url", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    proc = None
    url = args.redis_url
    with tempfile.TemporaryDirectory() as tmp:
        if url is None and shutil.which("redis-server"):
            proc, url = start_redis(tmp)
        try:
            run(args.shapes.split(","), args.reps, args.dir, url)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
