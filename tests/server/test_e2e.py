"""End to end through the real ASGI app and the real AsyncEngine on a tiny random-weight RWKV-7 and a tiny BPE."""
import asyncio
import base64

import numpy as np
import pytest
import torch

from engine import AsyncEngine, EngineConfig, load_model
from bench.random_checkpoint import CheckpointShape, write_checkpoint
from tests.server.conftest import MODEL, make_settings, openai_client, serve, sse_events
from tests.server.test_lifecycle import metric, raw_call

pytestmark = pytest.mark.anyio
SHAPE = CheckpointShape(n_layer=2, n_embd=64, head_size=32, vocab_size=448, decay_lora=8, iclr_lora=8,
                        value_lora=8, gate_lora=16, logit_scale=4.0)
CONFIG = EngineConfig(max_sessions=8, max_waiting=32, step_token_budget=64, prefill_chunk=32)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("e2e") / "tiny.pth"
    write_checkpoint(path, SHAPE, seed=3)
    return load_model(path, "cpu fp32")


@pytest.fixture
async def real(model, bpe):
    engine = AsyncEngine(model, bpe, CONFIG)
    async with serve(engine, make_settings()) as c:
        c.engine = engine
        yield c


@pytest.mark.parametrize("route,body", [
    ("/v1/completions", {"prompt": "It is a truth", "max_tokens": 24}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Good morning"}], "max_tokens": 24}),
])
async def test_stream_text_equals_non_stream_at_temperature_0(real, route, body):
    body = {**body, "temperature": 0}
    whole = (await real.post(route, json=body)).json()
    events = sse_events((await real.post(route, json={**body, "stream": True})).text)
    assert events[-1] == "[DONE]"
    choices = [c for e in events[:-1] for c in e["choices"]]
    if route == "/v1/completions":
        text, expected = "".join(c["text"] for c in choices), whole["choices"][0]["text"]
    else:
        text = "".join(c["delta"].get("content", "") for c in choices)
        expected = whole["choices"][0]["message"]["content"]
    assert text == expected and len(expected) > 0
    assert [c["finish_reason"] for c in choices if c["finish_reason"]] == [whole["choices"][0]["finish_reason"]]


async def test_echo_logprobs_match_a_direct_forward_pass(real, model, bpe):
    """lm-evaluation-harness loglikelihood: token-list prompts starting with 0, echo, logprobs=1, max_tokens=1."""
    prompts = [[0] + bpe.encode("The quick brown fox"), [0] + bpe.encode("Élan, naïve café")]
    r = (await real.post("/v1/completions", json={"model": MODEL, "prompt": prompts, "temperature": 0,
                                                  "max_tokens": 1, "logprobs": 1, "seed": 1234,
                                                  "echo": True})).json()
    for choice, ids in zip(sorted(r["choices"], key=lambda c: c["index"]), prompts):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
        assert "".join(lp["tokens"]) == choice["text"] and choice["text"].startswith(bpe.decode(ids))
        with torch.no_grad():
            logits, _ = model.forward(torch.tensor([ids]), None, full_output=True)
        ref = torch.log_softmax(logits[0].double(), -1)
        want = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))] + [ref[-1].max().item()]
        assert np.allclose(lp["token_logprobs"][1:], want, atol=1e-4)
        assert lp["token_logprobs"][-1] == pytest.approx(max(lp["top_logprobs"][-1].values()))


async def test_n_and_prompt_list_indexes(real):
    body = {"prompt": [[5, 6, 7], [8, 9]], "n": 2, "max_tokens": 5, "temperature": 0.8, "seed": 3,
            "ignore_eos": True}
    r = (await real.post("/v1/completions", json=body)).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert r["usage"] == {"prompt_tokens": 5, "completion_tokens": 20, "total_tokens": 25,
                          "prompt_tokens_details": r["usage"]["prompt_tokens_details"]}
    events = sse_events((await real.post("/v1/completions", json={**body, "stream": True})).text)[:-1]
    finished = sorted(c["index"] for e in events for c in e["choices"] if c["finish_reason"])
    assert finished == [0, 1, 2, 3]
    streamed = {i: "".join(c["text"] for e in events for c in e["choices"] if c["index"] == i) for i in range(4)}
    assert streamed == {c["index"]: c["text"] for c in r["choices"]}          # same seed, same text


async def test_embeddings_float_base64_batch_and_singles(real):
    inputs = ["Good morning", "It is a truth universally acknowledged", "x"]
    floats = (await real.post("/v1/embeddings", json={"input": inputs})).json()
    b64 = (await openai_client(real, strict=False).embeddings.create(model=MODEL, input=inputs)).data
    batch = np.array([d["embedding"] for d in floats["data"]])
    assert np.allclose(batch, [d.embedding for d in b64], atol=1e-7)
    raw = (await real.post("/v1/embeddings", json={"input": inputs, "encoding_format": "base64"})).json()
    assert np.array_equal(np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), "<f4"),
                          batch[0].astype(np.float32))
    for i, text in enumerate(inputs):
        single = (await real.post("/v1/embeddings", json={"input": text})).json()["data"][0]["embedding"]
        assert np.allclose(single, batch[i], atol=1e-5)
    assert batch.shape == (3, SHAPE.n_embd) and np.allclose(np.linalg.norm(batch, axis=1), 1, atol=1e-5)
    assert floats["usage"]["prompt_tokens"] == floats["usage"]["total_tokens"] > 0


async def test_disconnect_mid_stream_returns_running_and_slots_to_zero(real):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5000, "ignore_eos": True, "n": 3,
            "stream": True, "stop": []}
    sent = await raw_call(real.app, "/v1/chat/completions", body, asyncio.Event(), frames=4)   # 3 role chunks, a token
    assert b"[DONE]" not in b"".join(m.get("body", b"") for m in sent[1:])
    for _ in range(500):
        s = real.engine.stats()
        if s.aborted_total == 1 and s.running == 0 and s.slots_used == 0:
            break
        await asyncio.sleep(0.01)
    text = (await real.get("/metrics")).text
    assert metric(text, "goose_requests_running") == 0 and metric(text, "goose_state_slots_used") == 0
    assert metric(text, "goose_http_requests_client_disconnected_total") == 1
    assert metric(text, "goose_engine_aborted_requests_total") == 1
    assert metric(text, "goose_engine_threads") == real.engine.stats().threads >= 1
    r = await real.post("/v1/completions", json={"prompt": "ok", "max_tokens": 2})
    assert r.status_code == 200


async def test_tokenizer_routes_and_eos(real, bpe):
    info = (await real.get("/tokenizer_info")).json()
    assert (await real.post("/tokenize", json={"prompt": info["eos_token"]})).json()["tokens"] == [info["eos_token_id"]]
    ids = (await real.post("/tokenize", json={"prompt": "test", "add_special_tokens": False})).json()["tokens"]
    assert (await real.post("/detokenize", json={"tokens": ids})).json()["prompt"] == "test"
