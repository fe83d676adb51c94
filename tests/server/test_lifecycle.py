"""Disconnects, deadlines, drain, loading, auth, CORS, Host guard and metrics counts (FakeEngine, in-process)."""
import asyncio
import json
import re
import threading

import openai
import pytest

from engine import ModelLoadError
from server.app import ModelInfo, create_app
from tests.server.conftest import MODEL, make_settings, openai_client, serve, sse_events
from tests.server.fake_engine import FakeEngine

pytestmark = pytest.mark.anyio
CHAT = [{"role": "user", "content": "Hello"}]


def metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if m and ",".join(sorted((m.group(1) or "").split(","))) == want:
            return float(m.group(2))
    return 0.0


async def raw_call(app, path: str, body: dict, disconnect: asyncio.Event, frames: int = 1):
    """Call the ASGI app directly; the client 'disconnects' when the event is set or after so many SSE frames."""
    messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]
    sent = []

    async def receive():
        if messages:
            return messages.pop(0)
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if sum(b"data:" in m.get("body", b"") for m in sent if m["type"] == "http.response.body") >= frames:
            disconnect.set()

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"host", b"localhost"), (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
    await asyncio.wait_for(app(scope, receive, send), 10)
    return sent


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_aborts_and_frees_slots(bpe, stream):
    fake = FakeEngine(bpe, delay=0.01)
    async with serve(fake) as c:
        gone = asyncio.Event()
        if not stream:
            asyncio.get_running_loop().call_later(0.1, gone.set)
        body = {"messages": CHAT, "max_tokens": 5000, "ignore_eos": True, "stream": stream}
        sent = await raw_call(c.app, "/v1/chat/completions", body, gone)
        assert len(fake.aborted) == 1 and not fake.active
        if stream:
            assert sent[0]["status"] == 200 and not any(b"[DONE]" in m.get("body", b"") for m in sent)
        text = (await c.get("/metrics")).text
        assert metric(text, "goose_http_requests_client_disconnected_total") == 1
        assert metric(text, "goose_requests_running") == 0 and metric(text, "goose_state_slots_used") == 0
        assert metric(text, "goose_state_slots_free") == fake.config.max_sessions


async def test_request_timeout_finishes_with_length(bpe):
    fake = FakeEngine(bpe, delay=0.01)
    async with serve(fake, make_settings(request_timeout=0.1)) as c:
        r = (await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 5000, "n": 2})).json()
        assert [ch["finish_reason"] for ch in r["choices"]] == ["length", "length"]
        assert 0 < r["usage"]["completion_tokens"] < 200 and not fake.active


