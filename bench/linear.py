"""Matrix-product benchmark: torch's matmul (F.linear) vs oneDNN's linear op (plain and with the weight
packed in oneDNN's layout, as the model loads it) for the shapes of the 0.1B model.

    python -m bench.linear [--dtypes fp32,bf16] [--repeats 20] [--no-quant]

Why engine/model/linear.py picks oneDNN for CPU fp32: prints ms and GFLOPS (GB/s of weight read for M=1) per shape
and backend, with the ratio oneDNN / F.linear. Weights are [out, in] like the model's; the head (65536 rows,
201 MB in fp32) never fits in cache, the smaller matrices may, so M=1 rows of those flatter both backends.

A second table compares the quantized products of the "fp32i8"/"bf16i8"/"fp32i4"/"bf16i4" strategies
(engine/model/quant.py) with the float product the float strategy uses, per shape of the 0.1B and 1.5B models and
M = 1, 4, 64, 1024: the native kernel, the weight dequantized per call into the float product (the path
quant.DENSE_ROWS picks for many rows), and torch's int8/int4 kernels (bf16 activations).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from bench.engine import timed
from bench.machine import machine_line
from engine.model import quant
from engine.model.linear import onednn_linear, onednn_pack, probe_onednn, select_linear

# (M, in, out): decode B=1 and B=64, prefill T=1024; r/k/v/output, FFN key and value, and the head
SHAPES = [(m, k, n) for m in (1, 64, 1024) for (k, n) in ((768, 768), (768, 3072), (3072, 768), (768, 65536))
          if not (m == 1024 and n == 65536)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="goose bench linear", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-quant", action="store_true", help="skip the quantized products' table")
    ap.add_argument("--quant-only", action="store_true", help="only the quantized products' table")
    ap.add_argument("--quant-models", default="0.1b,1.5b", help="shapes of the quantized table: 0.1b, 1.5b")
    ap.add_argument("--quant-rows", default=",".join(map(str, QUANT_ROWS)), help="M values of the quantized table")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: as configured)")
    ap.add_argument("--cpu-clock", action="store_true",
                    help="quantized table: time by this thread's CPU time (with --threads 1), which other processes "
                         "on a busy machine do not inflate")
    args = ap.parse_args(argv)
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_clock:
        if torch.get_num_threads() != 1:
            ap.error("--cpu-clock measures one thread: add --threads 1")
        CLOCK = time.thread_time
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    print(f"machine: {machine_line()}\n")
    if args.quant_only:
        quant_table([dtypes[name] for name in args.dtypes.split(",")], args.repeats, args.quant_models.split(","),
                    [int(m) for m in args.quant_rows.split(",")])
        return 0
    print("| dtype | M x in -> out | F.linear ms | oneDNN ms | oneDNN packed ms | F.linear GFLOPS | "
          "packed GFLOPS | packed speed-up |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for name in args.dtypes.split(","):
            dtype = dtypes[name]
            dense, packed = probe_onednn(dtype)
            if not (dense and packed):
                print(f"| {name} | oneDNN linear (or packing) not usable in this torch build | | | | | | |")
                continue
            for m, k, n in SHAPES:
                x = torch.randn(m, k, generator=g).to(dtype)
                w = torch.randn(n, k, generator=g).to(dtype)
                wp = onednn_pack(w)
                ta = timed(lambda: F.linear(x, w), args.repeats)
                to = timed(lambda: onednn_linear(x, w), args.repeats)
                tp = timed(lambda: onednn_linear(x, wp), args.repeats)
                flop = 2 * m * k * n
                print(f"| {name} | {m} x {k} -> {n} | {ta * 1e3:.3f} | {to * 1e3:.3f} | {tp * 1e3:.3f} | "
                      f"{flop / ta / 1e9:.0f} | {flop / tp / 1e9:.0f} | {ta / tp:.2f}x |")
    if not args.no_quant:
        quant_table([dtypes[name] for name in args.dtypes.split(",")], args.repeats, args.quant_models.split(","),
                    [int(m) for m in args.quant_rows.split(",")])
    return 0


# the quantized table: the 0.1B and 1.5B projections, FFN and head, decode B=1/4/64 and prefill T=1024
QUANT_SHAPES = {"0.1b": ((768, 768), (768, 3072), (3072, 768), (768, 65536)),
                "1.5b": ((2048, 2048), (2048, 8192), (8192, 2048), (2048, 65536))}
QUANT_ROWS = (1, 4, 64, 1024)


def _torch_int8(w: torch.Tensor):
    """torch's int8 layout (per-row bf16 scales) and its product, which takes bf16 rows."""
    s = (w.abs().amax(1) / 127).clamp(min=1e-12).to(torch.bfloat16)
    q = (w / s.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
    return lambda x: torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), q, s)


