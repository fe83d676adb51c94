"""Quality of the quantized strategies against fp32 on the same weights (the README's quality table).

    python -m bench.quant [--strategies "cpu fp32i8,cpu bf16i8,cpu fp32i4,cpu bf16i4"] [--groups 32,64,128]

For each strategy: perplexity of the default model (models/rwkv7-austen) on its whole held-out split (windows of
512 tokens from a zero state, training/eval.py) and the share of positions whose top-1 token equals fp32's; then
the maximum logit deviation from fp32 on a random 0.1B-shaped checkpoint (2 x 64 tokens, all positions). Extra
rows measure the choices in engine/model/quant.py: the head left in float, and int4 group sizes.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from bench.machine import machine_line
from bench.random_checkpoint import SHAPE_0B1, write_checkpoint
from engine import load_model
from engine.model import quant
from training.eval import DEFAULT_MODEL_DIR, EVAL_WINDOW, validation_tokens

DEFAULT_STRATEGIES = "cpu bf16,cpu fp32i8,cpu bf16i8,cpu fp32i4,cpu bf16i4"


@contextmanager
def quant_choice(families=None, group=None):
    """Load with other QUANTIZED families or another int4 group size (the bench's variants only)."""
    saved = quant.QUANTIZED, quant.GROUP_SIZE
    quant.QUANTIZED = families or saved[0]
    quant.GROUP_SIZE = group or saved[1]
    try:
        yield
    finally:
        quant.QUANTIZED, quant.GROUP_SIZE = saved


def windows(tokens: list[int], window: int = EVAL_WINDOW, batch: int = 8):
    """(inputs [b, window], targets [b, window]) over the full windows of the held-out stream."""
    t = torch.tensor(tokens)
    starts = list(range(0, len(t) - 1 - window + 1, window))
    for i in range(0, len(starts), batch):
        group = starts[i:i + batch]
        yield (torch.stack([t[s:s + window] for s in group]), torch.stack([t[s + 1:s + window + 1] for s in group]))


def austen_quality(strategy: str, batches, ref_top1: list[torch.Tensor] | None):
    """(perplexity, top-1 per batch, agreement with ref_top1) of the default model under ``strategy``."""
    model = load_model(DEFAULT_MODEL_DIR / "model.safetensors", strategy)
    nll, count, top1, same = 0.0, 0, [], 0
    for j, (x, y) in enumerate(batches):
        logits, _ = model.forward(x, None, full_output=True)
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        count += y.numel()
        top1.append(logits.argmax(-1))
        if ref_top1 is not None:
            same += int((top1[-1] == ref_top1[j]).sum())
    return math.exp(nll / count), top1, (same / count if ref_top1 is not None else 1.0)


def random_deviation(path: str, strategy: str, ref: torch.Tensor | None, toks: torch.Tensor):
    logits, _ = load_model(path, strategy).forward(toks, None, full_output=True)
    if ref is None:
        return logits, 0.0, 0.0, 1.0
    dev = float((logits - ref).abs().max())
    return logits, dev, dev / float(ref.abs().max()), float((logits.argmax(-1) == ref.argmax(-1)).float().mean())


def variants(strategies: list[str], groups: list[int]):
    """(label, strategy, families, group): the strategies as shipped, then the measured alternatives."""
    rows = [(s, s, None, None) for s in strategies]
    for s in strategies:
        if s.endswith(("i8", "i4")):
            rows.append((f"{s}, head float", s, ("att", "ffn"), None))
    for s in strategies:
        if s.endswith("i4"):
            rows += [(f"{s}, group {g}", s, None, g) for g in groups if g != quant.GROUP_SIZE]
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="goose bench quant", description=__doc__.split("\n\n")[0])
    ap.add_argument("--strategies", default=DEFAULT_STRATEGIES)
    ap.add_argument("--groups", default="32,64,128", help="int4 group sizes to compare")
    args = ap.parse_args(argv)
    strategies = [s.strip() for s in args.strategies.split(",")]
    groups = [int(g) for g in args.groups.split(",")]
    batches = list(windows(validation_tokens()))
    toks = torch.randint(0, SHAPE_0B1.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    print(f"machine: {machine_line()}")
    print(f"default model: {DEFAULT_MODEL_DIR.name}, {sum(y.numel() for _, y in batches)} held-out tokens "
          f"(windows of {EVAL_WINDOW}); random model: 0.1B shape (L12 C768 V65536), 2 x 64 tokens; "
          f"int4 group {quant.GROUP_SIZE} unless said\n")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "random-0b1.pth")
        write_checkpoint(path, SHAPE_0B1, seed=0)
        ppl32, top32, _ = austen_quality("cpu fp32", batches, None)
        ref, *_ = random_deviation(path, "cpu fp32", None, toks)
        print("| strategy | perplexity | vs fp32 | top-1 agreement | max logit deviation (0.1B random) | "
              "relative to max logit | top-1 agreement (0.1B random) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        print(f"| cpu fp32 | {ppl32:.3f} | - | - | - | - | - |")
        for label, strategy, families, group in variants(strategies, groups):
            with quant_choice(families, group):
                ppl, _, agree = austen_quality(strategy, batches, top32)
                _, dev, rel, agree_r = random_deviation(path, strategy, ref, toks)
            print(f"| {label} | {ppl:.3f} | {100 * (ppl / ppl32 - 1):+.2f}% | {100 * agree:.2f}% | {dev:.4f} | "
                  f"{100 * rel:.2f}% | {100 * agree_r:.1f}% |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
