"""A long conversation: time to first token per turn, chained by previous_response_id against resending the whole
history with the cache off; bytes per stored state; time to load a state from disk and from Redis.

    goose bench conversation [--turns 50] [--new-tokens 40] [--max-output-tokens 40] [--config config.yaml]

Both runs stream /v1/responses from a `goose serve` process on a loopback port: "chained" sends
only the new user message with previous_response_id (store on, prefix cache on); "resend" sends every message so
far with store=false to a server whose prefix cache and state store are off, as a client of a stateless server
does. TTFT is from sending the request to its first response.output_text.delta event.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.state_store import start_redis
from engine import StateKey, StateStore, StoreConfig, TokenPrefix

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("it is a truth universally acknowledged that a single man in possession of a good fortune must be in want "
         "of a wife however little known the feelings or views of such a man may be on his first entering a "
         "neighbourhood this truth is so well fixed in the minds of the surrounding families").split()


def user_message(tokenizer, turn: int, tokens: int) -> str:
    """About ``tokens`` tokens of Austen-like words, different every turn."""
    words, i = [], turn * 7
    while len(tokenizer.encode(" ".join(words), allow_special=False)) < tokens:
        words.append(WORDS[i % len(WORDS)])
        i += 3
    return " ".join(words).capitalize() + "?"


async def ttft(http: httpx.AsyncClient, body: dict) -> tuple[float, dict]:
    """(seconds to the first output text delta, the final response)."""
    t0 = time.perf_counter()
    first, final = None, None
    async with http.stream("POST", "/v1/responses", json={**body, "stream": True}) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{resp.status_code}: {(await resp.aread()).decode()[:500]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if first is None and event["type"] in ("response.output_text.delta", "response.completed",
                                                   "response.incomplete"):
                first = time.perf_counter() - t0
            if event["type"] in ("response.completed", "response.incomplete", "response.failed"):
                final = event["response"]
    return first, final


class Server:
    """`goose serve` in a subprocess on a free loopback port (real sockets: streamed events arrive as sent)."""

    def __init__(self, config: str, sets: list[str]):
        import socket
        import subprocess
        import sys
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        args = [sys.executable, "-m", "goose.cli", "serve", "--config", config, "--port", str(self.port)]
        for item in sets:
            args += ["--set", item]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{self.port}"
        for _ in range(1200):
            try:
                if httpx.get(f"{self.base}/ready", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"goose serve exited with {self.proc.returncode}")
            time.sleep(0.1)
        raise RuntimeError("goose serve did not become ready")

    def stop(self) -> None:
        import signal
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


async def conversation(server: Server, tokenizer, model: str, turns: int, new_tokens: int, max_output: int, *,
                       chained: bool) -> list[dict]:
    rows, items, prev = [], [], None
    async with httpx.AsyncClient(base_url=server.base, timeout=600) as http:
        warm = None                        # warm up: first calls of kernels, allocator, tokenizer, store
        for i in range(6):
            body = {"model": model, "input": user_message(tokenizer, 100 + i, new_tokens),
                    "max_output_tokens": max_output, "store": chained}
            _, final = await ttft(http, {**body, "previous_response_id": warm} if chained else body)
            warm = final["id"]
        for turn in range(turns):
            text = user_message(tokenizer, turn, new_tokens)
            items.append({"role": "user", "content": text})
            body = {"model": model, "max_output_tokens": max_output, "temperature": 0.7, "seed": turn}
            if chained:
                body.update(input=text, previous_response_id=prev)
            else:
                body.update(input=items, store=False)
            seconds, final = await ttft(http, body)
            usage = final["usage"]
            out = "".join(c["text"] for o in final["output"] if o["type"] == "message" for c in o["content"])
            items.append({"role": "assistant", "content": out})
            prev = final["id"]
            rows.append({"turn": turn + 1, "ttft_ms": 1000 * seconds, "input_tokens": usage["input_tokens"],
                         "cached_tokens": usage["input_tokens_details"]["cached_tokens"],
                         "output_tokens": usage["output_tokens"]})
    return rows


def run(config: str, sets: list[str], *args, **kw) -> list[dict]:
    server = Server(config, sets)
    try:
        return asyncio.run(conversation(server, *args, **kw))
    finally:
        server.stop()


def load_times(engine_config, state, reps: int = 20) -> dict:
    """Milliseconds to load one conversation state (the store's get_state: read and checked decode) from a disk
    tier and from a Redis tier, and its stored bytes."""
    key = StateKey("b" * 64, "", TokenPrefix().extend([1, 2, 3]).digest)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_redis(tmp) if shutil.which("redis-server") else (None, None)
        try:
            tiers = {"disk": StoreConfig(memory_bytes=0, disk_dir=str(Path(tmp) / "d"))}
            if url:
                tiers["redis"] = StoreConfig(memory_bytes=0, redis_url=url)
            for name, cfg in tiers.items():
                with StateStore(cfg) as store:
                    store.put_state(key, state, background=False)
                    times = []
                    for _ in range(reps):
                        t = time.perf_counter()
                        assert store.get_state(key, engine_config) is not None
                        times.append(time.perf_counter() - t)
                    out[f"{name}_load_ms"] = round(1000 * statistics.median(times), 3)
                    if name == "disk":
                        out["stored_bytes"] = sum(p.stat().st_size for p in (Path(tmp) / "d").glob("*/*.gst"))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(5)
    return out


def mean(rows, turns) -> float:
    return statistics.mean(r["ttft_ms"] for r in rows if r["turn"] in turns)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="goose bench conversation", description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=50)
    ap.add_argument("--new-tokens", type=int, default=40, help="tokens of each user message (about)")
    ap.add_argument("--max-output-tokens", type=int, default=40)
    ap.add_argument("--config", default=str(ROOT / "config.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a setting for both servers (goose serve --set); repeatable")
    ap.add_argument("--json", action="store_true", help="print every turn as JSON lines too")
    args = ap.parse_args(argv)
    from server.serve import load_engine
    from server.settings import load_settings
    settings = load_settings(args.config)
    engine, info = load_engine(settings)
    shape = (args.turns, args.new_tokens, args.max_output_tokens)
    chained = run(args.config, args.set, engine.tokenizer, info.name, *shape, chained=True)
    resend = run(args.config, args.set + ["engine.prefix_cache_bytes=0", "states.memory_bytes=0", "states.disk_dir=''",
                               "states.redis_url=''"], engine.tokenizer, info.name, *shape, chained=False)
    if args.json:
        for a, b in zip(chained, resend):
            print(json.dumps({"chained": a, "resend": b}))
    n = args.turns
    first, last = range(1, 6), range(max(1, n - 4), n + 1)
    print("| turn | history tokens | TTFT chained (ms) | cached tokens | TTFT resend, cache off (ms) |")
    print("|---|---|---|---|---|")
    for a, b in zip(chained, resend):
        if a["turn"] in (1, 2, 5, 10, 20, 30, 40, n) or a["turn"] % 10 == 0:
            print(f"| {a['turn']} | {b['input_tokens']} | {a['ttft_ms']:.1f} | {a['cached_tokens']} | "
                  f"{b['ttft_ms']:.1f} |")
    ca, cb = mean(chained, first), mean(chained, last)
    ra, rb = mean(resend, first), mean(resend, last)
    print(f"\nmean TTFT turns {first.start}-{first.stop - 1} -> {last.start}-{last.stop - 1}: chained {ca:.1f} -> "
          f"{cb:.1f} ms ({100 * (cb / ca - 1):+.0f}%), resend {ra:.1f} -> {rb:.1f} ms ({100 * (rb / ra - 1):+.0f}%)")
    state = engine.model.zero_state(1)
    for t in state.tensors():
        t.normal_()
    times = load_times(engine.model.config, state)
    print(f"state: {engine.model.config.state_bytes} bytes of tensors, {times['stored_bytes']} stored; load from "
          f"disk {times['disk_load_ms']} ms" + (f", from Redis {times['redis_load_ms']} ms" if "redis_load_ms" in times
                                                else " (no redis-server for the Redis load)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
