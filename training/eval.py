"""Held-out evaluation of the Austen model: a fixed slice (CI-sized) and the full validation split.

The held-out split is the last 3% of each novel (``training.extract_corpus.split_novel``). Its token stream is,
for the novels in alphabetical order (``NOVELS``), ``<|endoftext|>`` (id 0) followed by the novel's held-out
text, with a final id 0. Losses are mean next-token negative log-likelihoods in nats per token, computed in
non-overlapping windows of ``window`` input tokens, each run from a zero state.

``EVAL_SLICE`` (the figure recorded in ``models/rwkv7-austen/goose.json`` as ``training.eval_slice_loss``) is the
first 8192 predicted tokens: 16 windows of 512. It takes a couple of seconds on a CPU, so a test can check that the
committed weights are the trained ones. ``model_forward`` is any callable mapping token ids ``[B, T]`` (int64) to
logits ``[B, T, V]`` from a zero state: the train-mode model here, or the inference engine.

    python -m training.eval models/rwkv7-austen/model.safetensors
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from collections.abc import Callable

import torch
import torch.nn.functional as F

from training.extract_corpus import DEFAULT_OUT as CORPUS_PATH
from training.extract_corpus import NOVELS, load_splits

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO / "models" / "rwkv7-austen"
DEFAULT_TOKENIZER = DEFAULT_MODEL_DIR / "tokenizer.json"
EVAL_SLICE_TOKENS = 8192
EVAL_WINDOW = 512
EVAL_SLICE = (f"first {EVAL_SLICE_TOKENS} predicted tokens of the held-out split (last 3% of each novel, novels in "
              f"alphabetical order, each preceded by <|endoftext|>), {EVAL_SLICE_TOKENS // EVAL_WINDOW} windows of "
              f"{EVAL_WINDOW} tokens, each from a zero state; mean NLL in nats/token (training/eval.py)")

ModelForward = Callable[[torch.Tensor], torch.Tensor]


def stream_tokens(texts: dict[str, str], tokenizer, order=NOVELS) -> list[int]:
    """``0, doc_1, 0, doc_2, ..., 0`` for the documents in ``order`` (missing names are skipped)."""
    ids: list[int] = []
    for name in order:
        if name in texts:
            ids.append(0)
            ids.extend(tokenizer.encode(texts[name]).ids)
    ids.append(0)
    return ids


def validation_tokens(tokenizer_path=DEFAULT_TOKENIZER, corpus_path=CORPUS_PATH) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    _, val = load_splits(Path(corpus_path))
    return stream_tokens(val, tok)


@torch.no_grad()
def windowed_loss(model_forward: ModelForward, tokens: list[int] | torch.Tensor, window: int = EVAL_WINDOW,
                  n_tokens: int | None = None, batch_size: int = 8) -> tuple[float, int]:
    """Mean NLL (nats/token) predicting ``tokens[1 : n_tokens + 1]`` in windows of ``window`` from a zero state.

    Returns (loss, number of predicted tokens). The last window may be shorter."""
    t = torch.as_tensor(tokens, dtype=torch.long)
    n_pred = len(t) - 1 if n_tokens is None else min(n_tokens, len(t) - 1)
    starts = list(range(0, n_pred, window))
    total, count = 0.0, 0
    # full-length windows are batched; a short last window runs alone
    full = [s for s in starts if s + window <= n_pred]
    rest = [s for s in starts if s + window > n_pred]
    for i in range(0, len(full), batch_size):
        group = full[i:i + batch_size]
        x = torch.stack([t[s:s + window] for s in group])
        y = torch.stack([t[s + 1:s + window + 1] for s in group])
        logits = model_forward(x).float()
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    for s in rest:
        x = t[s:n_pred].unsqueeze(0)
        y = t[s + 1:n_pred + 1].unsqueeze(0)
        logits = model_forward(x).float()
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    return total / max(count, 1), count


def heldout_loss(model_forward: ModelForward, tokenizer_path=DEFAULT_TOKENIZER, corpus_path=CORPUS_PATH,
                 n_tokens: int | None = EVAL_SLICE_TOKENS, window: int = EVAL_WINDOW, batch_size: int = 8) -> float:
    """The fixed-slice held-out loss (``EVAL_SLICE``); ``n_tokens=None`` evaluates the whole held-out split."""
    tokens = validation_tokens(tokenizer_path, corpus_path)
    loss, _ = windowed_loss(model_forward, tokens, window=window, n_tokens=n_tokens, batch_size=batch_size)
    return loss


def main(argv: list[str] | None = None) -> int:
    from training.model import load_safetensors_model

    ap = argparse.ArgumentParser(description="held-out loss of an exported Austen model")
    ap.add_argument("model", nargs="?", default=str(DEFAULT_MODEL_DIR / "model.safetensors"))
    ap.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    ap.add_argument("--full", action="store_true", help="the whole held-out split instead of the fixed slice")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    model = load_safetensors_model(args.model)
    loss = heldout_loss(model, args.tokenizer, n_tokens=None if args.full else EVAL_SLICE_TOKENS)
    print(f"held-out loss {loss:.4f} nats/token, perplexity {math.exp(loss):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
