"""Engine benchmark: Goose vs the official rwkv==0.8.32 package on one random 0.1B-shaped checkpoint, same run.

    python -m bench.engine [--dtypes fp32,bf16] [--prefill 1024] [--decode 32] [--batch 64]

Prints prefill tokens/s (T=1024), single-stream decode tokens/s, and Goose's batched decode (aggregate
tokens/s at B=64) with each figure's ratio to the reference. Targets: prefill >= 5x, single-stream decode
>= 1.0x, B=64 aggregate >= 20x the reference's single stream.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RWKV_V7_ON", "1")
os.environ.setdefault("RWKV_JIT_ON", "1")
os.environ.setdefault("RWKV_CUDA_ON", "0")

import torch  # noqa: E402

from engine import load_model  # noqa: E402
from engine.random_checkpoint import SHAPE_0B1, write_checkpoint  # noqa: E402


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    amx = "amx_bf16" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
    return (f"{cpu}, {os.cpu_count()} cores{' (AMX)' if amx else ''}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}")


def timed(fn, repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_reference(stem: str, dtype: str, T: int, n_decode: int, repeats: int) -> dict:
    from rwkv.model import RWKV
    model = RWKV(stem, f"cpu {dtype}")
    prompt = [(i * 7919) % 65536 for i in range(T)]
    prefill = timed(lambda: model.forward(prompt, None), repeats)
    _, state = model.forward(prompt[:8], None)

    def decode():
        nonlocal state
        for i in range(n_decode):
            _, state = model.forward([100 + i], state)
    return {"prefill": T / prefill, "decode": n_decode / timed(decode, repeats)}


def bench_goose(path: str, dtype: str, T: int, n_decode: int, batch: int, repeats: int) -> dict:
    model = load_model(path, f"cpu {dtype}")
    prompt = torch.tensor([[(i * 7919) % 65536 for i in range(T)]])
    prefill = timed(lambda: model.forward(prompt, None), repeats)
    results = {"prefill": T / prefill}
    for B, key in ((1, "decode"), (batch, "batched")):
        _, state = model.forward(prompt[:, :8].expand(B, 8).contiguous(), None)
        toks = torch.arange(B).view(B, 1) + 100
        steps = n_decode if B == 1 else max(4, n_decode // 4)

        def decode():
            for _ in range(steps):
                model.forward(toks, state)
        results[key] = B * steps / timed(decode, repeats)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="goose bench engine", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--prefill", type=int, default=1024, help="prompt length T for prefill")
    ap.add_argument("--decode", type=int, default=32, help="tokens per single-stream decode measurement")
    ap.add_argument("--batch", type=int, default=64, help="batch size of the batched decode")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        stem = os.path.join(tmp, "rwkv7-0b1-random")
        print(f"writing a random 0.1B-shaped checkpoint (L{SHAPE_0B1.n_layer} C{SHAPE_0B1.n_embd} "
              f"V{SHAPE_0B1.vocab_size}) ...", file=sys.stderr)
        write_checkpoint(stem + ".pth", SHAPE_0B1, seed=0)
        rows = []
        for dtype in args.dtypes.split(","):
            print(f"[cpu {dtype}] reference ...", file=sys.stderr)
            ref = bench_reference(stem, dtype, args.prefill, args.decode, args.repeats)
            print(f"[cpu {dtype}] goose ...", file=sys.stderr)
            ours = bench_goose(stem + ".pth", dtype, args.prefill, args.decode, args.batch, args.repeats)
            rows.append((dtype, ref, ours))
    print(f"\nmachine: {machine_line()}")
    print(f"model: random RWKV-7 0.1B shape (L12 C768 H12 N64 V65536); reference: rwkv 0.8.32 (RWKV_JIT_ON=1)\n")
    header = (f"| strategy | measure | rwkv 0.8.32 tok/s | goose tok/s | ratio | target |")
    print(header)
    print("|---|---|---:|---:|---:|---:|")
    for dtype, ref, ours in rows:
        s = f"cpu {dtype}"
        print(f"| {s} | prefill T={args.prefill} | {ref['prefill']:.0f} | {ours['prefill']:.0f} | "
              f"{ours['prefill'] / ref['prefill']:.2f}x | >= 5x |")
        print(f"| {s} | decode B=1 | {ref['decode']:.1f} | {ours['decode']:.1f} | "
              f"{ours['decode'] / ref['decode']:.2f}x | >= 1.0x |")
        print(f"| {s} | decode B={args.batch} aggregate | {ref['decode']:.1f} (B=1) | {ours['batched']:.0f} | "
              f"{ours['batched'] / ref['decode']:.1f}x | >= 20x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
