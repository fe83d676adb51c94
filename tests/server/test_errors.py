"""Every error path: OpenAI error shape and status, limits answered fast with 4xx, the server healthy afterwards."""
import openai
import pytest

from engine import EngineConfig, EngineDead, Overloaded, RequestFailed
from tests.server.fake_engine import FakeEngine
from tests.server.conftest import MODEL, make_settings, openai_client, serve, sse_events

pytestmark = pytest.mark.anyio
CHAT = [{"role": "user", "content": "Hello"}]


def _error(r, status, param=None, code=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in r.text and "/work/" not in r.text and "detail" not in body
    if param is not None:
        assert body["error"]["param"] == param, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


LIMITS = [  # (route, body, param) -> 400
    ("/v1/completions", {"prompt": "x", "n": 17}, "n"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**6}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "temperature": 2.5}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "stop": ["s"] * 17}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": "s" * 257}, "stop"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"100000": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "seed": 2**63}, "seed"),
    ("/v1/completions", {"prompt": [1, 100000]}, "prompt"),
    ("/v1/completions", {"prompt": [-1]}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [[]]}, "prompt"),
    ("/v1/completions", {"prompt": ["a"] * 257}, "prompt"),
    ("/v1/completions", {"prompt": ["a"] * 20, "n": 2}, "n"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix"),
    ("/v1/completions", {}, "prompt"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, None),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "xml"}}, "response_format.type"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function"}]}, "tools[0].function"),
    ("/v1/chat/completions", {"messages": CHAT, "tool_choice": "sometimes"}, "tool_choice"),
    ("/v1/chat/completions", {"messages": CHAT, "stop": [str(i) for i in range(15)]}, "stop"),
    ("/v1/embeddings", {"input": []}, "input"),
    ("/v1/embeddings", {"input": [[]]}, "input"),
    ("/v1/embeddings", {"input": "x", "dimensions": 10**6}, "dimensions"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": "x", "logprobs": False}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "temperature": "0.5"}, "temperature"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": 1}, "logprobs"),
    ("/detokenize", {"tokens": [10**6]}, "tokens"),
]


@pytest.mark.parametrize("route,body,param", LIMITS)
async def test_limits_and_validation_are_400(client, fake, route, body, param):
    _error(await client.post(route, json=body), 400, param)
    assert not fake.active
    assert (await client.post("/v1/completions", json={"prompt": "ok", "max_tokens": 1})).status_code == 200


async def test_prompt_token_cap_is_context_length_exceeded(client, fake):
    cap = fake.config.max_prompt_tokens
    _error(await client.post("/v1/completions", json={"prompt": [1] * (cap + 1)}), 400, "prompt",
           "context_length_exceeded")


async def test_body_shapes_and_content_types(client):
    for content, ctype in [(b"[1, 2]", "application/json"), (b"{bad", "application/json"), (b'"x"', None),
                           (b"{}", "text/plain"), (b"", "application/json")]:
        headers = {"content-type": ctype} if ctype else {}
        _error(await client.post("/v1/chat/completions", content=content, headers=headers), 400)


async def test_routing_errors(client):
    _error(await client.get("/v1/nope"), 404, code="not_found")
    _error(await client.delete("/v1/completions"), 405, code="method_not_allowed")
    e = _error(await client.post("/v1/completions", json={"prompt": "x", "model": "gpt-4"}), 404, "model",
               "model_not_found")
    assert "gpt-4" in e["message"]
    with pytest.raises(openai.NotFoundError):
        await openai_client(client).chat.completions.create(model="nope", messages=CHAT)


async def test_body_limit_413(fake):
    async with serve(fake, make_settings(max_body_bytes=2048)) as c:
        _error(await c.post("/v1/completions", json={"prompt": "x" * 4000}), 413, code="payload_too_large")

        async def chunks():
            for _ in range(10):
                yield b" " * 500
        _error(await c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"}), 413)
        assert (await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})).status_code == 200


async def test_overloaded_is_429_with_retry_after(client, fake):
    fake.fail_submit = Overloaded("queue full", retry_after=2.0)
    r = await client.post("/v1/completions", json={"prompt": "x"})
    _error(r, 429, code="overloaded")
    assert r.headers["retry-after"] == "2"
    with pytest.raises(openai.RateLimitError):
        await openai_client(client).completions.create(model=MODEL, prompt="x")
    fake.fail_submit = None
    assert (await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})).status_code == 200


