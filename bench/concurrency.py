"""Concurrency benchmark: aggregate tokens/s and time-to-first-token of the AsyncEngine at 1..128 concurrent
generations (temperature-1 sampling, seeded), and TTFT with a cached 2,000-token prefix vs a cold one; the
official rwkv package's single-stream decode is measured in the same run as the yardstick.

    python -m bench.concurrency [--dtypes fp32,bf16] [--levels 1,8,32,64,128] [--tokens 128]

Two aggregates per level: end to end (every generated token over the wall time from submitting all requests,
so it includes prefilling every prompt), and decode (tokens delivered after the last stream got its first
token, over the time from then to the last token: the steady state with every stream decoding).
Targets: aggregate at 64 >= 20x the reference single stream (fp32), higher on bf16; cached TTFT <= 1/10 cold.
Structured outputs (cpu fp32): 64 streams under one JSON schema against 64 free ones; the masks' share of a decode
step (target <= 10%) and the time to compile a typical schema.
Model loading and the reference run on threads that exit (engine/model/threads.py), as `goose serve` does.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("RWKV_V7_ON", "1")
os.environ.setdefault("RWKV_JIT_ON", "1")
os.environ.setdefault("RWKV_CUDA_ON", "0")

from bench.engine import bench_reference  # noqa: E402
from bench.machine import machine_line  # noqa: E402
from engine import (AsyncEngine, EngineConfig, GenerateRequest, JsonSchema, SamplingParams, load_model,  # noqa: E402
                    load_tokenizer)
from bench.random_checkpoint import SHAPE_0B1, write_checkpoint  # noqa: E402
from engine.model.allocator import tune_malloc  # noqa: E402
from engine.model.threads import call_in_new_thread  # noqa: E402


def _prompt(n: int, seed: int) -> list[int]:
    return [(seed * 7919 + i * 104729) % 65000 + 1 for i in range(n)]


async def _one(eng, req, t_submit, ttfts, stamps=None):
    first = None
    count = 0
    async for out in eng.generate(req):
        n = sum(len(o.token_ids) for o in out.outputs)
        now = time.perf_counter()
        if n and first is None:
            first = now
            ttfts.append(first - t_submit)
        if n and stamps is not None:
            stamps.append((now, n))
        count += n
    return count


async def _level(model, tok, concurrency: int, tokens: int, prompt_len: int,
                 constraint=None) -> tuple[float, float, float]:
    """(end-to-end tokens/s, decode tokens/s, median TTFT) for ``concurrency`` simultaneous requests (each under
    ``constraint`` when one is given)."""
    eng = AsyncEngine(model, tok, EngineConfig(max_sessions=max(concurrency, 1), max_waiting=1024,
                                               step_token_budget=max(1024, concurrency), prefill_chunk=512,
                                               prefix_cache_bytes=0))
    eng.start()
    try:
        ttfts: list[float] = []
        stamps: list[list[tuple[float, int]]] = [[] for _ in range(concurrency)]
        params = SamplingParams(max_tokens=tokens, temperature=1.0, ignore_eos=constraint is None)   # plain sampling
        if constraint is not None:
            await asyncio.to_thread(eng.compile, constraint)        # the vocabulary and grammar, built once
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(
            _one(eng, GenerateRequest(_prompt(prompt_len, i), SamplingParams(**{**params.__dict__, "seed": i}),
                                      constraint=constraint), t0, ttfts, stamps[i]) for i in range(concurrency)))
        wall = time.perf_counter() - t0
        all_started = max(s[0][0] for s in stamps)
        end = max(s[-1][0] for s in stamps)
        after = sum(n for s in stamps for t, n in s if t > all_started)
        decode = after / (end - all_started) if end > all_started else float("nan")
        return sum(counts) / wall, decode, statistics.median(ttfts)
    finally:
        await eng.stop(1)


# 40 people, each a short name and an age: strings (wide masks) and numbers (narrow ones), and no end in reach,
# so every stream decodes for the whole window like the free ones.
PEOPLE = {"type": "object", "properties": {"people": {
    "type": "array", "minItems": 40, "maxItems": 40, "items": {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                         "age": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["name", "age"], "additionalProperties": False}}},
    "required": ["people"], "additionalProperties": False}


def _compile_times(model, tok) -> tuple[float, float, float]:
    """(grammar vocabulary build, a typical schema cold, the same schema cached) in seconds."""
    from bench.structured import TYPICAL
    from engine import GrammarCompiler
    t0 = time.perf_counter()
    compiler = GrammarCompiler(tok, vocab_size=model.config.vocab_size)
    t1 = time.perf_counter()
    compiler.compile(JsonSchema.of(TYPICAL, "bench"))
    t2 = time.perf_counter()
    compiler.compile(JsonSchema.of(TYPICAL, "bench"))
    return t1 - t0, t2 - t1, time.perf_counter() - t2


async def _cached_ttft(model, tok, prefix_len: int) -> tuple[float, float]:
    """TTFT of (prefix + a short question): cold, then with the prefix already cached."""
    prefix = _prompt(prefix_len, 99)
    question = _prompt(16, 7)
    result = []
    for cache in (0, 1 << 30):
        eng = AsyncEngine(model, tok, EngineConfig(max_sessions=4, prefix_cache_bytes=cache, prefill_chunk=512))
        eng.start()
        try:
            if cache:
                await _one(eng, GenerateRequest(prefix, SamplingParams(max_tokens=1)), time.perf_counter(), [])
            ttfts: list[float] = []
            await _one(eng, GenerateRequest(prefix + question, SamplingParams(max_tokens=1)), time.perf_counter(),
                       ttfts)
            result.append(ttfts[0])
        finally:
            await eng.stop(1)
    return result[0], result[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="goose bench concurrency", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--levels", default="1,8,32,64,128")
    ap.add_argument("--tokens", type=int, default=128, help="tokens generated per request (long enough for a "
                    "steady decode window)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per request")
    ap.add_argument("--prefix", type=int, default=2000, help="cached prefix length for the TTFT comparison")
    ap.add_argument("--structured", type=int, default=64, help="streams of the structured-output run (cpu fp32: "
                    "all under one JSON schema vs as many free ones; 0 skips it)")
    args = ap.parse_args(argv)
    tune_malloc()                                   # as goose serve does (engine/model/allocator.py)
    levels = [int(x) for x in args.levels.split(",")]
    tok = load_tokenizer("world")
    rows, kernels, structured = [], [], None
    with tempfile.TemporaryDirectory() as tmp:
        stem = os.path.join(tmp, "rwkv7-0b1-random")
        call_in_new_thread(write_checkpoint, stem + ".pth", SHAPE_0B1, seed=0)
        for dtype in args.dtypes.split(","):
            print(f"[cpu {dtype}] reference single stream ...", file=sys.stderr)
            ref = call_in_new_thread(bench_reference, stem, dtype, 16, 32, 2)["decode"]
            model = call_in_new_thread(load_model, stem + ".pth", f"cpu {dtype}")
            kernels.append(f"cpu {dtype}: linear {model.linear_backend}, decode {model.decode_kernel}")
            for c in levels:
                print(f"[cpu {dtype}] concurrency {c} ...", file=sys.stderr)
                tps, decode, ttft = asyncio.run(_level(model, tok, c, args.tokens, args.prompt))
                rows.append((dtype, f"{c} concurrent", ref, (tps, decode), ttft))
            cold, warm = asyncio.run(_cached_ttft(model, tok, args.prefix))
            rows.append((dtype, "ttft", cold, warm, None))
            if dtype == "fp32" and args.structured:
                print(f"[cpu {dtype}] structured outputs, {args.structured} streams ...", file=sys.stderr)
                schema = JsonSchema.of(PEOPLE, "bench")
                free = asyncio.run(_level(model, tok, args.structured, args.tokens, args.prompt))
                constrained = asyncio.run(_level(model, tok, args.structured, args.tokens, args.prompt, schema))
                structured = (free, constrained, call_in_new_thread(_compile_times, model, tok))
            del model
    print(f"\nmachine: {machine_line()}")
    print(f"model: random RWKV-7 0.1B shape (L12 C768 V65536); {args.prompt}-token prompts, {args.tokens} tokens each;"
          f" reference: rwkv 0.8.32 single-stream decode")
    print(f"goose kernels: {'; '.join(kernels)}\n")
    print("| strategy | load | reference tok/s | end-to-end tok/s | x reference | decode tok/s | x reference "
          "| TTFT p50 (s) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for dtype, what, ref, tps, ttft in rows:
        if what != "ttft":
            e2e, decode = tps
            print(f"| cpu {dtype} | {what} | {ref:.1f} | {e2e:.0f} | {e2e / ref:.1f}x | {decode:.0f} | "
                  f"{decode / ref:.1f}x | {ttft:.3f} |")
    print(f"\n| strategy | TTFT, {args.prefix}-token prefix + 16 new tokens: cold (s) | cached (s) | cached / cold |")
    print("|---|---:|---:|---:|")
    for dtype, what, cold, warm, _ in rows:
        if what == "ttft":
            print(f"| cpu {dtype} | {cold:.3f} | {warm:.3f} | {warm / cold:.3f} |")
    if structured:
        (f_e2e, f_dec, f_ttft), (c_e2e, c_dec, c_ttft), (vocab_s, cold_s, cached_s) = structured
        n = args.structured
        print(f"\n| cpu fp32, {n} streams | end-to-end tok/s | decode tok/s | decode step (ms) | TTFT p50 (s) |")
        print("|---|---:|---:|---:|---:|")
        print(f"| free | {f_e2e:.0f} | {f_dec:.0f} | {n / f_dec * 1e3:.1f} | {f_ttft:.3f} |")
        print(f"| one JSON schema | {c_e2e:.0f} | {c_dec:.0f} | {n / c_dec * 1e3:.1f} | {c_ttft:.3f} |")
        share = 1 - c_dec / f_dec
        print(f"\nmasks' share of a structured decode step: {share * 100:.1f}% (target <= 10%); compile: grammar "
              f"vocabulary {vocab_s * 1e3:.0f} ms once per model, a typical schema {cold_s * 1e3:.1f} ms cold, "
              f"{cached_s * 1e3:.3f} ms cached")
    return 0


if __name__ == "__main__":
    sys.exit(main())