async def test_drain_lets_short_requests_finish_and_ends_long_ones(bpe):
    fake = FakeEngine(bpe, delay=0.01)
    async with serve(fake) as c:
        state = c.app.state.goose
        long = asyncio.ensure_future(c.post("/v1/completions", json={"prompt": "x", "max_tokens": 5000,
                                                                     "stream": True, "ignore_eos": True}))
        short = asyncio.ensure_future(c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3}))
        while len(fake.submitted) < 2:
            await asyncio.sleep(0.005)
        drain = asyncio.ensure_future(state.drain(timeout=0.3))
        await asyncio.sleep(0.01)
        refused = await c.post("/v1/completions", json={"prompt": "x"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        assert int(refused.headers["retry-after"]) >= 1
        assert (await c.get("/ready")).status_code == 503 and (await c.get("/health")).status_code == 200
        await drain
        assert (await short).json()["choices"][0]["finish_reason"] == "length"
        events = sse_events((await long).text)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "shutting_down"


async def test_loading_then_ready_and_load_failure(bpe):
    go = threading.Event()

    def loader():
        go.wait(10)
        return FakeEngine(bpe), ModelInfo(name=MODEL)

    async with serve(loader) as c:
        for path in ("/health", "/ready", "/v1/models"):
            r = await c.get(path)
            assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        go.set()
        for _ in range(200):
            if (await c.get("/ready")).status_code == 200:
                break
            await asyncio.sleep(0.01)
        assert (await c.get("/health")).json() == {"status": "ok"}

    def broken():
        raise ModelLoadError("/secret/dir/model.pth: truncated file")

    async with serve(broken) as c:
        for _ in range(200):
            r = await c.get("/health")
            if "failed" in r.text:
                break
            await asyncio.sleep(0.01)
        assert r.status_code == 503 and "truncated" in r.text and "/secret" not in r.text


async def test_auth_guards_every_route_but_health_and_the_page(fake):
    settings = make_settings(api_keys=("sekrit-1", "sekrit-2"))
    app = create_app(fake, settings, ModelInfo(name=MODEL))
    async with serve(FakeEngine(fake.tokenizer), settings) as c:
        routes = [sub for r in app.routes for sub in getattr(getattr(r, "original_router", None), "routes", [r])]
        paths = {(r.path.replace("{model_id:path}", MODEL), m) for r in routes for m in r.methods if m != "HEAD"}
        assert len(paths) >= 11
        for path, method in sorted(paths):
            for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Bearer wrong"},
                            {"Authorization": "Basic sekrit-1"}, {"Authorization": "Bearer SEKRIT-1"}):
                r = await c.request(method, path, headers=headers, json={})
                if path == "/health" or (path, method) == ("/", "GET"):   # the chat page asks for a key itself
                    assert r.status_code == 200
                else:
                    assert r.status_code == 401, (path, headers)
                    assert r.headers["www-authenticate"] == "Bearer"
                    assert r.json()["error"]["type"] == "authentication_error"
            ok = await c.request(method, path, headers={"Authorization": "Bearer sekrit-2"}, json={})
            assert ok.status_code != 401
        with pytest.raises(openai.AuthenticationError):
            await openai_client(c, api_key="nope").models.list()
        assert (await openai_client(c, api_key="sekrit-1").models.list()).data[0].id == MODEL


async def test_no_auth_accepts_lm_evals_empty_bearer(client):
    r = await client.get("/v1/models", headers={"Authorization": "Bearer "})
    assert r.status_code == 200


async def test_cors_off_by_default_and_allowlist(fake):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os"}
    async with serve(fake) as c:
        r = await c.options("/v1/chat/completions", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
        r = await c.get("/v1/models", headers={"Origin": "https://app.example"})
        assert "access-control-allow-origin" not in r.headers
    async with serve(FakeEngine(fake.tokenizer), make_settings(cors_origins=("https://app.example",),
                                                               api_keys=("k",))) as c:
        r = await c.options("/v1/chat/completions", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-stainless-os" in r.headers["access-control-allow-headers"].lower()
        r = await c.options("/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        r = await c.get("/v1/models", headers={"Origin": "https://app.example"})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://app.example"


async def test_host_header_guard(fake):
    async with serve(fake) as c:
        for host in ("localhost", "127.0.0.1:8000", "[::1]:8000"):
            assert (await c.get("/v1/models", headers={"Host": host})).status_code == 200
        r = await c.get("/v1/models", headers={"Host": "attacker.example"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"
    async with serve(FakeEngine(fake.tokenizer), make_settings(host="0.0.0.0")) as c:
        assert (await c.get("/v1/models", headers={"Host": "my-box.lan"})).status_code == 200
    async with serve(FakeEngine(fake.tokenizer), make_settings(allowed_hosts=("goose.internal",))) as c:
        assert (await c.get("/v1/models", headers={"Host": "goose.internal:80"})).status_code == 200
        assert (await c.get("/v1/models", headers={"Host": "localhost"})).status_code == 400


async def test_metrics_counts(client, fake):
    for _ in range(3):
        await client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4})
    await client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, "stream": True})
    await client.post("/v1/completions", json={"prompt": "x", "n": 99})
    text = (await client.get("/metrics")).text
    assert metric(text, "goose_http_requests_total", route="/v1/completions", method="POST", status="200") == 3
    assert metric(text, "goose_http_requests_total", route="/v1/completions", method="POST", status="400") == 1
    assert metric(text, "goose_http_requests_total", route="/v1/chat/completions", method="POST", status="200") == 1
    assert metric(text, "goose_generation_tokens_total") == 14
    assert metric(text, "goose_request_success_total", finished_reason="length") == 4
    assert metric(text, "goose_prompt_tokens_total") == 3 * len(fake.tokenizer.encode("hello")) + \
        len(fake.submitted[-1].prompt_tokens)
    assert metric(text, "goose_time_to_first_token_seconds_count") == 4
    assert metric(text, "goose_e2e_request_latency_seconds_count") == 4
    assert metric(text, "goose_inter_token_latency_seconds_count") == 3 * 3 + 1
    assert metric(text, "goose_requests_running") == 0
    assert metric(text, "goose_requests_rejected_total", reason="invalid_value") == 1


async def test_frozen_client_is_dropped(bpe, monkeypatch):
    """A client that keeps the connection but stops reading: the blocked send times out and the request aborts."""
    from server import sse
    monkeypatch.setattr(sse, "SEND_TIMEOUT", 0.2)
    fake = FakeEngine(bpe, delay=0.005)
    async with serve(fake) as c:
        never = asyncio.Event()
        frames = []
        messages = [{"type": "http.request", "body": json.dumps({"prompt": "x", "max_tokens": 5000, "stream": True,
                                                                 "ignore_eos": True}).encode()}]

        async def receive():
            return messages.pop(0) if messages else await never.wait()

        async def send(message):
            frames.append(message)
            if len(frames) > 3:
                await never.wait()                # the client's window is full: this send never completes

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
                 "root_path": "", "headers": [(b"host", b"localhost"), (b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 50001), "server": ("127.0.0.1", 8000)}
        await asyncio.wait_for(c.app(scope, receive, send), 5)
        assert fake.aborted and not fake.active
        assert metric((await c.get("/metrics")).text, "goose_http_requests_client_disconnected_total") == 1
