"""POST/GET/DELETE /v1/responses through the official openai client, on a tiny random-weight model: chains by
previous_response_id against cold replays, streaming events, stored records, their deletion and expiry, and the
states that must never be used (damaged, another model's)."""
import contextlib

import openai
import pytest

from bench.random_checkpoint import write_checkpoint
from engine import AsyncEngine, ChatTemplate, EngineConfig, StateStore, StoreConfig, load_model
from server.app import ModelInfo
from tests.server.conftest import MODEL, make_settings, openai_client, serve
from tests.server.test_e2e import SHAPE

pytestmark = pytest.mark.anyio
CONFIG = dict(max_sessions=8, max_waiting=32, step_token_budget=64, prefill_chunk=32)
TURNS = ["Good morning to you.", "The quick brown fox jumps.", "It is a truth universally acknowledged.",
         "numbers 0123456789"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("responses")
    write_checkpoint(d / "a.pth", SHAPE, seed=3)
    write_checkpoint(d / "b.pth", SHAPE, seed=8)
    return load_model(d / "a.pth", "cpu fp32"), load_model(d / "b.pth", "cpu fp32")


@contextlib.asynccontextmanager
async def app(model, bpe, store: StoreConfig | StateStore | None = StoreConfig(memory_bytes=64 << 20), *,
              template: ChatTemplate = ChatTemplate(), **config):
    store = store if isinstance(store, StateStore) or store is None else StateStore(store)
    engine = AsyncEngine(model, bpe, EngineConfig(**{**CONFIG, **config}), store=store)
    async with serve(engine, make_settings(), info=ModelInfo(name=MODEL, template=template)) as http:
        http.engine = engine
        yield http, openai_client(http)


def greedy(**kw) -> dict:
    return {"model": MODEL, "temperature": 0, "max_output_tokens": 12, **kw}


async def cold_replay(model, bpe, items: list[dict], instructions=None):
    """The same conversation sent whole to a server with no cache and no store."""
    async with app(model, bpe, store=None, prefix_cache_bytes=0) as (_, client):
        return await client.responses.create(**greedy(input=items, store=False, instructions=instructions))


async def test_chain_prefills_only_new_input_and_equals_a_cold_replay(models, bpe):
    model, _ = models
    items, prev = [], None
    async with app(model, bpe) as (_, client):
        for text in TURNS:
            r = await client.responses.create(**greedy(input=text, previous_response_id=prev and prev.id))
            items.append({"role": "user", "content": text})
            cold = await cold_replay(model, bpe, items)
            assert r.output_text == cold.output_text and r.usage.input_tokens == cold.usage.input_tokens
            assert cold.usage.input_tokens_details.cached_tokens == 0
            if prev is not None:   # the whole history came from the stored state
                history = prev.usage.input_tokens + prev.usage.output_tokens - 1
                assert r.usage.input_tokens_details.cached_tokens >= history
                assert r.previous_response_id == prev.id
            items.append({"role": "assistant", "content": r.output_text})
            prev = r


async def test_stream_sends_named_events_and_no_done(models, bpe):
    model, _ = models
    # a stop string the random model writes soon, so the response completes (the SDK's helper wants completed)
    async with app(model, bpe, template=ChatTemplate(stop=("o",))) as (http, client):
        async with client.responses.stream(**greedy(input="Good morning")) as stream:
            events = [e async for e in stream]
            final = await stream.get_final_response()
        types = [e.type for e in events]
        assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                             "response.content_part.added"]
        assert types[-1] == "response.completed" and "response.output_text.delta" in types
        assert [e.sequence_number for e in events] == list(range(len(events)))
        assert (await client.responses.retrieve(final.id)).output_text == final.output_text
        async with http.stream("POST", "/v1/responses", json={**greedy(input="Hi"), "stream": True}) as raw:
            lines = [line async for line in raw.aiter_lines() if line]
        assert raw.headers["content-type"].startswith("text/event-stream")
        assert lines[0] == "event: response.created" and lines[1].startswith('data: {"type":"response.created"')
        assert not any("[DONE]" in line for line in lines)


