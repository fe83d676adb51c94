"""Train the embedded RWKV-7 Austen model on CPU.

    python -m training.train --config training/austen.yaml            # reproduces models/rwkv7-austen/
    python -m training.train --config training/austen.yaml --resume training/runs/austen/last.pt
    goose train --config training/austen.yaml                         # the project CLI calls main()

Every hyperparameter lives in the YAML file. The run directory (``--out``, default ``training/runs/<name>``) gets
``last.pt`` (model + optimizer + step + RNG states, for ``--resume``), ``best.pt`` (the best validation loss so
far), ``history.json`` and ``loss.png``. At the end the best checkpoint is exported to the model directory
(``export.dir``): ``model.safetensors`` with BlinkDL key names (fp32 if it fits in ``export.max_mb``, else bf16),
``goose.json`` metadata, ``loss.png`` and the ``README.md`` model card.

Data: the training split of the novels as one token stream (documents separated by ``<|endoftext|>`` = 0) and
a stream of chat documents mined from the same split (``training.chat_data``); each batch row is a random
window from the chat stream with probability ``data.chat_fraction``, else from the novels. The schedule is
step-based (linear warmup, cosine decay to ``lr_min`` at ``max_steps``), so a run is deterministic for a given
config and thread count; ``--max-minutes`` and early stopping (``patience`` evaluations without a new best) only
decide where it stops.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "training" / "austen.yaml"


# ----------------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------------
DEFAULTS = {
    "name": "rwkv7-austen",
    "seed": 1234,
    "model": {"n_layer": 4, "n_embd": 192, "head_size": 32, "vocab_size": 4096, "chunk_len": 32},
    "data": {"corpus": "training/data/austen.txt.xz", "tokenizer": "models/rwkv7-austen/tokenizer.json",
             "chat_fraction": 0.25, "chat_seed": 0},
    "train": {"batch_size": 8, "ctx_len": 512, "max_steps": 2000, "lr": 2e-3, "lr_min": 1e-4, "warmup_steps": 50,
              "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.1, "grad_clip": 1.0, "eval_interval": 100,
              "eval_batch_size": 8, "eval_window": 512, "ckpt_interval": 100, "log_interval": 50, "patience": 0,
              "max_minutes": 0, "threads": 2, "progress_interval": 5.0},
    "export": {"dir": "models/rwkv7-austen", "max_mb": 16, "dtype": "auto", "card": True},
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in (over or {}).items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def resolve_path(p: str | os.PathLike) -> Path:
    """A relative path is taken from the current directory if it exists there, else from the repository root."""
    p = Path(p)
    if p.is_absolute() or p.exists():
        return p
    return REPO / p


def load_config(path: str | os.PathLike | None) -> dict:
    cfg = DEFAULTS
    if path is not None:
        with open(resolve_path(path)) as f:
            cfg = _merge(DEFAULTS, yaml.safe_load(f) or {})
    return json.loads(json.dumps(cfg))  # deep copy


# ----------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Data:
    train: torch.Tensor        # novels, training split, int64
    chat: torch.Tensor         # chat documents, each preceded by 0
    chat_starts: torch.Tensor  # index of each chat document's leading 0
    val: torch.Tensor          # held-out split
    vocab_size: int
    n_chat_docs: int


def build_data(cfg: dict) -> Data:
    from tokenizers import Tokenizer

    from training.chat_data import build_chat_documents
    from training.eval import stream_tokens
    from training.extract_corpus import load_splits

    dcfg = cfg["data"]
    tok_path = resolve_path(dcfg["tokenizer"])
    if not tok_path.exists():
        from training.train_tokenizer import train_tokenizer, training_texts

        tok = train_tokenizer(training_texts(resolve_path(dcfg["corpus"])), cfg["model"]["vocab_size"])
        tok_path.parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(tok_path))
    tok = Tokenizer.from_file(str(tok_path))
    train, val = load_splits(resolve_path(dcfg["corpus"]))
    train_ids = stream_tokens(train, tok)
    val_ids = stream_tokens(val, tok)
    docs = build_chat_documents(train, seed=dcfg["chat_seed"]) if dcfg["chat_fraction"] > 0 else []
    chat_ids: list[int] = []
    starts: list[int] = []
    for enc in tok.encode_batch(docs):
        starts.append(len(chat_ids))
        chat_ids.append(0)
        chat_ids.extend(enc.ids)
    chat_ids.append(0)
    def as_t(x):
        return torch.tensor(x, dtype=torch.long)

    return Data(as_t(train_ids), as_t(chat_ids), as_t(starts), as_t(val_ids), tok.get_vocab_size(), len(docs))


def get_batch(data: Data, B: int, T: int, chat_fraction: float, gen: torch.Generator):
    """B windows of T+1 tokens; each row comes from the chat stream with probability ``chat_fraction``."""
    u = torch.rand(B, generator=gen)
    rows = []
    n_chat = len(data.chat_starts)
    for i in range(B):
        if u[i] < chat_fraction and n_chat and len(data.chat) > T + 1:
            j = int(torch.randint(n_chat, (1,), generator=gen))
            s = min(int(data.chat_starts[j]), len(data.chat) - T - 1)
            rows.append(data.chat[s:s + T + 1])
        else:
            s = int(torch.randint(len(data.train) - T, (1,), generator=gen))
            rows.append(data.train[s:s + T + 1])
    batch = torch.stack(rows)
    return batch[:, :-1], batch[:, 1:]


# ----------------------------------------------------------------------------------------------------------
# optimisation
# ----------------------------------------------------------------------------------------------------------
def make_optimizer(model: torch.nn.Module, tcfg: dict) -> torch.optim.Optimizer:
    """AdamW; weight decay only on the big ``.weight`` matrices (embedding, projections, FFN, head)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and name.endswith(".weight") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": tcfg["weight_decay"]},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tcfg["lr"], betas=tuple(tcfg["betas"]), eps=tcfg["eps"], foreach=True)