def _torch_int4(w: torch.Tensor, group: int):
    """torch's int4 layout (the codes' values do not matter for speed) and its product (bf16 rows)."""
    n, k = w.shape
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
    sz = torch.rand(k // group, n, 2).to(torch.bfloat16)
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, group, sz)


CLOCK = time.perf_counter      # --cpu-clock: time.thread_time (with --threads 1, all work is on this thread)


def fastest(fn, repeats: int) -> float:
    """Fastest seconds of ``repeats`` calls after one warm-up: on a shared machine the other processes only ever
    add time, and with two OpenMP threads a preempted one stalls the call by whole scheduler ticks."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = CLOCK()
        fn()
        best = min(best, CLOCK() - t0)
    return best


def quant_table(dtypes: list[torch.dtype], repeats: int, models=("0.1b", "1.5b"), rows=QUANT_ROWS) -> None:
    """ms per product, per shape and M: the float strategy's product; int8 and int4 through the native kernel, the
    weight dequantized into the float product, torch's weight-only ops (bf16 rows: fp32 rows are cast, as the
    strategies did before the native kernel); and what quant.quantized_product picks (quant.DENSE_ROWS)."""
    from kernels.quant_native import quant_matmul
    print(f"\n| activations | M x in -> out | float ms | int8 native | int8 dequantized | int8 torch (bf16 x) | "
          f"int4 native | int4 dequantized | int4 torch (bf16 x) | strategy int8 / float | strategy int4 / float | "
          f"int8 native GB/s (M=1) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(1)
    dense = onednn_linear if probe_onednn(torch.float32)[0] else F.linear
    with torch.inference_mode():
        for dtype in dtypes:
            lin = select_linear(torch.device("cpu"), dtype)
            for m in rows:
                for k, n in (shape for model in models for shape in QUANT_SHAPES[model]):
                    if m == 1024 and n == 65536:      # prefill applies the head to the last position only
                        continue
                    reps = max(3, repeats // (8 if m * n * k > 5e9 else 1))
                    x = torch.randn(m, k, generator=g).to(dtype)
                    w = torch.randn(n, k, generator=g)
                    wf = lin.prepare(w.to(dtype).contiguous())
                    times = {"float": fastest(lambda: lin.fn(x, wf), reps)}
                    for name, qw, torch_fn in (("int8", quant.quantize_int8(w), _torch_int8(w)),
                                               ("int4", quant.quantize_int4(w), _torch_int4(w, quant.GROUP_SIZE))):
                        times[name] = fastest(lambda: quant_matmul(x, *qw.parts()), reps)
                        times[name + " deq"] = fastest(lambda: dense(x.float(), qw.dequantize()).to(dtype), reps)
                        times[name + " torch"] = fastest(lambda: torch_fn(x).to(dtype), reps)
                        times[name + " pick"] = times[name + (" deq" if m > quant.DENSE_ROWS else "")]
                        del qw
                    ms = {key: f"{t * 1e3:.3f}" for key, t in times.items()}
                    gbs = f"{n * k / times['int8'] / 1e9:.1f}" if m == 1 else "-"
                    print(f"| {str(dtype).removeprefix('torch.')} | {m} x {k} -> {n} | {ms['float']} | {ms['int8']} | "
                          f"{ms['int8 deq']} | {ms['int8 torch']} | {ms['int4']} | {ms['int4 deq']} | "
                          f"{ms['int4 torch']} | {times['int8 pick'] / times['float']:.2f} | "
                          f"{times['int4 pick'] / times['float']:.2f} | {gbs} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
