"""Fixtures for the HTTP tests: a tiny byte-level BPE, the app over a FakeEngine, httpx and openai clients."""
from __future__ import annotations

import contextlib
from dataclasses import replace

import httpx
import pytest

from engine import EngineConfig
from server.app import ModelInfo, create_app
from server.settings import ServerSettings, Settings
from tests.server.fake_engine import FakeEngine

CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "User: hello there\n\nAssistant: Good morning to you.",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want",
    "Élan, naïve café, déjà vu; 日本語のテキスト and emoji 🦢🦢.", "numbers 0123456789 {}[]()<>",
] * 20
MODEL = "rwkv7-test"


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="session")
def bpe_path(tmp_path_factory):
    """A ~400-token byte-level BPE with <|endoftext|> = 0, trained in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="session")
def bpe(bpe_path):
    from engine import load_tokenizer
    return load_tokenizer(str(bpe_path))


def make_settings(**server) -> Settings:
    return Settings(server=ServerSettings(**server), engine=EngineConfig(max_sessions=8, max_waiting=32,
                                                                         step_token_budget=64))


@contextlib.asynccontextmanager
async def serve(engine, settings: Settings | None = None, *, info: ModelInfo | None = None, headers=None):
    """The app with its lifespan running, and an httpx client talking to it in-process."""
    app = create_app(engine, settings or make_settings(), info or ModelInfo(name=MODEL))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost", headers=headers,
                                     timeout=30) as client:
            client.app = app
            yield client


def openai_client(http: httpx.AsyncClient, *, strict: bool = True, api_key: str = "none"):
    import openai
    return openai.AsyncOpenAI(base_url="http://localhost/v1", api_key=api_key, http_client=http, max_retries=0,
                              _strict_response_validation=strict)


@pytest.fixture
def fake(bpe):
    return FakeEngine(bpe)


@pytest.fixture
async def client(fake):
    async with serve(fake) as c:
        yield c


def sse_events(text: str) -> list:
    """The data payloads of an SSE body, JSON-decoded ([DONE] kept as the string)."""
    import json
    out = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def terminate(proc, timeout: float = 30) -> None:
    """SIGTERM a server process (it drains and exits), killing it if it has not ended in ``timeout`` s."""
    import signal
    import subprocess
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


__all__ = ["MODEL", "terminate", "make_settings", "openai_client", "replace", "serve", "sse_events"]
