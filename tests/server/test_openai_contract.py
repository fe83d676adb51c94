"""The OpenAI surface through the real ASGI app and a FakeEngine: the official SDK (strict where its types allow)
and raw httpx for what the SDK hides (SSE framing, null first logprobs, extension routes)."""
import base64
import json

import numpy as np
import openai
import pytest

from tests.server.conftest import MODEL, openai_client, serve, sse_events

pytestmark = pytest.mark.anyio
CHAT = [{"role": "user", "content": "Hello"}]


async def test_chat_non_stream_strict(client, fake):
    oc = openai_client(client)
    r = await oc.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0, seed=1, user="u")
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.refusal is None and choice.logprobs is None
    assert choice.finish_reason == "length" and r.usage.completion_tokens == 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6
    assert choice.message.content == fake.tokenizer.decode(fake.script[:6])
    sent = fake.submitted[-1]
    assert sent.prompt_tokens[0] == fake.tokenizer.eot_id            # the chat prompt starts with end-of-text
    assert fake.tokenizer.decode(sent.prompt_tokens[1:]) == "User: Hello\n\nAssistant:"
    assert set(sent.params.stop) >= {"\n\n", "\nUser:"} and sent.params.seed == 1


async def test_chat_stream_strict_roles_finish_usage(client):
    oc = openai_client(client)
    stream = await oc.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, n=2, stream=True,
                                              stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert len({c.id for c in chunks}) == 1
    for i in range(2):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert mine[0].delta.role == "assistant" and mine[0].delta.content == ""
        assert all(c.delta.role is None for c in mine[1:])
        assert [c.finish_reason for c in mine].count("length") == 1 and mine[-1].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])


async def test_chat_stream_equals_non_stream_and_raw_framing(client):
    body = {"messages": CHAT, "max_tokens": 40, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    whole = (await client.post("/v1/chat/completions", json=body)).json()
    raw = await client.post("/v1/chat/completions", json={**body, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.endswith("data: [DONE]\n\n") and "\r" not in raw.text
    events = sse_events(raw.text)
    assert events[-1] == "[DONE]" and all(e["usage"] is None for e in events[:-1])
    assert "role" not in json.dumps([e["choices"][0]["delta"] for e in events[1:-1]])
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    message = whole["choices"][0]["message"]
    assert text == message["content"] and whole["choices"][0]["finish_reason"] == "stop"   # stopped at "\n\n"
    content = whole["choices"][0]["logprobs"]["content"]
    assert "".join(t["token"] for t in content).startswith(message["content"])
    assert all(len(t["top_logprobs"]) == 2 and bytes(t["bytes"]).decode("utf-8", "replace") for t in content)


async def test_chat_top_logprobs_zero_gives_empty_lists(client):
    r = await openai_client(client).chat.completions.create(messages=CHAT, model=MODEL, max_tokens=3,
                                                            logprobs=True, top_logprobs=0)
    assert [t.top_logprobs for t in r.choices[0].logprobs.content] == [[], [], []]


async def test_max_completion_tokens_wins_and_model_may_be_omitted(client, fake):
    r = await client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 9, "max_completion_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    r = await client.post("/v1/completions", json={"prompt": "x"})
    assert r.status_code == 200 and fake.submitted[-1].params.max_tokens == fake.config.default_max_tokens


async def test_completion_strict_and_fields_reach_the_engine(client, fake):
    oc = openai_client(client)
    r = await oc.completions.create(model=MODEL, prompt="Once", max_tokens=4, temperature=0.5, top_p=0.9,
                                    presence_penalty=0.5, frequency_penalty=0.25, logit_bias={"5": -100},
                                    seed=7, stop=["zzz"], logprobs=3, user="me",
                                    extra_body={"top_k": 5, "min_p": 0.1, "penalty_decay": 0.99})
    p = fake.submitted[-1].params
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.penalty_decay) == (0.5, 0.9, 5, 0.1, 0.99)
    assert (p.presence_penalty, p.frequency_penalty, p.logit_bias, p.seed, p.stop) == (0.5, 0.25, ((5, -100.0),), 7,
                                                                                        ("zzz",))
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 4 and "".join(lp.tokens) == r.choices[0].text
    assert all(len(top) <= 4 and tok in top for tok, top in zip(lp.tokens, lp.top_logprobs))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]


async def test_completion_echo_logprobs_alignment(client, fake):
    prompt = "Élan café"
    r = (await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2, "echo": True,
                                                    "logprobs": 1, "temperature": 0})).json()
    c = r["choices"][0]
    lp = c["logprobs"]
    n_prompt = len(fake.tokenizer.encode(prompt))
    assert c["text"].startswith(prompt) and "".join(lp["tokens"]) == c["text"]
    assert "".join(lp["tokens"][:n_prompt]) == prompt
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(x, float) for x in lp["token_logprobs"][1:])
    assert len(lp["tokens"]) == n_prompt + 2 == len(lp["text_offset"]) == len(lp["top_logprobs"])
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]


