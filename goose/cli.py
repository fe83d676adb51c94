"""The `goose` command line: one entry point, one subcommand per job.

Each subcommand's module is imported inside its runner (plain imports, so the import graph shows them), and only when
that subcommand is chosen: `goose --help` starts without loading torch.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def _serve(argv: list[str]) -> int:
    from server.serve import main
    return main(argv)


def _info(argv: list[str]) -> int:
    from goose.info import main
    return main(argv)


def _train(argv: list[str]) -> int:
    from training.train import main
    return main(argv)


def _convert(argv: list[str]) -> int:
    from engine.formats.convert import main
    return main(argv)


def _bench_engine(argv: list[str]) -> int:
    from bench.engine import main
    return main(argv)


def _bench_tokenizer(argv: list[str]) -> int:
    from bench.tokenizer import main
    return main(argv)


def _bench_concurrency(argv: list[str]) -> int:
    from bench.concurrency import main
    return main(argv)


def _bench_memory(argv: list[str]) -> int:
    from bench.memory import main
    return main(argv)


def _bench_linear(argv: list[str]) -> int:
    from bench.linear import main
    return main(argv)


def _bench_conversation(argv: list[str]) -> int:
    from bench.conversation import main
    return main(argv)


def _bench_quant(argv: list[str]) -> int:
    from bench.quant import main
    return main(argv)


Runner = Callable[[list[str]], "int | None"]
SUBCOMMANDS: dict[str, tuple[Runner, str]] = {
    "serve": (_serve, "serve a model over the OpenAI API (default: the embedded model on 127.0.0.1:8000)"),
    "info": (_info, "load a checkpoint and print its dimensions, state size and a test forward"),
    "train": (_train, "train an RWKV-7 model (e.g. the default model: --config training/austen.yaml)"),
    "convert": (_convert, "convert a model between .pth, .safetensors, Hugging Face (fla-hub) and GGUF"),
}
BENCHMARKS: dict[str, tuple[Runner, str]] = {
    "engine": (_bench_engine, "Goose vs the official rwkv package: prefill, decode, batched decode"),
    "tokenizer": (_bench_tokenizer, "World tokenizer encode speed vs the reference"),
    "concurrency": (_bench_concurrency, "AsyncEngine: aggregate tokens/s and TTFT at 1..128 streams; cached TTFT"),
    "memory": (_bench_memory, "peak RSS and decode ms/token after 1k, 16k and 128k tokens of context"),
    "linear": (_bench_linear, "matrix products: F.linear vs oneDNN, plain and packed, for the 0.1B shapes"),
    "conversation": (_bench_conversation, "50 turns by previous_response_id vs resending the history: TTFT per "
                     "turn; bytes and load time of a stored state"),
    "quant": (_bench_quant, "quantized strategies vs fp32: perplexity, top-1 agreement, logit deviation"),
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command in SUBCOMMANDS:
        return int(SUBCOMMANDS[command][0](rest) or 0)
    if command == "bench":
        if rest and rest[0] in BENCHMARKS:
            return int(BENCHMARKS[rest[0]][0](rest[1:]) or 0)
        parser.parse_args(argv)          # prints the bench usage and exits 2
    parser.parse_args(argv)              # unknown command: argparse's own error, exit 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
