"""Matrix-product benchmark: torch's matmul (F.linear) vs oneDNN's linear op (plain and with the weight
packed in oneDNN's layout, as the model loads it) for the shapes of the 0.1B model.

    python -m bench.linear [--dtypes fp32,bf16] [--repeats 20]

Why engine/model/linear.py picks oneDNN for CPU fp32: prints ms and GFLOPS (GB/s of weight read for M=1) per shape
and backend, with the ratio oneDNN / F.linear. Weights are [out, in] like the model's; the head (65536 rows,
201 MB in fp32) never fits in cache, the smaller matrices may, so M=1 rows of those flatter both backends.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from bench.engine import timed
from bench.machine import machine_line
from engine.model.linear import onednn_linear, onednn_pack, probe_onednn

# (M, in, out): decode B=1 and B=64, prefill T=1024; r/k/v/output, FFN key and value, and the head
SHAPES = [(m, k, n) for m in (1, 64, 1024) for (k, n) in ((768, 768), (768, 3072), (3072, 768), (768, 65536))
          if not (m == 1024 and n == 65536)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="goose bench linear", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--repeats", type=int, default=20)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