async def test_lm_eval_shapes(client, fake):
    """loglikelihood: token-list prompts (starting with id 0) with echo, logprobs=1, max_tokens=1; generate_until
    with more than 4 stops including the eos string; the tokenizer routes it uses."""
    info = (await client.get("/tokenizer_info")).json()
    assert info["eos_token"] == "<|endoftext|>" and info["eos_token_id"] == 0
    ids = (await client.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False})).json()
    assert ids["tokens"] == [0] and ids["count"] == 1
    t = (await client.post("/tokenize", json={"content": "test", "add_special": True})).json()["tokens"]
    assert (await client.post("/detokenize", json={"tokens": t})).json() == {"prompt": "test", "content": "test"}
    prompts = [[0] + fake.tokenizer.encode("The quick"), [0] + fake.tokenizer.encode("brown fox jumps")]
    body = {"model": MODEL, "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}
    r = (await client.post("/v1/completions", json=body)).json()
    assert [c["index"] for c in r["choices"]] == [0, 1]
    for c, ids in zip(r["choices"], prompts):
        assert [s.prompt_tokens for s in fake.submitted[-2:]][c["index"]] == ids       # never re-tokenized
        lp = c["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
        assert all(max(top.values()) >= x for top, x in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:]))
    gen = {"prompt": [prompts[0]], "max_tokens": 8, "temperature": 0, "seed": 1234,
           "stop": ["\n\n", "Q:", "A:", "###", "<|endoftext|>"]}
    r = await client.post("/v1/completions", json=gen)
    assert r.status_code == 200 and len(fake.submitted[-1].params.stop) == 5


async def test_n_and_prompt_list_indexes(client):
    r = (await client.post("/v1/completions", json={"prompt": ["a", "b", "c"], "n": 2, "max_tokens": 3})).json()
    assert [c["index"] for c in r["choices"]] == list(range(6))
    assert r["usage"]["completion_tokens"] == 18
    raw = await client.post("/v1/completions", json={"prompt": [[1, 2], [3]], "n": 2, "max_tokens": 2,
                                                     "stream": True})
    events = sse_events(raw.text)[:-1]
    finished = sorted(c["index"] for e in events for c in e["choices"] if c["finish_reason"])
    assert finished == [0, 1, 2, 3]


@pytest.mark.parametrize("stream,options,usage_chunks", [
    (True, None, 0), (True, {"include_usage": False}, 0), (True, {"include_usage": True}, 1), (False, None, None)])
async def test_include_usage_matrix(client, stream, options, usage_chunks):
    body = {"prompt": "hi", "max_tokens": 3, "stream": stream}
    if options is not None:
        body["stream_options"] = options
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200
    if not stream:
        assert r.json()["usage"]["completion_tokens"] == 3
        return
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    with_usage = [e for e in events[:-1] if e["usage"] is not None]
    assert len(with_usage) == usage_chunks
    if usage_chunks:
        assert events[-2] is with_usage[0] and with_usage[0]["choices"] == []
        assert with_usage[0]["usage"]["total_tokens"] == with_usage[0]["usage"]["prompt_tokens"] + 3


async def test_stop_strings_and_eos(client, fake):
    r = (await client.post("/v1/completions", json={"prompt": "x", "stop": "fox", "max_tokens": 30})).json()
    assert r["choices"][0]["text"] == " The quick brown " and r["choices"][0]["finish_reason"] == "stop"
    fake.eot_after = 2
    r = (await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 30})).json()
    assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 3


async def test_embeddings_float_base64_dimensions(client):
    floats = await openai_client(client).embeddings.create(model=MODEL, input=["a b", "c"], encoding_format="float")
    # the SDK asks for base64 by default and decodes it after validation, which strict mode runs on the strings
    b64 = await openai_client(client, strict=False).embeddings.create(model=MODEL, input=["a b", "c"])
    assert np.allclose([d.embedding for d in floats.data], [d.embedding for d in b64.data], atol=1e-7)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > 0
    raw = (await client.post("/v1/embeddings", json={"input": [[1, 2, 3]], "encoding_format": "base64",
                                                     "dimensions": 4})).json()
    v = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert v.shape == (4,) and abs(float(np.linalg.norm(v)) - 1) < 1e-5
    single = (await client.post("/v1/embeddings", json={"input": "c"})).json()["data"][0]["embedding"]
    assert single == pytest.approx(floats.data[1].embedding, abs=1e-7)


async def test_models_and_request_id(client):
    oc = openai_client(client)
    assert [m.id for m in (await oc.models.list()).data] == [MODEL]
    assert (await oc.models.retrieve(MODEL)).id == MODEL
    with pytest.raises(openai.NotFoundError):
        await oc.models.retrieve("gpt-4")
    r = await client.get("/v1/models", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    generated = (await client.get("/v1/models", headers={"x-request-id": "bad id\r\n"})).headers["x-request-id"]
    assert len(generated) == 32 and generated.isalnum()


async def test_world_tokenizer_eos_is_one_id():
    from engine import load_tokenizer
    from tests.server.fake_engine import FakeEngine
    world = load_tokenizer("world")
    async with serve(FakeEngine(world, script=" hi")) as c:
        info = (await c.get("/tokenizer_info")).json()
        assert (await c.post("/tokenize", json={"prompt": info["eos_token"]})).json()["tokens"] == [0]
        r = await c.post("/v1/completions", json={"prompt": [[0, 33, 34]], "max_tokens": 1, "echo": True,
                                                  "logprobs": 1})
        assert r.status_code == 200 and r.json()["choices"][0]["logprobs"]["token_logprobs"][0] is None


async def test_every_response_and_chunk_carries_a_system_fingerprint(client):
    """OpenAI types system_fingerprint as a string: on whole responses and on every stream chunk, one value for
    one model and server version. (Not strict: the SDK's Completion type refuses the null finish_reason of
    mid-stream completion chunks.)"""
    oai = openai_client(client, strict=False)
    seen = set()
    chat = await oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    comp = await oai.completions.create(model=MODEL, prompt="Hi", max_tokens=3)
    seen |= {chat.system_fingerprint, comp.system_fingerprint}
    stream = await oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=3, stream=True, stream_options={"include_usage": True})
    seen |= {chunk.system_fingerprint async for chunk in stream}
    stream = await oai.completions.create(model=MODEL, prompt="Hi", max_tokens=3, stream=True)
    seen |= {chunk.system_fingerprint async for chunk in stream}
    assert len(seen) == 1 and all(isinstance(f, str) and f.startswith("fp_") for f in seen)