async def test_records_pages_deletion_and_not_found(models, bpe):
    model, _ = models
    async with app(model, bpe) as (http, client):
        first = await client.responses.create(**greedy(input="Good morning", metadata={"k": "v"}))
        r = await client.responses.create(**greedy(input=[{"role": "user", "content": "a"},
                                                          {"role": "user", "content": [{"type": "input_text",
                                                                                        "text": "b"}]}],
                                                   previous_response_id=first.id))
        got = await client.responses.retrieve(first.id)
        assert got.id == first.id and got.output_text == first.output_text and got.metadata == {"k": "v"}
        page = await client.responses.input_items.list(r.id, order="asc", limit=1)
        assert [i.content[0].text for i in page.data] == ["a"] and page.has_more
        rest = await client.responses.input_items.list(r.id, order="asc", after=page.data[0].id)
        assert [i.content[0].text for i in rest.data] == ["b"] and not rest.has_more
        await client.responses.delete(first.id)
        for call in (client.responses.retrieve(first.id), client.responses.delete(first.id),
                     client.responses.create(**greedy(input="x", previous_response_id=first.id))):
            with pytest.raises(openai.NotFoundError):
                await call
        resp = await http.get("/v1/responses/resp_nothing")
        body = resp.json()
        assert resp.status_code == 404 and set(body) == {"error"}
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["param"] == "response_id"
        resp = await http.post("/v1/responses", json=greedy(input="x", previous_response_id="resp_nothing"))
        assert resp.status_code == 404 and resp.json()["error"]["param"] == "previous_response_id"


