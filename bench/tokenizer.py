"""World tokenizer encode speed: rwkv package reference vs our pure-Python trie vs the pyrwkv fast path.

    PYTHONPATH=. python bench/tokenizer.py [--mb 2] [--repeat 3]

Same deterministic mixed multilingual text (bench/corpus.py) for every row; best of --repeat runs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

from engine.text.world import WORLD_VOCAB_PATH, WorldTokenizer
from bench.corpus import mixed_corpus


def best_seconds(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def timed_load(make: Callable[[], object]) -> tuple[object, float]:
    t0 = time.perf_counter()
    obj = make()
    return obj, time.perf_counter() - t0


def encoders() -> list[tuple[str, Callable[[], object]]]:
    """(label, constructor) for each encoder present; each constructed object has .encode(str) -> list[int]."""
    rows: list[tuple[str, Callable[[], object]]] = []
    try:
        import rwkv
        from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

        ref_vocab = os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt")
        rows.append(("rwkv TRIE_TOKENIZER (reference)", lambda: TRIE_TOKENIZER(ref_vocab)))
    except ImportError:
        print("rwkv is not installed: no reference row", file=sys.stderr)
    rows.append(("goose WorldTokenizer pure-Python trie", lambda: WorldTokenizer(WORLD_VOCAB_PATH, fast=False)))
    fast = WorldTokenizer(WORLD_VOCAB_PATH, fast=True)
    if fast.fast:
        rows.append(("goose WorldTokenizer pyrwkv fast path", lambda: WorldTokenizer(WORLD_VOCAB_PATH, fast=True)))
    else:
        print("pyrwkv_tokenizer is not installed or was rejected: no fast row", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=2.0, help="size of the text in MB (default 2)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)

    text = mixed_corpus(int(args.mb * 1e6))
    nbytes = len(text.encode("utf-8"))
    print(f"text: {nbytes / 1e6:.2f} MB UTF-8, {len(text):,} chars\n")
    header = f"{'encoder':40} {'load s':>7} {'MB/s':>8} {'x ref':>6} {'tokens':>9} {'ids == ref':>10}"
    print(header)
    print("-" * len(header))
    ref_rate = ref_ids = None
    pure = None
    for label, make in encoders():
        tok, load_s = timed_load(make)
        tok.encode(text[:1000])  # warm up (and build the lazy trie)
        ids = tok.encode(text)
        rate = nbytes / best_seconds(lambda: tok.encode(text), args.repeat) / 1e6
        if ref_rate is None:
            ref_rate, ref_ids = rate, ids
        if isinstance(tok, WorldTokenizer) and not tok.fast:
            pure = tok
        same = "yes" if ids == ref_ids else "NO"
        print(f"{label:40} {load_s:7.2f} {rate:8.2f} {rate / ref_rate:6.2f} {len(ids):9,} {same:>10}")

    if pure is not None:  # decode side, for context
        ids = pure.encode(text)
        dec_rate = nbytes / best_seconds(lambda: pure.decode(ids), args.repeat) / 1e6

        def stream() -> None:
            dec = pure.stream_decoder()
            for i in ids:
                dec.feed(i)
            dec.flush()

        stream_s = best_seconds(stream, args.repeat)
        print(f"\ndecode: {dec_rate:.1f} MB/s; stream decoder: {nbytes / stream_s / 1e6:.1f} MB/s "
              f"({len(ids) / stream_s / 1e6:.2f} M tokens/s); {nbytes / len(ids):.2f} bytes/token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
