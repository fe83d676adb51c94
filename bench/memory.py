"""Constant memory: peak RSS and decode time per token after 1k, 16k and 128k tokens of context; a 2.9B model's
memory under the float and quantized strategies.

    python -m bench.memory [--contexts 1024,16384,131072] [--decode 256] [--dtype fp32]
    python -m bench.memory --shape 2.9b [--checkpoint PATH] [--strategies "cpu bf16,cpu bf16i8,cpu bf16i4"]
                           [--prequantized i8,i4]

Each context length runs in its own process (peak RSS is per process): prefill the context into one
sequence in 512-token chunks (as the engine does), then decode 256 more tokens one at a time.
An RNN's state does not grow, so both columns must stay flat. The official rwkv package's decode time per
token is measured at the shorter contexts as the reference (its prompt loop is too slow for 128k).

--shape 2.9b writes a random 2.9B-shaped checkpoint (L32 C2560 N64 V65536, official key names) once, in bf16,
streamed tensor by tensor (~5.7 GB; kept at --checkpoint for the next run), then loads it under each strategy in
a fresh process: the peak RSS of loading, the steady RSS after a few decoded tokens (split into anonymous memory
and pages of the mapped checkpoint), the weights' own bytes, and the decode time per token. --prequantized adds
rows for the same model converted once by `goose convert --dtype i8|i4` (kept beside it), loaded as cpu bf16iN.
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


DEFAULT_2B9 = os.path.join(os.path.expanduser("~"), ".cache", "goose", "bench", "rwkv7-2b9-random-bf16.safetensors")


def _rss_mib() -> dict:
    """The process's resident memory now, in MiB: all of it, anonymous (heap) and file-backed (mapped files)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) / 1024
    return fields


def _child_strategy(path: str, strategy: str, decode: int) -> dict:
    import torch

    from bench.engine import weight_bytes_per_token
    from engine import load_model
    from engine.model.allocator import tune_malloc
    tune_malloc()
    t0 = time.perf_counter()
    model = load_model(path, strategy)
    out = {"strategy": strategy, "load_s": time.perf_counter() - t0,
           "load_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "weights_mib": weight_bytes_per_token(model) / 2**20 + (model.emb.nbytes - model.emb[0].nbytes) / 2**20}
    logits, state = model.forward(torch.tensor([[(i * 7919) % model.config.vocab_size for i in range(16)]]), None)
    tok = int(logits.argmax())
    times = []
    for _ in range(decode):
        t = time.perf_counter()
        logits, state = model.forward(torch.tensor([[tok]]), state)
        tok = int(logits.argmax())
        times.append(time.perf_counter() - t)
    out["ms_per_token"] = 1e3 * sorted(times)[len(times) // 2]
    out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["steady"] = _rss_mib()
    return out


def ensure_2b9(path: str) -> str:
    """The random 2.9B-shaped bf16 checkpoint at path, written (streamed) unless a complete one is there."""
    from bench.random_checkpoint import SHAPE_2B9, write_checkpoint
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".partial-{os.getpid()}-{os.path.basename(path)}")
    print(f"writing a random 2.9B-shaped bf16 checkpoint to {path} (once; ~5.7 GB) ...", file=sys.stderr)
    import torch
    t0 = time.perf_counter()
    try:
        write_checkpoint(tmp, SHAPE_2B9, seed=0, dtype=torch.bfloat16)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"  written in {time.perf_counter() - t0:.0f} s, peak RSS of the writer "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB", file=sys.stderr)
    return path


def ensure_prequantized(path: str, kind: str) -> str:
    """The checkpoint at path converted by goose convert --dtype kind, kept beside it (written once)."""
    from engine.formats.convert import convert
    out = path.replace(".safetensors", f"-{kind}.safetensors")
    if not os.path.exists(out):
        t0 = time.perf_counter()
        convert(path, out, dtype=kind, progress=False, note=lambda text: None)
        print(f"  goose convert --dtype {kind}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def main_2b9(args) -> int:
    from bench.machine import machine_line
    path = ensure_2b9(args.checkpoint)
    runs = [(path, s.strip(), s.strip()) for s in args.strategies.split(",") if s.strip()]
    for kind in (k.strip() for k in args.prequantized.split(",") if k.strip()):
        runs.append((ensure_prequantized(path, kind), f"cpu bf16{kind}", f"cpu bf16{kind}, {kind} file"))
    rows = []
    for file, strategy, label in runs:
        print(f"{label} ...", file=sys.stderr)
        res = subprocess.run([sys.executable, "-m", "bench.memory", "--decode", str(args.decode),
                              "--child-strategy", f"{file}|{strategy}"], capture_output=True, text=True)
        if res.returncode:
            print(f"{label} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append({**json.loads(res.stdout.strip().splitlines()[-1]), "strategy": label})
    print(f"\nmachine: {machine_line()}")
    print(f"model: random RWKV-7 2.9B shape (L32 C2560 N64 V65536), {path} "
          f"({os.path.getsize(path) / 2**30:.2f} GiB, bf16); each strategy in a fresh process; "
          f"decode: median of {args.decode} tokens after a 16-token prompt\n")
    print("| strategy | weights MiB | load s | peak RSS MiB (load) | peak RSS MiB (load + decode) | steady RSS MiB | "
          "anonymous | mapped file | decode ms/token |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        st = r["steady"]
        print(f"| {r['strategy']} | {r['weights_mib']:.0f} | {r['load_s']:.1f} | {r['load_peak_mib']:.0f} | "
              f"{r['peak_mib']:.0f} | {st.get('VmRSS', 0):.0f} | {st.get('RssAnon', 0):.0f} | "
              f"{st.get('RssFile', 0):.0f} | {r['ms_per_token']:.0f} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="goose bench memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="1024,16384,131072")
    ap.add_argument("--decode", type=int, default=None, help="decoded tokens (default 256; 5 for --shape 2.9b)")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--reference-up-to", type=int, default=16384,
                    help="measure the rwkv package's decode time for contexts up to this length")
    ap.add_argument("--shape", choices=("0.1b", "2.9b"), default="0.1b",
                    help="0.1b: the context-length table; 2.9b: memory and decode time per strategy")
    ap.add_argument("--checkpoint", default=DEFAULT_2B9, help="--shape 2.9b: where the random checkpoint is kept "
                    "(written there the first time)")
    ap.add_argument("--strategies", default="cpu bf16,cpu bf16i8,cpu bf16i4", help="--shape 2.9b: strategies")
    ap.add_argument("--prequantized", default="", help="--shape 2.9b: also load goose convert --dtype i8/i4 files "
                    "of the model (e.g. i8,i4)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-strategy", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_strategy:
        path, strategy = args.child_strategy.split("|")
        print(json.dumps(_child_strategy(path, strategy, args.decode)))
        return 0
    if args.shape == "2.9b":
        args.decode = args.decode or 5
        return main_2b9(args)
    args.decode = args.decode or 256
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
