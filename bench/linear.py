"""Matrix-product benchmark: torch's matmul (F.linear) vs oneDNN's linear op (plain and with the weight
packed in oneDNN's layout, as the model loads it) for the shapes of the 0.1B model.

    python -m bench.linear [--dtypes fp32,bf16] [--repeats 20] [--no-quant]

Why engine/model/linear.py picks oneDNN for CPU fp32: prints ms and GFLOPS (GB/s of weight read for M=1) per shape
and backend, with the ratio oneDNN / F.linear. Weights are [out, in] like the model's; the head (65536 rows,
201 MB in fp32) never fits in cache, the smaller matrices may, so M=1 rows of those flatter both backends.

A second table compares the quantized products of the "fp32i8"/"bf16i8"/"fp32i4"/"bf16i4" strategies
(engine/model/quant.py) with the float product the float strategy uses, per shape: torch's int8/int4 kernels
(bf16 activations) and, for fp32 activations, the weight dequantized per call into the float product (the path
quant.DENSE_ROWS picks for many rows).
"""
from __future__ import annotations

import argparse
import sys

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
    args = ap.parse_args(argv)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    print(f"machine: {machine_line()}\n")
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
        quant_table([dtypes[name] for name in args.dtypes.split(",")], args.repeats)
    return 0


def quant_table(dtypes: list[torch.dtype], repeats: int) -> None:
    """ms per product: the float strategy's product vs int8 and int4 (kernel, and dequantized for fp32)."""
    print(f"\n| activations | M x in -> out | float ms | int8 ms | int8 dequantized ms | int4 (group "
          f"{quant.GROUP_SIZE}) ms | int4 dequantized ms | int8 / float | int4 / float | int8 weight GB/s (M=1) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(1)
    dense = onednn_linear if probe_onednn(torch.float32)[0] else F.linear
    with torch.inference_mode():
        for dtype in dtypes:
            lin = select_linear(torch.device("cpu"), dtype)
            for m, k, n in SHAPES:
                x = torch.randn(m, k, generator=g).to(dtype)
                w = torch.randn(n, k, generator=g)
                wf, q8, q4 = lin.prepare(w.to(dtype).contiguous()), quant.quantize_int8(w), quant.quantize_int4(w)
                tf = timed(lambda: lin.fn(x, wf), repeats)
                # the kernels always take bf16 rows (quant.int8_product casts fp32 ones the same way)
                t8 = timed(lambda: quant.int8_product(x.to(torch.bfloat16), q8).to(dtype), repeats)
                t4 = timed(lambda: quant.int4_product(x.to(torch.bfloat16), q4).to(dtype), repeats)
                d8 = d4 = "-"
                if dtype == torch.float32:
                    d8 = f"{timed(lambda: dense(x, q8.dequantize()), repeats) * 1e3:.3f}"
                    d4 = f"{timed(lambda: dense(x, q4.dequantize().contiguous()), repeats) * 1e3:.3f}"
                gbs = f"{q8.nbytes / t8 / 1e9:.1f}" if m == 1 else "-"
                print(f"| {str(dtype).removeprefix('torch.')} | {m} x {k} -> {n} | {tf * 1e3:.3f} | {t8 * 1e3:.3f} | "
                      f"{d8} | {t4 * 1e3:.3f} | {d4} | {t8 / tf:.2f} | {t4 / tf:.2f} | {gbs} |",
                      flush=True)


if __name__ == "__main__":
    sys.exit(main())