def lr_at(step: int, tcfg: dict) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``lr_min`` at ``max_steps``."""
    lr, lr_min, warm, total = tcfg["lr"], tcfg["lr_min"], tcfg["warmup_steps"], tcfg["max_steps"]
    if step < warm:
        return lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * progress))


def evaluate(model, data: Data, tcfg: dict) -> float:
    from training.eval import windowed_loss

    model.eval()
    loss, _ = windowed_loss(model, data.val, window=tcfg["eval_window"], batch_size=tcfg["eval_batch_size"])
    model.train()
    return loss


# ----------------------------------------------------------------------------------------------------------
# checkpoints and export
# ----------------------------------------------------------------------------------------------------------
def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def machine_description() -> str:
    from bench.machine import machine_line
    return f"{machine_line()}, fp32 eager"


def export_safetensors(state_dict: dict, path: Path, max_mb: float = 16, dtype: str = "auto") -> str:
    """Write BlinkDL-named tensors; fp32 if the file fits in ``max_mb`` MB, else bf16. Returns the dtype used."""
    from safetensors.torch import save_file

    n_bytes = sum(t.numel() * 4 for t in state_dict.values())
    if dtype == "auto":
        dtype = "fp32" if n_bytes <= max_mb * 1e6 else "bf16"
    tdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    tensors = {k: v.detach().to(tdt).contiguous() for k, v in state_dict.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt", "architecture": "rwkv7"})
    os.chmod(path, 0o644)
    return dtype


def plot_history(history: list, evals: list, path: Path, title: str = "") -> None:
    try:
        import matplotlib
    except ImportError:  # matplotlib is the optional "train" extra
        print(f"matplotlib is not installed: {path} not written", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if history:
        toks = [h["tokens"] / 1e6 for h in history]
        loss = [h["loss"] for h in history]
        ema, smooth = 0.0, []
        for i, x in enumerate(loss, 1):  # bias-corrected exponential moving average
            ema = 0.95 * ema + 0.05 * x
            smooth.append(ema / (1 - 0.95 ** i))
        ax.plot(toks, loss, color="tab:blue", alpha=0.2, lw=0.8)
        ax.plot(toks, smooth, color="tab:blue", lw=1.5, label="train (EMA 0.95)")
    if evals:
        ax.plot([e["tokens"] / 1e6 for e in evals], [e["val_loss"] for e in evals], "o-", color="tab:red",
                ms=3, lw=1.2, label="held-out (last 3% of each novel)")
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("loss (nats/token)")
    if history:
        lo = min([h["loss"] for h in history] + [e["val_loss"] for e in evals])
        ax.set_ylim(max(0.0, lo - 0.3), min(9.0, max(h["loss"] for h in history[:5]) + 0.2))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------
def parse_args(argv):
    ap = argparse.ArgumentParser(prog="goose train", description="train the RWKV-7 Austen model on CPU")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML file with every hyperparameter")
    ap.add_argument("--resume", default=None, metavar="PATH", help="continue from a last.pt checkpoint")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="stop this invocation after so many wall-clock minutes (overrides train.max_minutes)")
    ap.add_argument("--out", default=None, metavar="DIR", help="run directory (default training/runs/<name>)")
    ap.add_argument("--export-dir", default=None, help="model directory to export to (overrides export.dir)")
    ap.add_argument("--no-export", action="store_true", help="skip the export to the model directory")
    ap.add_argument("--steps", type=int, default=None,
                    help="stop after this global step (the schedule still runs to train.max_steps)")
    ap.add_argument("--export-only", action="store_true",
                    help="do not train: export the run directory's best.pt (with last.pt's run figures)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config)
    cfg["_config_path"] = str(args.config)
    tcfg, ecfg = cfg["train"], cfg["export"]
    if args.max_minutes is not None:
        tcfg["max_minutes"] = args.max_minutes
    if args.export_dir is not None:
        ecfg["dir"] = args.export_dir
    torch.set_num_threads(int(tcfg["threads"]))
    out = Path(args.out) if args.out else REPO / "training" / "runs" / cfg["name"].replace("rwkv7-", "")
    out.mkdir(parents=True, exist_ok=True)

    from tqdm import tqdm

    from training.model import RWKV7, RWKV7Config

    t_setup = time.time()
    data = build_data(cfg)
    mcfg = dict(cfg["model"])
    if mcfg.get("vocab_size") not in (None, data.vocab_size):
        print(f"note: model.vocab_size {mcfg['vocab_size']} -> tokenizer vocab {data.vocab_size}", file=sys.stderr)
    mcfg["vocab_size"] = data.vocab_size
    model_cfg = RWKV7Config.from_dict(mcfg)
    torch.manual_seed(cfg["seed"])
    model = RWKV7(model_cfg)
    model.train()
    opt = make_optimizer(model, tcfg)
    gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    st = {"step": 0, "tokens": 0, "best_val": float("inf"), "best_step": 0, "best_tokens": 0, "bad_evals": 0,
          "elapsed": 0.0, "history": [], "evals": []}
    if args.resume:
        ck = torch.load(resolve_path(args.resume), map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["rng"]["batch"])
        torch.set_rng_state(ck["rng"]["torch"])
        st = ck["state"]
        print(f"resumed from {args.resume} at step {st['step']}", file=sys.stderr)

    if args.export_only:
        last = out / "last.pt"
        if last.exists() and not args.resume:
            ck = torch.load(last, map_location="cpu", weights_only=False)
            model.load_state_dict(ck["model"])
            st = ck["state"]
        export_run(cfg, out, model, model_cfg, st, model.num_params())
        return 0

    B, T, max_steps = tcfg["batch_size"], tcfg["ctx_len"], tcfg["max_steps"]
    stop_step = min(max_steps, args.steps) if args.steps is not None else max_steps
    n_params = model.num_params()
    print(f"model L{model_cfg.n_layer} C{model_cfg.n_embd} N{model_cfg.head_size} V{model_cfg.vocab_size} "
          f"F{model_cfg.dim_ffn}: {n_params / 1e6:.3f}M params | train {len(data.train)} tok, chat "
          f"{len(data.chat)} tok ({data.n_chat_docs} docs), val {len(data.val)} tok | setup "
          f"{time.time() - t_setup:.1f}s", file=sys.stderr)

    def checkpoint(path: Path):
        _atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "state": st, "config": cfg,
                      "model_config": model_cfg.to_dict(),
                      "rng": {"batch": gen.get_state(), "torch": torch.get_rng_state()}}, path)

    stop_reason = None

    def on_signal(signum, _frame):
        nonlocal stop_reason
        stop_reason = f"signal {signum}"

    old_handlers = {}
    for s in (signal.SIGTERM, signal.SIGINT):
        try:
            old_handlers[s] = signal.signal(s, on_signal)
        except ValueError:  # not in the main thread
            pass

    t0 = time.time()
    elapsed0 = st["elapsed"]
    tokens0 = st["tokens"]
    max_sec = float(tcfg["max_minutes"] or 0) * 60
    bar = tqdm(total=stop_step, initial=st["step"], desc=cfg["name"], file=sys.stderr, dynamic_ncols=False,
               ncols=110, mininterval=float(tcfg["progress_interval"]), ascii=True)
    ema = None
    try:
        while st["step"] < stop_step:
            if stop_reason:
                break
            if max_sec and time.time() - t0 > max_sec:
                stop_reason = f"max_minutes {tcfg['max_minutes']} reached"
                break
            if tcfg["patience"] and st["bad_evals"] >= tcfg["patience"]:
                stop_reason = f"no validation improvement in {tcfg['patience']} evaluations"
                break
            lr = lr_at(st["step"], tcfg)
            for g in opt.param_groups:
                g["lr"] = lr
            x, y = get_batch(data, B, T, cfg["data"]["chat_fraction"], gen)
            loss = model.loss(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg["grad_clip"])
            opt.step()
            st["step"] += 1
            st["tokens"] += B * T
            lv = loss.item()
            st["history"].append({"step": st["step"], "loss": lv, "lr": lr, "gnorm": float(gnorm),
                                  "tokens": st["tokens"]})
            ema = lv if ema is None else 0.9 * ema + 0.1 * lv
            now = time.time()
            tps = (st["tokens"] - tokens0) / max(now - t0, 1e-9)
            st["elapsed"] = elapsed0 + now - t0
            bar.update(1)
            bar.set_postfix_str(f"loss {ema:.3f} lr {lr:.2e} {tps:,.0f} tok/s", refresh=False)
            if tcfg["log_interval"] and st["step"] % tcfg["log_interval"] == 0:
                bar.write(f"step {st['step']:5d} | loss {ema:.4f} | lr {lr:.2e} | gnorm {float(gnorm):.2f} | "
                          f"{tps:,.0f} tok/s | {st['tokens'] / 1e6:.2f}M tok | {st['elapsed'] / 60:.1f} min")
            if tcfg["eval_interval"] and (st["step"] % tcfg["eval_interval"] == 0 or st["step"] == max_steps):
                te = time.time()
                val = evaluate(model, data, tcfg)
                st["evals"].append({"step": st["step"], "tokens": st["tokens"], "val_loss": val,
                                    "elapsed": st["elapsed"]})
                improved = val < st["best_val"]
                if improved:
                    st.update(best_val=val, best_step=st["step"], best_tokens=st["tokens"], bad_evals=0)
                    _atomic_save({"model": model.state_dict(), "model_config": model_cfg.to_dict(),
                                  "step": st["step"], "tokens": st["tokens"], "val_loss": val,
                                  "elapsed": st["elapsed"]}, out / "best.pt")
                else:
                    st["bad_evals"] += 1
                bar.write(f"eval step {st['step']:5d} | val {val:.4f} (ppl {math.exp(val):.2f})"
                          f"{' *best*' if improved else ''} | {time.time() - te:.1f}s")
            if tcfg["ckpt_interval"] and st["step"] % tcfg["ckpt_interval"] == 0:
                checkpoint(out / "last.pt")
    finally:
        bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    if stop_reason is None:
        stop_reason = "max_steps reached" if st["step"] >= max_steps else f"stopped at step {st['step']}"
    checkpoint(out / "last.pt")
    wall = time.time() - t0
    run_tps = (st["tokens"] - tokens0) / max(wall, 1e-9)
    print(f"stopped: {stop_reason}; step {st['step']}, {st['tokens'] / 1e6:.2f}M tokens, "
          f"{st['elapsed'] / 60:.1f} min total, {run_tps:,.0f} tok/s this run; best val "
          f"{st['best_val']:.4f} at step {st['best_step']}", file=sys.stderr)

    summary = {"stop_reason": stop_reason, "steps": st["step"], "tokens": st["tokens"],
               "elapsed_minutes": st["elapsed"] / 60, "tokens_per_second_this_run": run_tps,
               "best_val": st["best_val"], "best_step": st["best_step"], "best_tokens": st["best_tokens"],
               "params": n_params, "history": st["history"], "evals": st["evals"], "config": cfg}
    (out / "history.json").write_text(json.dumps(summary, indent=1))
    plot_history(st["history"], st["evals"], out / "loss.png",
                 f"{cfg['name']}: {n_params / 1e6:.2f}M params, L{model_cfg.n_layer} C{model_cfg.n_embd}")

    if not args.no_export and ecfg.get("dir"):
        export_run(cfg, out, model, model_cfg, st, n_params)
    return 0


def export_run(cfg: dict, out: Path, model, model_cfg, st: dict, n_params: int) -> Path:
    """Export best.pt (or the final weights if there was no evaluation) to the model directory."""
    import shutil

    from training.eval import EVAL_SLICE, heldout_loss
    from training.model import load_safetensors_model

    ecfg, tcfg = cfg["export"], cfg["train"]
    mdir = resolve_path(ecfg["dir"])
    mdir.mkdir(parents=True, exist_ok=True)
    best = out / "best.pt"
    if best.exists():
        ck = torch.load(best, map_location="cpu", weights_only=False)
        sd, step, tokens, val, elapsed = ck["model"], ck["step"], ck["tokens"], ck["val_loss"], ck["elapsed"]
    else:
        sd, step, tokens, elapsed = model.state_dict(), st["step"], st["tokens"], st["elapsed"]
        val = evaluate(model, build_data(cfg), tcfg)
    dtype = export_safetensors(sd, mdir / "model.safetensors", ecfg["max_mb"], ecfg["dtype"])
    tok_src = resolve_path(cfg["data"]["tokenizer"])
    if tok_src.resolve() != (mdir / "tokenizer.json").resolve():
        shutil.copyfile(tok_src, mdir / "tokenizer.json")
    from training.eval import validation_tokens

    n_val = len(validation_tokens(mdir / "tokenizer.json", resolve_path(cfg["data"]["corpus"]))) - 1
    exported = load_safetensors_model(mdir / "model.safetensors")
    slice_loss = heldout_loss(exported, mdir / "tokenizer.json", resolve_path(cfg["data"]["corpus"]))
    meta = {
        "name": cfg["name"],
        "architecture": "rwkv7",
        "tokenizer": "tokenizer.json",
        "eot_id": 0,
        "chat": {"user": "User", "assistant": "Assistant", "system": "System", "separator": "\n\n",
                 "generation_prompt": "Assistant:"},
        "stop": ["\n\n", "\nUser:"],
        "training": {
            "params": n_params,
            "n_layer": model_cfg.n_layer, "n_embd": model_cfg.n_embd, "head_size": model_cfg.head_size,
            "vocab_size": model_cfg.vocab_size, "dim_ffn": model_cfg.dim_ffn, "ctx_len": tcfg["ctx_len"],
            "dtype": dtype,
            "tokens_seen": tokens,
            "steps": step,
            "wall_minutes": round(elapsed / 60, 2),
            "total_steps_run": st["step"],
            "total_wall_minutes": round(st["elapsed"] / 60, 2),
            "tokens_per_second": round(st["tokens"] / max(st["elapsed"], 1e-9)),
            "machine": machine_description(),
            "val_loss": round(val, 5),
            "val_ppl": round(math.exp(val), 3),
            "val_description": f"last 3% of each novel, {n_val} tokens, windows of {tcfg['eval_window']} tokens "
                               "from a zero state",
            "eval_slice_loss": round(slice_loss, 5),
            "eval_slice_ppl": round(math.exp(slice_loss), 3),
            "eval_slice": EVAL_SLICE,
            "corpus": "Jane Austen's six novels (Debian r-cran-janeaustenr 1.0.0, public domain texts); "
                      "training split = first 97% of each novel",
            "chat_fraction": cfg["data"]["chat_fraction"],
            "config": cfg.get("_config_path", "training/austen.yaml"),
            "hyperparameters": {k: tcfg[k] for k in (
                "batch_size", "ctx_len", "max_steps", "lr", "lr_min", "warmup_steps", "betas", "eps",
                "weight_decay", "grad_clip", "threads")} | {"seed": cfg["seed"], "chunk_len": model_cfg.chunk_len},
        },
    }
    (mdir / "goose.json").write_text(json.dumps(meta, indent=2) + "\n")
    if (out / "loss.png").exists():
        shutil.copyfile(out / "loss.png", mdir / "loss.png")
    print(f"exported {mdir / 'model.safetensors'} ({dtype}, step {step}, val {val:.4f}, "
          f"eval slice {slice_loss:.4f})", file=sys.stderr)
    if ecfg.get("card"):
        try:
            from training.model_card import write_card

            write_card(mdir)
        except Exception as exc:  # the weights are exported; the card can be regenerated alone
            print(f"model card not written: {exc!r} (run python -m training.model_card)", file=sys.stderr)
    return mdir


if __name__ == "__main__":
    sys.exit(main())
