"""`goose info MODEL`: load a checkpoint, print what it is, and run one forward as a smoke test."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from engine import ModelLoadError, load_model
from server.settings import ConfigError, load_settings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="goose info", description=__doc__)
    ap.add_argument("model", nargs="?", help="a .pth, .safetensors, .gguf, or Hugging Face directory "
                    "(default: model.path of the config file)")
    ap.add_argument("--config", help="config file (default: ./config.yaml when it exists)")
    ap.add_argument("--strategy", help="e.g. 'cpu fp32', 'cpu bf16', 'cuda fp16' (default: from the config)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        config = args.config or ("config.yaml" if Path("config.yaml").exists() else None)
        settings = load_settings(config).model
        args.model = args.model or settings.path
        model = load_model(args.model, args.strategy or settings.strategy, wkv_backend=settings.wkv_backend)
    except (ModelLoadError, ConfigError) as exc:
        print(f"goose info: {exc}", file=sys.stderr)
        return 1
    load_s = time.perf_counter() - t0
    cfg = model.config
    print(f"model     {args.model}")
    print(f"strategy  {model.strategy.text}")
    print(f"layers {cfg.n_layer}  embd {cfg.n_embd}  heads {cfg.n_head} x {cfg.head_size}  ffn {cfg.dim_ffn}  "
          f"vocab {cfg.vocab_size}")
    print(f"lora ranks  decay {cfg.decay_lora}  iclr {cfg.iclr_lora}  value {cfg.value_lora}  gate {cfg.gate_lora}")
    print(f"state per sequence  {cfg.state_bytes / 2**20:.2f} MiB (fixed, whatever the context length)")
    t0 = time.perf_counter()
    logits, _ = model.forward([[0]], None)
    print(f"loaded in {load_s:.2f} s; one-token forward {1e3 * (time.perf_counter() - t0):.1f} ms; "
          f"logits {tuple(logits.shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
