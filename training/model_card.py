"""Write ``models/rwkv7-austen/README.md`` (the model card) from ``goose.json`` and freshly generated samples.

    python -m training.model_card [MODEL_DIR]

    python -m training.model_card --serve [MODEL_DIR]     # samples through `goose serve` over HTTP (the card's)

With ``--serve``, the samples come from the server: ``goose serve`` is started on a free loopback port with the
model directory, the prose prompt goes to /v1/completions and the chat prompt to /v1/chat/completions, greedy
(temperature 0) and sampled (temperature 0.8, top-p 0.9, seed 0). Without it they come from the training-side
model (``training.model.RWKV7``), full-sequence forward per token from a zero state. Either way prompts are
preceded by ``<|endoftext|>`` (id 0), as every training document is.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from training.eval import DEFAULT_MODEL_DIR

PROSE_PROMPT = "The next morning, Elizabeth"
CHAT_QUESTION = "What do you think of Mr. Darcy?"
CHAT_PROMPT = f"User: {CHAT_QUESTION}\n\nAssistant:"
SAMPLE_TEMPERATURE = 0.8
SAMPLE_TOP_P = 0.9
SAMPLE_SEED = 0


def generate_samples(model_dir: Path = DEFAULT_MODEL_DIR, prose_tokens: int = 120, chat_tokens: int = 80) -> dict:
    from tokenizers import Tokenizer

    from training.model import load_safetensors_model

    model_dir = Path(model_dir)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    model = load_safetensors_model(model_dir / "model.safetensors")
    meta = json.loads((model_dir / "goose.json").read_text())
    stops = tuple(meta.get("stop", ["\n\n"]))

    def dec(ids):
        return tok.decode(ids)

    out = {}
    for kind, prompt, n, stop_text in (("prose", PROSE_PROMPT, prose_tokens, None),
                                       ("chat", CHAT_PROMPT, chat_tokens, stops)):
        ids = [0] + tok.encode(prompt).ids
        for mode in ("greedy", "sampled"):
            gen = torch.Generator().manual_seed(SAMPLE_SEED)
            new = model.generate(ids, n, temperature=0.0 if mode == "greedy" else SAMPLE_TEMPERATURE,
                                 top_p=SAMPLE_TOP_P, stop_text=stop_text, decode=dec, generator=gen)
            text = dec(new)
            if stop_text:
                for s in stop_text:
                    text = text.split(s)[0]
            out[f"{kind}_{mode}"] = {"prompt": prompt, "completion": text}
    return out


def generate_samples_http(base_url: str, prose_tokens: int = 120, chat_tokens: int = 80) -> dict:
    """The same four samples through a running `goose serve` (OpenAI-compatible HTTP API)."""
    import httpx

    out = {}
    with httpx.Client(base_url=base_url, timeout=120) as http:
        for mode in ("greedy", "sampled"):
            knobs = ({"temperature": 0} if mode == "greedy" else
                     {"temperature": SAMPLE_TEMPERATURE, "top_p": SAMPLE_TOP_P, "seed": SAMPLE_SEED})
            r = http.post("/v1/completions", json={"prompt": "<|endoftext|>" + PROSE_PROMPT,
                                                    "max_tokens": prose_tokens, **knobs})
            r.raise_for_status()
            out[f"prose_{mode}"] = {"prompt": PROSE_PROMPT, "completion": r.json()["choices"][0]["text"]}
            r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": CHAT_QUESTION}],
                                                         "max_tokens": chat_tokens, **knobs})
            r.raise_for_status()
            choice = r.json()["choices"][0]
            out[f"chat_{mode}"] = {"prompt": CHAT_PROMPT, "completion": choice["message"]["content"],
                                   "finish_reason": choice["finish_reason"]}
    return out


def samples_from_server(model_dir: Path) -> dict:
    """Start `goose serve` on a free loopback port for ``model_dir``, collect the samples, stop it (SIGTERM)."""
    import os
    import socket
    import subprocess
    import time

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "server", "--model", str(model_dir), "--port", str(port)],
                            env={**os.environ, "GOOSE_CONFIG": ""}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"goose serve exited: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.5)
        return generate_samples_http(url)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _quote(text: str) -> str:
    return "\n".join("> " + line if line else ">" for line in text.split("\n"))


SERVED = ("These come from `goose serve` over HTTP (`python -m training.model_card --serve`): the prose prompt "
          "through `/v1/completions` (preceded by `<|endoftext|>`), the chat question through "
          "`/v1/chat/completions` with the model's chat template.")
TRAIN_SIDE = ("These come from the training-side model (`training/model.py`, full-sequence forward from a zero "
              "state, prompt preceded by `<|endoftext|>`).")


def render_card(meta: dict, samples: dict, served: bool = False) -> str:
    t = meta["training"]
    hp = t.get("hyperparameters", {})
    L, C, N, V, F = t["n_layer"], t["n_embd"], t["head_size"], t["vocab_size"], t["dim_ffn"]
    mb = t["params"] * (4 if t["dtype"] == "fp32" else 2) / 1e6
    lines = [
        f"# {meta['name']}",
        "",
        "A tiny RWKV-7 (x070, \"Goose\") language model trained from scratch on Jane Austen's six novels, on two CPU "
        "cores. It is Goose's embedded default model: small enough to ship in the repository and to run anywhere, "
        "and good enough to show that the server, the tokenizer and the chat template work end to end. It writes "
        "Austen-flavoured English with her names and dialogue punctuation; it has no world knowledge and no "
        "global coherence.",
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | RWKV-7 x070, {L} layers, d_model {C}, head size {N} ({C // N} heads), FFN {F} |",
        f"| parameters | {t['params']:,} ({t['params'] / 1e6:.2f}M) |",
        f"| weights | `model.safetensors`, {t['dtype']}, {mb:.1f} MB, official BlinkDL key names and shapes |",
        f"| tokenizer | `tokenizer.json`: byte-level BPE, {V} tokens, `<|endoftext|>` = id 0 (document separator) |",
        f"| training context | {t['ctx_len']} tokens (a recurrent model: longer inputs work, quality fades) |",
        "| chat format | `User: ...\\n\\nAssistant: ...\\n\\n`; generation prompt `Assistant:`; stop on `\\n\\n` |",
        "",
        "`goose.json` holds the metadata the server reads (chat roles, stop strings, end-of-text id) and the "
        "training figures below. The GroupNorm (`ln_x`) epsilon is 64e-5, as rwkv-pip and llama.cpp hard-code it, "
        "so the weights load unchanged in the `rwkv` pip package as well.",
        "",
        "## Data",
        "",
        "- Corpus: *Emma*, *Mansfield Park*, *Northanger Abbey*, *Persuasion*, *Pride and Prejudice*, *Sense and "
        "Sensibility* (public domain), from Debian's `r-cran-janeaustenr` 1.0.0 (MIT), extracted with "
        "`training/extract_corpus.py` (hard-wrapped lines unwrapped into paragraphs, `_italic_` underscores "
        "removed) and committed as `training/data/austen.txt.xz` (4.0 MB of text, 718k words).",
        "- Split: the last 3% of each novel (cut at the next paragraph break) is held out for validation; the "
        "tokenizer, the chat pairs and the model only ever saw the first 97%.",
        f"- Chat: consecutive lines of dialogue by different speakers become `User:`/`Assistant:` pairs "
        f"(`training/chat_data.py`); {round(t['chat_fraction'] * 100)}% of the training windows are drawn from them, "
        "so the model learns to answer and to end its turn with a blank line.",
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        f"| machine | {t['machine']} |",
        f"| exported checkpoint | step {t['steps']:,}, {t['tokens_seen'] / 1e6:.2f}M tokens seen, "
        f"{t['wall_minutes']:.1f} minutes of wall-clock training |",
        f"| whole run | {t['total_steps_run']:,} steps, {t['total_wall_minutes']:.1f} minutes, "
        f"{t.get('tokens_per_second', 0):,} tokens/s (forward + backward + AdamW, evaluations included); the "
        "exported checkpoint is the one with the best held-out loss |",
        f"| optimiser | AdamW, betas {tuple(hp.get('betas', (0.9, 0.99)))}, weight decay "
        f"{hp.get('weight_decay', 0.1)} on weight matrices only, gradient clipping {hp.get('grad_clip', 1.0)} |",
        f"| schedule | peak lr {hp.get('lr', '?')}, {hp.get('warmup_steps', '?')} warmup steps, cosine decay to "
        f"{hp.get('lr_min', '?')} at step {hp.get('max_steps', '?')}; batch {hp.get('batch_size', '?')} x "
        f"{hp.get('ctx_len', '?')} tokens; every hyperparameter is in `{t.get('config', 'training/austen.yaml')}` |",
        "",
        "![loss curve](loss.png)",
        "",
        "## Evaluation",
        "",
        "| held-out text | loss (nats/token) | perplexity |",
        "|---|---|---|",
        f"| whole validation split ({t.get('val_description', '')}) | {t['val_loss']:.4f} | {t['val_ppl']:.2f} |",
        f"| fixed slice (below) | {t['eval_slice_loss']:.4f} | {t['eval_slice_ppl']:.2f} |",
        "",
        f"Fixed slice: {t['eval_slice'].replace('<|endoftext|>', '`<|endoftext|>`')}.",
        "",
        "The fixed slice takes a few seconds on a CPU; `tests/test_training.py` recomputes it from the committed "
        "weights and checks it against `goose.json`. Recompute by hand: `python -m training.eval`.",
        "",
        "## Samples",
        "",
        (SERVED if served else TRAIN_SIDE) + " \"Sampled\" is temperature "
        f"{SAMPLE_TEMPERATURE}, top-p {SAMPLE_TOP_P}, seed {SAMPLE_SEED}.",
        "",
    ]
    for kind, title in (("prose", "Prose"), ("chat", "Chat")):
        for mode in ("greedy", "sampled"):
            s = samples[f"{kind}_{mode}"]
            lines += [f"**{title}, {mode}.** Prompt: `{json.dumps(s['prompt'])[1:-1]}`", ""]
            lines += [_quote(s["prompt"] + s["completion"]), ""]
    lines += [
        "## Reproduce",
        "",
        "```",
        "python -m training.extract_corpus /path/to/unpacked/r-cran-janeaustenr   # optional: the text is committed",
        "python -m training.train_tokenizer",
        "python -m training.train --config training/austen.yaml                  # or: goose train --config ...",
        "```",
        "",
        "The schedule is step-based and seeded, and a resumed run repeats the uninterrupted one bit for bit "
        "(checked by `tests/test_training.py`), so a rerun with the same torch version and thread count should "
        "retrace this run; `--max-minutes` and early stopping only decide where it stops.",
        "",
        "## Limitations and license",
        "",
        "A 3.5M-parameter model trained for minutes: it imitates the surface of Austen's prose and dialogue, "
        "contradicts itself, and ignores the content of questions beyond a few words. Do not use it for anything "
        "but demos and tests. The novels are in the public domain; the extraction package is MIT-licensed; the "
        "weights are released under the project's license.",
        "",
    ]
    return "\n".join(lines)


def write_card(model_dir: Path = DEFAULT_MODEL_DIR, served: bool = False) -> Path:
    model_dir = Path(model_dir)
    meta = json.loads((model_dir / "goose.json").read_text())
    samples = samples_from_server(model_dir) if served else generate_samples(model_dir)
    (model_dir / "samples.json").write_text(json.dumps(samples, indent=2) + "\n")
    path = model_dir / "README.md"
    path.write_text(render_card(meta, samples, served=served))
    return path


if __name__ == "__main__":
    torch.set_num_threads(2)
    args = [a for a in sys.argv[1:] if a != "--serve"]
    print(write_card(Path(args[0]) if args else DEFAULT_MODEL_DIR, served="--serve" in sys.argv[1:]))
