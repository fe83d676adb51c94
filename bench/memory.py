"""Constant memory: peak RSS and decode time per token after 1k, 16k and 128k tokens of context.

    python -m bench.memory [--contexts 1024,16384,131072] [--decode 256] [--dtype fp32]

Each context length runs in its own process (peak RSS is per process): prefill the context into one
sequence in 512-token chunks (as the engine does), then decode 256 more tokens one at a time.
An RNN's state does not grow, so both columns must stay flat. The official rwkv package's decode time per
token is measured at the shorter contexts as the reference (its prompt loop is too slow for 128k).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("RWKV_V7_ON", "1")
os.environ.setdefault("RWKV_JIT_ON", "1")
os.environ.setdefault("RWKV_CUDA_ON", "0")
CHUNK = 512


def _child(path: str, dtype: str, context: int, decode: int, reference: bool) -> dict:
    import torch

    from engine import load_model
    from engine.model.allocator import tune_malloc
    tune_malloc()                                   # as goose serve does
    model = load_model(path, f"cpu {dtype}")
    state = model.zero_state(1)
    ids = [(i * 7919) % 65000 + 1 for i in range(context)]
    t0 = time.perf_counter()
    for start in range(0, context, CHUNK):
        logits, state = model.forward(torch.tensor([ids[start:start + CHUNK]]), state)
    prefill_s = time.perf_counter() - t0
    tok = int(logits.argmax())
    t0 = time.perf_counter()
    for _ in range(decode):
        logits, state = model.forward(torch.tensor([[tok]]), state)
        tok = int(logits.argmax())
    per_token = (time.perf_counter() - t0) / decode
    out = {"context": context, "prefill_s": prefill_s, "ms_per_token": 1e3 * per_token,
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "state_mib": state.nbytes / 2**20}
    if reference:
        from rwkv.model import RWKV
        ref = RWKV(path[:-4], f"cpu {dtype}")
        st = None
        for start in range(0, context, CHUNK):
            _, st = ref.forward(ids[start:start + CHUNK], st)
        t0 = time.perf_counter()
        for i in range(32):
            _, st = ref.forward([100 + i], st)
        out["ref_ms_per_token"] = 1e3 * (time.perf_counter() - t0) / 32
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="goose bench memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="1024,16384,131072")
    ap.add_argument("--decode", type=int, default=256)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--reference-up-to", type=int, default=16384,
                    help="measure the rwkv package's decode time for contexts up to this length")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        path, context, ref = args.child.split("|")
        print(json.dumps(_child(path, args.dtype, int(context), args.decode, ref == "1")))
        return 0
    from bench.machine import machine_line
    from bench.random_checkpoint import SHAPE_0B1, write_checkpoint
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rwkv7-0b1-random.pth")
        write_checkpoint(path, SHAPE_0B1, seed=0)
        for context in (int(x) for x in args.contexts.split(",")):
            print(f"context {context} ...", file=sys.stderr)
            ref = "1" if context <= args.reference_up_to else "0"
            res = subprocess.run([sys.executable, "-m", "bench.memory", "--dtype", args.dtype, "--decode",
                                  str(args.decode), "--child", f"{path}|{context}|{ref}"],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(f"\nmachine: {machine_line()}")
    print(f"model: random RWKV-7 0.1B shape, cpu {args.dtype}; one sequence; state {rows[0]['state_mib']:.2f} MiB\n")
    print("| context tokens | prefill s | peak RSS MiB | vs first | decode ms/token | vs first | rwkv 0.8.32 ms/token |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    base = rows[0]
    for r in rows:
        ref = f"{r['ref_ms_per_token']:.1f}" if "ref_ms_per_token" in r else "(skipped)"
        print(f"| {r['context']} | {r['prefill_s']:.1f} | {r['peak_rss_mib']:.0f} | "
              f"{r['peak_rss_mib'] / base['peak_rss_mib']:.3f} | {r['ms_per_token']:.1f} | "
              f"{r['ms_per_token'] / base['ms_per_token']:.2f} | {ref} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