async def test_engine_dead_is_503_not_retried(client, fake):
    fake.dead = True
    r = await client.post("/v1/chat/completions", json={"messages": CHAT})
    _error(r, 503, code="engine_dead")
    assert r.headers["x-should-retry"] == "false"
    _error(await client.get("/health"), 503)
    fake.dead = False
    fake.fail_submit = EngineDead("gone")
    _error(await client.post("/v1/embeddings", json={"input": "x"}), 503)


async def test_failure_after_stream_start_is_an_error_event(client, fake):
    fake.fail_after = 2
    r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 10, "stream": True})
    events = sse_events(r.text)
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert events[-2]["error"]["type"] == "server_error" and events[-2]["error"]["code"] == "request_failed"
    assert sum(1 for e in events[:-2] if e["choices"]) == 2
    with pytest.raises(openai.APIError):
        stream = await openai_client(client).chat.completions.create(model=MODEL, messages=CHAT, stream=True)
        async for _ in stream:
            pass
    r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 10})
    _error(r, 500, code="request_failed")
    assert r.headers["x-should-retry"] == "false"


async def test_unexpected_exceptions_are_opaque_500(client, fake):
    fake.fail_submit = RuntimeError("boom at 0x7f00deadbeef in /work/main/secret.py")
    e = _error(await client.post("/v1/completions", json={"prompt": "x"}), 500, code="internal_error")
    assert e["message"] == "internal server error"
    fake.fail_submit = RequestFailed("failed near 0x7f00deadbeef reading /home/me/weights.pth")
    e = _error(await client.post("/v1/completions", json={"prompt": "x"}), 500)
    assert "0x7f00" not in e["message"] and "/home/me" not in e["message"]


# Each rule the engine owns, through HTTP: one status, one code, the param it names. (The FakeEngine runs the
# engine's own validation, engine.async_engine.validate_request.)
RULES = [  # (route, body, status, code, param)
    ("/v1/completions", {"prompt": [1] * 257}, 400, "context_length_exceeded", "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "fox " * 300}]}, 400,
     "context_length_exceeded", "messages"),
    ("/v1/embeddings", {"input": [[1] * 257]}, 400, "context_length_exceeded", "input"),
    ("/v1/embeddings", {"input": "fox " * 300}, 400, "context_length_exceeded", "input"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**6}, 400, "invalid_value", "max_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 10**6}, 400, "invalid_value", "max_tokens"),
    ("/v1/completions", {"prompt": [1, 100000]}, 400, "invalid_value", "prompt"),
    ("/v1/embeddings", {"input": [[1, 100000]]}, 400, "invalid_value", "input"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"100000": 1}}, 400, "invalid_value", "logit_bias"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [100000]}, 400, "invalid_value", "stop_token_ids"),
    ("/v1/completions", {"prompt": "x", "n": 9}, 400, "invalid_value", "n"),
    ("/v1/chat/completions", {"messages": CHAT, "stop": [str(i) for i in range(15)]}, 400, "invalid_value", "stop"),
    ("/v1/completions", {"prompt": "x", "seed": 2**53}, 400, "invalid_value", "seed"),
]


@pytest.mark.parametrize("route,body,status,code,param", RULES, ids=lambda v: v if isinstance(v, str) else None)
async def test_each_engine_rule_has_one_status_and_code(bpe, route, body, status, code, param):
    fake = FakeEngine(bpe, EngineConfig(max_sessions=8, max_waiting=32, step_token_budget=64, max_prompt_tokens=256))
    async with serve(fake) as client:
        error = _error(await client.post(route, json=body), status, param, code)
    assert error["type"] == "invalid_request_error" and not fake.active


async def test_queue_full_is_429_before_tokenizing(client, fake):
    fake.fail_submit = None
    streams = [await fake.submit(__import__("engine").GenerateRequest([1], __import__("engine").SamplingParams(
        max_tokens=64))) for _ in range(fake.config.max_sessions + fake.config.max_waiting)]
    r = await client.post("/v1/completions", json={"prompt": "x"})
    _error(r, 429, None, "overloaded")
    assert int(r.headers["retry-after"]) >= 1
    for s in streams:
        await s.aclose()