async def test_store_false_stores_nothing(models, bpe):
    model, _ = models
    async with app(model, bpe) as (http, client):
        r = await client.responses.create(**greedy(input="Good morning", store=False))
        assert r.store is False
        http.engine.states.store.flush()
        stats = http.engine.store_stats().tiers["memory"]
        assert stats.entries == 0 and stats.writes == 0
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(r.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.create(**greedy(input="x", previous_response_id=r.id))


async def test_instructions_apply_per_request(models, bpe):
    """The same instructions continue from the state; new ones replace the old (OpenAI: not carried over), so
    the conversation is rebuilt from its items with the new ones."""
    model, _ = models
    async with app(model, bpe) as (_, client):
        r1 = await client.responses.create(**greedy(input="Good morning", instructions="Be brief."))
        items = [{"role": "user", "content": "Good morning"}, {"role": "assistant", "content": r1.output_text},
                 {"role": "user", "content": "numbers"}]
        same = await client.responses.create(**greedy(input="numbers", instructions="Be brief.",
                                                      previous_response_id=r1.id))
        assert same.usage.input_tokens_details.cached_tokens >= r1.usage.input_tokens + r1.usage.output_tokens - 1
        assert same.output_text == (await cold_replay(model, bpe, items, "Be brief.")).output_text
        other = await client.responses.create(**greedy(input="numbers", instructions="Be long.",
                                                       previous_response_id=r1.id))
        cold = await cold_replay(model, bpe, items, "Be long.")
        assert other.output_text == cold.output_text and other.instructions == "Be long."
        assert other.usage.input_tokens == cold.usage.input_tokens
        assert other.usage.input_tokens_details.cached_tokens < r1.usage.input_tokens


async def test_expired_responses_are_gone(models, bpe):
    model, _ = models
    now = [1000.0]
    store = StateStore(StoreConfig(memory_bytes=64 << 20, ttl_s=60), clock=lambda: now[0])
    async with app(model, bpe, store=store) as (_, client):
        r = await client.responses.create(**greedy(input="Good morning"))
        now[0] += 59
        assert (await client.responses.retrieve(r.id)).id == r.id
        now[0] += 2
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(r.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.create(**greedy(input="x", previous_response_id=r.id))
        assert store.stats().expired >= 1


async def test_a_damaged_state_is_a_miss_never_a_wrong_state(models, bpe, tmp_path):
    from engine.states.codec import KIND_STATE, peek
    model, _ = models
    disk = StoreConfig(memory_bytes=0, disk_dir=str(tmp_path / "states"), fsync=False)
    async with app(model, bpe, store=disk, prefix_cache_bytes=0) as (http, client):
        r1 = await client.responses.create(**greedy(input="Good morning"))
        http.engine.states.store.flush()
        damaged = 0
        for path in (tmp_path / "states").glob("*/*.gst"):
            blob = bytearray(path.read_bytes())
            if peek(bytes(blob)).kind == KIND_STATE:
                blob[-5] ^= 0xFF
                path.write_bytes(bytes(blob))
                damaged += 1
        assert damaged == 1
        r2 = await client.responses.create(**greedy(input="numbers", previous_response_id=r1.id))
        assert r2.usage.input_tokens_details.cached_tokens == 0
        assert http.engine.store_stats().corrupt == 1
    items = [{"role": "user", "content": "Good morning"}, {"role": "assistant", "content": r1.output_text},
             {"role": "user", "content": "numbers"}]
    assert r2.output_text == (await cold_replay(model, bpe, items)).output_text


async def test_another_models_state_is_never_used(models, bpe, tmp_path):
    """Two models sharing one store: the record is readable by both, the state only by the model that made it;
    the other rebuilds the conversation from its items."""
    a, b = models
    disk = StoreConfig(memory_bytes=0, disk_dir=str(tmp_path / "shared"), fsync=False)
    async with app(a, bpe, store=disk) as (_, client):
        r1 = await client.responses.create(**greedy(input="Good morning"))
    async with app(b, bpe, store=disk) as (_, client):
        assert (await client.responses.retrieve(r1.id)).output_text == r1.output_text
        r2 = await client.responses.create(**greedy(input="numbers", previous_response_id=r1.id))
    assert r2.usage.input_tokens_details.cached_tokens == 0
    items = [{"role": "user", "content": "Good morning"}, {"role": "assistant", "content": r1.output_text},
             {"role": "user", "content": "numbers"}]
    assert r2.output_text == (await cold_replay(b, bpe, items)).output_text
    async with app(a, bpe, store=disk) as (_, client):         # and model a still continues from its state
        r3 = await client.responses.create(**greedy(input="numbers", previous_response_id=r1.id))
    assert r3.usage.input_tokens_details.cached_tokens >= r1.usage.input_tokens + r1.usage.output_tokens - 1


async def test_bad_requests_name_the_field(models, bpe):
    model, _ = models
    async with app(model, bpe) as (http, _):
        for body, param in [({"input": "x", "model": "other"}, "model"), ({"input": []}, "input"),
                            ({"input": "x", "top_logprobs": 2}, "top_logprobs"),
                            ({"input": "x", "tool_choice": "required"}, "tool_choice")]:
            resp = await http.post("/v1/responses", json=body)
            assert resp.status_code in (400, 404) and resp.json()["error"]["param"] == param, resp.text


async def test_chat_prompts_hit_the_prefix_cache(models, bpe):
    """A repeated chat prompt resumes whole (its last logits are kept); a shared system prompt resumes at the end
    of the system turn; both show in cached_tokens and in the metrics."""
    model, _ = models
    system = {"role": "system", "content": "It is a truth universally acknowledged, that a single man."}
    async with app(model, bpe) as (http, client):
        async def chat(text):
            return await client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0, messages=[
                system, {"role": "user", "content": text}])
        first = await chat("Good morning")
        again = await chat("Good morning")
        assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens
        assert again.choices[0].message.content == first.choices[0].message.content
        other = await chat("numbers")
        cached = other.usage.prompt_tokens_details.cached_tokens
        assert 10 < cached < other.usage.prompt_tokens
        text = (await http.get("/metrics")).text
        hits = next(float(line.split()[-1]) for line in text.splitlines()
                    if line.startswith("goose_prefix_cache_hits_total"))
        assert hits >= 2


async def test_models_lists_initial_states(models, bpe):
    import torch
    model, _ = models
    _, tuned = model.forward(torch.tensor([[5, 6, 7, 8, 9]]), None)
    engine = AsyncEngine(model, bpe, EngineConfig(**CONFIG))
    engine.states.add_initial("poet", tuned)
    async with serve(engine, make_settings(), info=ModelInfo(name=MODEL, initial_states=("poet",))) as http:
        ids = [m["id"] for m in (await http.get("/v1/models")).json()["data"]]
        assert ids == [MODEL, f"{MODEL}:poet"]
        assert (await http.get(f"/v1/models/{MODEL}:poet")).status_code == 200
        outs = []
        for model_id in (MODEL, f"{MODEL}:poet"):
            r = await http.post("/v1/completions", json={"model": model_id, "prompt": [5, 6, 7], "max_tokens": 8,
                                                         "temperature": 0})
            outs.append(r.json()["choices"][0]["text"])
        assert outs[0] != outs[1]
        r = await http.post("/v1/embeddings", json={"model": f"{MODEL}:poet", "input": "x"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
        assert (await http.post("/v1/completions", json={"model": f"{MODEL}:nope", "prompt": "x"})).status_code == 404




async def test_function_calls_and_their_outputs_continue_the_conversation(models, bpe):
    import json
    model, _ = models
    tools = [{"type": "function", "name": "get_weather", "description": "Weather of a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 4}},
                             "required": ["city"], "additionalProperties": False}}]
    async with app(model, bpe) as (_, client):
        r1 = await client.responses.create(**greedy(input="Good morning", tools=tools, tool_choice="required",
                                                    max_output_tokens=150))
        call = r1.output[-1]
        assert call.type == "function_call" and call.name == "get_weather" and "city" in json.loads(call.arguments)
        result = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
        r2 = await client.responses.create(**greedy(input=[result], tools=tools, previous_response_id=r1.id))
        assert r2.usage.input_tokens_details.cached_tokens >= r1.usage.input_tokens
    items = [{"role": "user", "content": "Good morning"},
             *[o.model_dump(exclude_none=True) for o in r1.output], result]
    async with app(model, bpe, store=None, prefix_cache_bytes=0) as (_, client):
        cold = await client.responses.create(**greedy(input=items, tools=tools, store=False))
    assert cold.output_text == r2.output_text and cold.usage.input_tokens == r2.usage.input_tokens


async def test_a_chat_reply_state_is_stored_for_whole_history_resends(models, bpe, tmp_path):
    """With a directory or Redis tier, a chat reply's state is stored (after the response, in the background):
    another server sharing the store resumes a whole-history resend after that reply."""
    import asyncio
    model, _ = models
    disk = StoreConfig(memory_bytes=0, disk_dir=str(tmp_path / "chat"), fsync=False)
    first = [{"role": "user", "content": "Good morning"}]
    async with app(model, bpe, store=disk) as (http, client):
        r1 = await client.chat.completions.create(model=MODEL, messages=first, max_tokens=12, temperature=0)
        for _ in range(200):
            if http.engine.store_stats().tiers["disk"].writes:
                break
            await asyncio.sleep(0.02)
        assert http.engine.states.store.flush(10)
    history = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                       {"role": "user", "content": "numbers"}]
    async with app(model, bpe, store=disk, prefix_cache_bytes=0) as (_, client):
        r2 = await client.chat.completions.create(model=MODEL, messages=history, max_tokens=12, temperature=0)
    async with app(model, bpe, store=None, prefix_cache_bytes=0) as (_, client):
        cold = await client.chat.completions.create(model=MODEL, messages=history, max_tokens=12, temperature=0)
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens + r1.usage.completion_tokens - 1
    assert r2.choices[0].message.content == cold.choices[0].message.content
