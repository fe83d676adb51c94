"""Structured outputs: per-step mask cost for a batch of 64 at the World vocabulary (65536), and compile times.

    python -m bench.structured [--rows 64] [--steps 40] [--threads 1 2]

Each step fills the masks of every constrained row (MaskFiller), applies them to [rows, 65536] fp32 logits, samples
with the engine's sampler (temperature 1) and accepts the tokens, so the matchers move through the schema like real
sequences. "free" rows have no matcher: fill returns None and apply does nothing.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from engine.sampling import SamplerRow, make_generator, sample
from engine.structured import GrammarCompiler, JsonSchema, MaskFiller, apply_mask
from engine.structured.vocab import grammar_vocab
from engine.text.tokenizer import WorldTokenizer
from engine.request import SamplingParams

TYPICAL = {"type": "object", "properties": {
    "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,15}$"},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "score": {"type": "number", "minimum": -1.5, "maximum": 99.5},
    "role": {"enum": ["admin", "user", "guest"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 4},
    "address": {"type": "object", "properties": {"street": {"type": "string", "maxLength": 40},
                                                 "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["street", "zip"], "additionalProperties": False},
    "friends": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                         "since": {"type": "integer", "minimum": 1900, "maximum": 2100}},
        "required": ["name"], "additionalProperties": False}}},
    "required": ["name", "age", "role", "tags", "address"], "additionalProperties": False}


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.3f}"


def step_costs(compiler, rows: int, steps: int, threads: int, constrained: bool) -> dict[str, float]:
    compiled = compiler.compile(JsonSchema.of(TYPICAL, "bench"))
    filler = MaskFiller(threads)
    matchers = [compiled.matcher() if constrained else None for _ in range(rows)]
    params = SamplingParams(temperature=1.0)
    sampler_rows = [SamplerRow(params, make_generator(7, i)) for i in range(rows)]
    gen = torch.Generator().manual_seed(0)
    fill_t, apply_t, sample_t = [], [], []
    for _ in range(steps):
        logits = torch.randn(rows, compiler.vocab_size, generator=gen)
        t0 = time.perf_counter()
        batch = filler.fill(matchers)
        t1 = time.perf_counter()
        apply_mask(logits, batch)
        t2 = time.perf_counter()
        tokens, _ = sample(logits, sampler_rows, want_logprobs=False)
        t3 = time.perf_counter()
        fill_t.append(t1 - t0), apply_t.append(t2 - t1), sample_t.append(t3 - t2)
        for i, m in enumerate(matchers):
            if m is None:
                continue
            if tokens[i] == compiler.vocab.eot_id or m.is_finished:
                matchers[i] = compiled.matcher()          # a new sequence takes the finished one's row
            else:
                m.accept(tokens[i])
    med = statistics.median
    return {"fill": med(fill_t), "apply": med(apply_t), "sample": med(sample_t)}


def compile_costs(tokenizer) -> dict[str, float]:
    t0 = time.perf_counter()
    grammar_vocab(tokenizer)
    vocab = time.perf_counter() - t0
    compiler = GrammarCompiler(tokenizer)              # the vocabulary is cached from here on
    spec = JsonSchema.of(TYPICAL, "bench")
    t0 = time.perf_counter()
    compiled = compiler.compile(spec)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiler.compile(spec)
    cached = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(100):
        compiled.matcher()
    matcher = (time.perf_counter() - t0) / 100
    return {"vocab": vocab, "cold": cold, "cached": cached, "matcher": matcher}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    tok = WorldTokenizer()
    c = compile_costs(tok)
    print(f"World vocabulary ({tok.vocab_size} ids), torch threads {torch.get_num_threads()}\n")
    print("| compile (typical schema)        |       ms |")
    print("|---------------------------------|---------:|")
    print(f"| grammar vocabulary, once        | {ms(c['vocab'])} |")
    print(f"| schema, cold (incl. first mask) | {ms(c['cold'])} |")
    print(f"| schema, cached                  | {ms(c['cached'])} |")
    print(f"| new matcher from compiled       | {ms(c['matcher'])} |\n")
    compiler = GrammarCompiler(tok)
    print(f"| {args.rows} rows, per step (median of {args.steps}) | llg threads | fill ms | apply ms | sample ms |")
    print("|------------------------------------|------------:|--------:|---------:|----------:|")
    free = step_costs(compiler, args.rows, args.steps, 1, constrained=False)
    print(f"| free rows (no matcher)             |           - | {ms(free['fill'])} | {ms(free['apply'])} |"
          f"  {ms(free['sample'])} |")
    for threads in args.threads:
        r = step_costs(compiler, args.rows, args.steps, threads, constrained=True)
        print(f"| one JSON schema                    | {threads:11d} | {ms(r['fill'])} | {ms(r['apply'])} |"
              f"  {ms(r['sample'])} |")


if __name__ == "__main__":
    main()
