"""The shipped default model (models/rwkv7-austen) for real: through the HTTP API, in bf16, in the rwkv package."""
import asyncio
import re
from pathlib import Path

import torch

from engine import load_model
from server.serve import load_engine
from server.settings import load_settings
from tests.conftest import rel_err

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "models" / "rwkv7-austen"
COMMON = {"the", "a", "i", "you", "to", "of", "and", "is", "be", "not", "my", "he", "she", "it", "that", "in",
          "have", "am", "was", "her", "his", "me", "so", "very", "no", "yes", "sir", "do", "will", "but", "as"}


def chat(body: dict) -> dict:
    from tests.server.conftest import serve

    async def main():
        settings = load_settings(ROOT / "config.yaml")
        engine, info = load_engine(settings)
        async with serve(engine, settings, info=info) as client:
            resp = await client.post("/v1/chat/completions", json=body)
            assert resp.status_code == 200, resp.text
            return resp.json()
    return asyncio.run(main())


def test_chat_with_the_default_model_answers_in_english_and_stops():
    """Eight sampled answers (seeded, the model card's settings): English words, and each turn ends by itself.

    Greedy decoding of a 3.5M model can loop; sampling is how the chat endpoint is used."""
    out = chat({"messages": [{"role": "user", "content": "What do you think of Mr. Darcy?"}],
                "temperature": 0.8, "top_p": 0.9, "seed": 0, "n": 8, "max_tokens": 80})
    assert out["model"] == "rwkv7-austen" and len(out["choices"]) == 8
    stopped = [c for c in out["choices"] if c["finish_reason"] == "stop"]
    assert len(stopped) >= 6, [c["finish_reason"] for c in out["choices"]]
    words = [w for c in out["choices"] for w in re.findall(r"[A-Za-z']+", c["message"]["content"].lower())]
    assert len(words) >= 16 and len(COMMON & set(words)) >= 4, [c["message"]["content"] for c in out["choices"]]
    assert all("\n\n" not in c["message"]["content"] for c in stopped)


def test_bf16_top1_agreement_on_the_trained_model():
    fp = load_model(MODEL_DIR, "cpu fp32")
    bf = load_model(MODEL_DIR, "cpu bf16")
    toks = torch.randint(1, fp.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
    a, _ = fp.forward(toks, None, full_output=True)
    b, _ = bf.forward(toks, None, full_output=True)
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    print(f"default model, bf16 vs fp32: top-1 agreement {agree:.4f}, max deviation {rel_err(b, a):.4f}")
    assert agree >= 0.99


def test_official_rwkv_package_loads_our_converted_pth(tmp_path):
    """goose convert -> .pth -> rwkv==0.8.32 gives the same logits as our engine."""
    from rwkv.model import RWKV

    from engine.formats.convert import main as convert
    assert convert([str(MODEL_DIR / "model.safetensors"), str(tmp_path / "austen.pth"), "-q"]) == 0
    ours = load_model(MODEL_DIR, "cpu fp32")
    theirs = RWKV(str(tmp_path / "austen"), "cpu fp32")
    tokens = torch.randint(1, ours.config.vocab_size, (100,), generator=torch.Generator().manual_seed(1)).tolist()
    expected, _ = theirs.forward(tokens, None, full_output=True)
    logits, _ = ours.forward(torch.tensor([tokens]), None, full_output=True)
    assert rel_err(logits[0], expected.float()) <= 1e-4
    assert (logits[0].argmax(-1) == expected.argmax(-1)).all()
