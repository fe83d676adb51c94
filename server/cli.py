"""The `goose` command line: one entry point, one subcommand per job, each imported only when chosen."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module with main(argv) -> int, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("server.serve", "serve a model over the OpenAI API (default: the embedded model on 127.0.0.1:8000)"),
    "info": ("server.info", "load a checkpoint and print its dimensions, state size and a test forward"),
    "train": ("training.train", "train an RWKV-7 model (e.g. the default model: --config training/austen.yaml)"),
    "convert": ("engine.convert", "convert a model between .pth, .safetensors, Hugging Face (fla-hub) and GGUF"),
}
BENCHMARKS: dict[str, tuple[str, str]] = {
    "engine": ("bench.engine", "Goose vs the official rwkv package: prefill, decode, batched decode"),
    "tokenizer": ("bench.tokenizer", "World tokenizer encode speed vs the reference"),
    "concurrency": ("bench.concurrency", "AsyncEngine: aggregate tokens/s and TTFT at 1..128 streams; cached TTFT"),
    "memory": ("bench.memory", "peak RSS and decode ms/token after 1k, 16k and 128k tokens of context"),
    "linear": ("bench.linear", "matrix products: F.linear vs oneDNN, plain and packed, for the 0.1B shapes"),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="goose", description="Goose: an OpenAI-compatible inference server for RWKV-7 models.",
        epilog="Run 'goose COMMAND --help' for a command's options.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    bench = sub.add_parser("bench", help="run a benchmark and print a table with ratios to the reference",
                           add_help=True)
    bench.add_argument("which", choices=sorted(BENCHMARKS), help="; ".join(f"{k}: {v[1]}" for k, v in BENCHMARKS.items()))
    return ap


def _run(module_name: str, argv: list[str]) -> int:
    module = importlib.import_module(module_name)
    return int(module.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command in SUBCOMMANDS:
        return _run(SUBCOMMANDS[command][0], rest)
    if command == "bench":
        if rest and rest[0] in BENCHMARKS:
            return _run(BENCHMARKS[rest[0]][0], rest[1:])
        parser.parse_args(argv)          # prints the bench usage and exits 2
    parser.parse_args(argv)              # unknown command: argparse's own error, exit 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
