"""AsyncEngine end to end on a small random-weight model with the World tokenizer."""
import asyncio
import platform
import sys
import random

import pytest
import torch

from engine import (AsyncEngine, EngineConfig, EngineDead, EngineDraining, FinishReason, GenerateRequest,
                    InvalidRequest, Overloaded, SamplingParams, load_model, load_tokenizer)
from bench.random_checkpoint import CheckpointShape, write_checkpoint

TOK = load_tokenizer("world")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("eng") / "m.pth"
    write_checkpoint(path, CheckpointShape(n_layer=2, n_embd=64, head_size=32, vocab_size=65536, decay_lora=16,
                                           iclr_lora=16, value_lora=16, gate_lora=16, logit_scale=4.0), seed=3)
    return load_model(path, "cpu fp32")


def run_engine(model, body, *, store=None, initials=None, **config):
    """Start an engine (with a state store and initial states when given), run ``body(engine)`` in an event loop,
    stop the engine; return body's result."""
    async def main():
        eng = AsyncEngine(model, TOK, EngineConfig(**{"max_sessions": 16, "step_token_budget": 256,
                                                      "prefill_chunk": 64, **config}), store=store)
        for name, state in (initials or {}).items():
            eng.states.add_initial(name, state)
        eng.start()
        try:
            return await body(eng)
        finally:
            await eng.stop(drain_timeout=5)
    return asyncio.run(main())


async def collect(eng, req):
    """(tokens per sequence, text per sequence, finish reasons, logprobs per sequence, outputs)"""
    toks, text, fin, lps, outs = {}, {}, {}, {}, []
    async for out in eng.generate(req):
        outs.append(out)
        for so in out.outputs:
            toks.setdefault(so.index, []).extend(so.token_ids)
            text[so.index] = text.get(so.index, "") + so.text
            lps.setdefault(so.index, []).extend(so.logprobs or [])
            if so.finish_reason:
                fin[so.index] = so.finish_reason
    return toks, text, fin, lps, outs


def prompt(n, seed=0):
    rnd = random.Random(seed)
    return [rnd.randrange(1, 65536) for _ in range(n)]


def reference_path(model, prompt_ids, tokens):
    """Logits along a given token path through model.forward, token by token after the prompt."""
    logits, state = model.forward(torch.tensor([prompt_ids]), None)
    out = [logits[0]]
    for t in tokens[:-1]:
        logits, state = model.forward(torch.tensor([[t]]), state)
        out.append(logits[0])
    return torch.stack(out)


def test_greedy_equals_reference_forward(model):
    p = prompt(150)
    toks, _, fin, lps, _ = run_engine(model, lambda eng: collect(eng, GenerateRequest(
        p, SamplingParams(max_tokens=12, temperature=0, logprobs=2))))
    ref = reference_path(model, p, toks[0])
    assert toks[0] == ref.argmax(-1).tolist()
    ref_lp = torch.log_softmax(ref, -1)
    for i, lp in enumerate(lps[0]):
        assert lp.logprob == pytest.approx(float(ref_lp[i, lp.token_id]), abs=1e-4)
        assert lp.top[0][0] == int(ref_lp[i].argmax())
    assert fin[0] is FinishReason.LENGTH and len(toks[0]) == 12


def test_same_seed_alone_and_in_a_crowd(model):
    target = GenerateRequest(prompt(40, seed=1), SamplingParams(max_tokens=10, temperature=1.0, seed=1234))
    alone = run_engine(model, lambda eng: collect(eng, target))[0]

    async def crowd(eng, order):
        others = [GenerateRequest(prompt(10 + 37 * i, seed=10 + i), SamplingParams(max_tokens=5 + i, seed=i))
                  for i in range(7)]
        reqs = others[:order] + [GenerateRequest(target.prompt_tokens, target.params)] + others[order:]
        results = await asyncio.gather(*(collect(eng, r) for r in reqs))
        return results[order][0]
    for order in (0, 3, 7):
        assert run_engine(model, lambda eng: crowd(eng, order)) == alone


def test_stop_string_and_max_tokens(model):
    p = prompt(30, seed=2)
    toks, text, fin, _, _ = run_engine(model, lambda eng: collect(eng, GenerateRequest(
        p, SamplingParams(max_tokens=20, temperature=0))))
    full = text[0]
    assert fin[0] is FinishReason.LENGTH
    # a stop string made of the end of one token and the start of the next
    pieces = [TOK.decode([t]) for t in toks[0]]
    k = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 1)
    stop = pieces[k][-1] + pieces[k + 1][:1]
    assert stop in full
    _, text2, fin2, _, _ = run_engine(model, lambda eng: collect(eng, GenerateRequest(
        p, SamplingParams(max_tokens=20, temperature=0, stop=(stop,)))))
    assert fin2[0] is FinishReason.STOP and text2[0] == full[: full.index(stop)]


def test_n_continuations_from_one_prefill(model):
    p = prompt(100, seed=3)

    async def body(eng):
        res = await collect(eng, GenerateRequest(p, SamplingParams(max_tokens=6, temperature=1.0, seed=9), n=4))
        return res, eng.stats()
    (toks, _, fin, _, _), stats = run_engine(model, body)
    assert sorted(toks) == [0, 1, 2, 3] and all(len(t) == 6 for t in toks.values())
    assert len({tuple(t) for t in toks.values()}) > 1              # independent continuations
    assert stats.prompt_tokens_total == 100                         # the prompt went through the model once
    assert stats.slots_used == 0


def test_prefix_cache_hit_equals_cold_prefill(model):
    p = prompt(300, seed=4)
    longer = p + prompt(20, seed=5)
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=0)

    async def warm(eng):
        await collect(eng, GenerateRequest(p, params))
        res = await collect(eng, GenerateRequest(longer, params))
        return res, eng.stats()
    (toks, _, _, lps, outs), stats = run_engine(model, warm, prefix_cache_interval=128)
    assert outs[0].cached_prompt_tokens == 300 and stats.prefix_cache_hits >= 1
    cold_toks, _, _, cold_lps, cold_outs = run_engine(
        model, lambda eng: collect(eng, GenerateRequest(longer, params)), prefix_cache_bytes=0)
    assert cold_outs[0].cached_prompt_tokens == 0
    assert toks == cold_toks
    for a, b in zip(lps[0], cold_lps[0]):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)


def test_second_turn_prefills_only_new_tokens(model):
    turn1 = prompt(200, seed=6)
    params = SamplingParams(max_tokens=10, temperature=0)

    async def chat(eng):
        toks, *_ = await collect(eng, GenerateRequest(turn1, params))
        saved_before = eng.stats().prefix_cache_tokens_saved
        turn2 = turn1 + toks[0] + prompt(15, seed=7)
        await collect(eng, GenerateRequest(turn2, params))
        return len(turn2), eng.stats().prefix_cache_tokens_saved - saved_before
    total, saved = run_engine(model, chat)
    # everything but the last generated token and the 15 new ones came from the cache
    assert saved == 200 + 10 - 1
    assert total - saved == 16


def test_long_prompt_does_not_stall_running_streams(model):
    async def body(eng):
        counts = [0, 0, 0, 0]
        first_long = asyncio.Event()

        async def stream(i):
            async for out in eng.generate(GenerateRequest(prompt(8, seed=20 + i), SamplingParams(
                    max_tokens=400, temperature=1.0, seed=i, ignore_eos=True))):
                if not first_long.is_set():
                    counts[i] += sum(len(o.token_ids) for o in out.outputs)
        tasks = [asyncio.create_task(stream(i)) for i in range(4)]
        while min(counts) < 2:
            await asyncio.sleep(0.01)
        before = list(counts)
        async for out in eng.generate(GenerateRequest(prompt(2000, seed=30), SamplingParams(max_tokens=1))):
            first_long.set()
            break
        for t in tasks:
            t.cancel()
        return [c - b for c, b in zip(counts, before)]
    # 2000 tokens in chunks of 64 take >= 31 steps; every running stream got a token in each of them
    gained = run_engine(model, body, prefill_chunk=64, step_token_budget=128)
    assert min(gained) >= 31


def test_abort_frees_every_slot(model):
    async def body(eng):
        gen = eng.generate(GenerateRequest(prompt(20), SamplingParams(max_tokens=500, ignore_eos=True), n=3))
        await gen.__anext__()
        assert eng.stats().slots_used == 3
        await gen.aclose()                                      # what a client disconnect does
        for _ in range(100):
            if eng.stats().slots_used == 0 and eng.stats().running == 0:
                break
            await asyncio.sleep(0.02)
        return eng.stats()
    stats = run_engine(model, body)
    assert stats.slots_used == 0 and stats.running == 0 and stats.aborted_total == 1


def test_queue_overflow_raises_overloaded(model):
    async def body(eng):
        streams = [await eng.submit(GenerateRequest(prompt(10), SamplingParams(max_tokens=300, ignore_eos=True)))
                   for _ in range(2)]
        with pytest.raises(Overloaded) as info:
            for _ in range(10):
                streams.append(await eng.submit(GenerateRequest(prompt(10), SamplingParams(max_tokens=5))))
        assert info.value.retry_after > 0
        for s in streams:
            await s.aclose()
    run_engine(model, body, max_sessions=2, step_token_budget=64, max_waiting=3)


def test_request_validation(model):
    async def body(eng):
        for req, param in [
            (GenerateRequest([1, 2, 65536]), "prompt"),
            (GenerateRequest([1] * 70, SamplingParams(max_tokens=10)), "prompt"),
            (GenerateRequest([1], SamplingParams(max_tokens=9000)), "max_tokens"),
            (GenerateRequest([1], SamplingParams(logit_bias=((70000, 1.0),))), "logit_bias"),
        ]:
            with pytest.raises(InvalidRequest) as info:
                await eng.submit(req)
            assert info.value.param == param
    run_engine(model, body, max_prompt_tokens=64)
    with pytest.raises(InvalidRequest):
        GenerateRequest([])
    with pytest.raises(InvalidRequest):
        GenerateRequest([1], n=17)


def test_echo_prompt_logprobs(model):
    p = prompt(90, seed=8)
    _, _, _, _, outs = run_engine(model, lambda eng: collect(eng, GenerateRequest(
        p, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=3))))
    plp = outs[0].prompt_logprobs
    assert len(plp) == 90 and plp[0] is None
    logits, _ = model.forward(torch.tensor([p]), None, full_output=True)
    ref = torch.log_softmax(logits[0], -1)
    for pos in (1, 45, 89):
        assert plp[pos].token_id == p[pos]
        assert plp[pos].logprob == pytest.approx(float(ref[pos - 1, p[pos]]), abs=1e-4)
        assert len(plp[pos].top) == 3


def test_max_tokens_zero_with_echo(model):
    _, _, fin, _, outs = run_engine(model, lambda eng: collect(eng, GenerateRequest(
        prompt(5), SamplingParams(max_tokens=0, prompt_logprobs=0))))
    assert fin == {0: FinishReason.LENGTH} and len(outs[0].prompt_logprobs) == 5


def test_embeddings_batch_equals_singles(model):
    inputs = [prompt(5, seed=1), prompt(130, seed=2), prompt(5, seed=3)]

    async def body(eng):
        batch = await eng.embed(inputs, pooling="mean")
        singles = [(await eng.embed([x], pooling="mean"))[0] for x in inputs]
        last = await eng.embed(inputs[:1])
        return batch, singles, last
    batch, singles, last = run_engine(model, body)
    for a, b in zip(batch, singles):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)
        assert torch.tensor(a).norm().item() == pytest.approx(1.0, abs=1e-5)
    hidden, _ = model.forward_hidden(torch.tensor([inputs[0]]), None)
    assert torch.allclose(torch.tensor(last[0]), torch.nn.functional.normalize(hidden[0], dim=-1), atol=1e-5)


def test_failure_of_one_request_spares_the_others(model, monkeypatch):
    poison = 4242
    original = model.forward

    def forward(tokens, state=None, full_output=False):
        if poison in tokens.tolist()[0] and tokens.shape[1] > 1:
            raise RuntimeError("injected fault")
        return original(tokens, state, full_output)
    monkeypatch.setattr(model, "forward", forward)

    async def body(eng):
        bad = collect(eng, GenerateRequest([poison] * 4, SamplingParams(max_tokens=3)))
        good = collect(eng, GenerateRequest(prompt(10), SamplingParams(max_tokens=3)))
        res = await asyncio.gather(bad, good, return_exceptions=True)
        return res, eng.is_alive
    (bad, good), alive = run_engine(model, body)
    assert isinstance(bad, Exception) and "failed" in str(bad)
    assert len(good[0][0]) == 3 and alive


def test_dead_step_loop_is_reported(model, monkeypatch):
    """A prompt's failure is that request's alone; a failing batched decode kills the loop, which says so."""
    prefill_only = type(model).forward.__get__(model)

    def forward(tokens, state=None, full_output=False):
        if tokens.shape[1] == 1:
            raise RuntimeError("decode exploded")
        return prefill_only(tokens, state, full_output)
    monkeypatch.setattr(model, "forward", forward)

    async def body(eng):
        with pytest.raises(EngineDead):
            await collect(eng, GenerateRequest([5, 6, 7], SamplingParams(max_tokens=3)))
        assert not eng.is_alive and not eng.stats().alive
        with pytest.raises(EngineDead):
            await eng.submit(GenerateRequest([5]))
    run_engine(model, body)


def test_draining_refuses_new_requests(model):
    async def body(eng):
        task = asyncio.create_task(collect(eng, GenerateRequest(prompt(10), SamplingParams(max_tokens=20))))
        await asyncio.sleep(0.05)
        stop = asyncio.create_task(eng.stop(drain_timeout=10))
        await asyncio.sleep(0.01)
        with pytest.raises((EngineDraining, EngineDead)):
            await eng.submit(GenerateRequest([1]))
        toks = (await task)[0]
        await stop
        return toks
    toks = run_engine(model, body)
    assert len(toks[0]) == 20                                       # the running request finished


def test_step_loop_runs_with_the_configured_threads(model):
    """engine.threads sets the step loop's torch threads (reported in stats), leaving the caller's alone."""
    before = torch.get_num_threads()

    async def body(eng):
        await collect(eng, GenerateRequest(prompt(5), SamplingParams(max_tokens=2)))
        return eng.stats().threads
    assert run_engine(model, body, threads=1) == 1
    assert run_engine(model, body) == before             # 0: torch's default, what this process uses
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="engine.threads must be >= 0"):
        EngineConfig(threads=-1)


def test_call_in_new_thread_returns_and_raises():
    import threading

    from engine.model.threads import acall_in_new_thread, call_in_new_thread
    main = threading.get_ident()
    assert call_in_new_thread(lambda x, y=0: (x + y, threading.get_ident() != main), 2, y=3) == (5, True)
    with pytest.raises(KeyError, match="boom"):
        call_in_new_thread(lambda: {}["boom"])

    async def body():
        ok = await acall_in_new_thread(lambda: threading.current_thread().name)
        with pytest.raises(ZeroDivisionError):
            await acall_in_new_thread(lambda: 1 / 0)
        return ok
    assert asyncio.run(body()) == "goose-load"


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's mallopt")
def test_tune_malloc_keeps_large_temporaries_mapped():
    """After tune_malloc, re-allocating a 4 MiB tensor does not page-fault it in again each time."""
    import resource

    from engine.model.allocator import tune_malloc
    assert tune_malloc(env={"GOOSE_MALLOC_TUNE": "0"}) is False
    assert tune_malloc(env={}) is True
    for _ in range(3):
        torch.ones(1 << 20)                              # 4 MiB: above glibc's default mmap threshold
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.ones(1 << 20)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    # untuned: ~1024 faults (4 KiB pages) per tensor, ~20k here; tuned: none, but the count is process-wide,
    # so leave room for one stray re-mapping (seen once in ~10 runs after the sampling tests)
    assert faults < 4 * 1024


def test_admission_at_the_max_waiting_edge_never_kills_the_engine(model, monkeypatch):
    """Threads with their own event loops and many tasks each submit at the max_waiting edge while the loop drains
    the queue: every request gets its output or Overloaded, and afterwards the engine is alive and empty. (The
    scheduler is slowed down to widen the window between the loop taking requests and publishing its counts.)"""
    import threading
    import time

    from engine.scheduler import Scheduler
    add = Scheduler.add

    def slow_add(self, *args, **kw):
        time.sleep(0.002)
        return add(self, *args, **kw)
    monkeypatch.setattr(Scheduler, "add", slow_add)

    async def body(eng):
        async def one(i):
            req = GenerateRequest(prompt(3 + i % 5, seed=i), SamplingParams(max_tokens=2, ignore_eos=True),
                                  n=1 + i % 2)
            try:
                outs = (await collect(eng, req))[4]
                assert outs[-1].finished
                return "done"
            except Overloaded:
                return "overloaded"

        results: list[str] = []

        def client(base):
            async def burst():
                return await asyncio.gather(*(one(base + i) for i in range(40)))
            results.extend(asyncio.run(burst()))

        threads = [threading.Thread(target=client, args=(k * 100,)) for k in range(4)]
        for t in threads:
            t.start()
        await asyncio.gather(*(one(1000 + i) for i in range(40)))   # this loop joins the burst too
        await asyncio.to_thread(lambda: [t.join() for t in threads])
        for _ in range(200):
            s = eng.stats()
            if s.running == 0 and s.waiting == 0 and s.slots_used == 0:
                break
            await asyncio.sleep(0.02)
        alive_after = eng.is_alive
        final = await collect(eng, GenerateRequest(prompt(5), SamplingParams(max_tokens=2)))
        return results, eng.stats(), alive_after, final
    results, stats, alive, final = run_engine(model, body, max_sessions=2, max_waiting=4, step_token_budget=64)
    assert len(results) == 160 and set(results) <= {"done", "overloaded"}
    assert "done" in results and "overloaded" in results
    assert alive and stats.running == 0 and stats.waiting == 0 and stats.slots_used == 0
    assert len(final[0][0]) == 2


def test_a_failing_tokenizer_callback_fails_only_its_request(model):
    """The stream decoder is the caller's code (the tokenizer passed in): if it raises while a request starts
    decoding, that request fails and the engine serves on."""
    class Flaky:
        def __init__(self, tok):
            self._tok, self.calls = tok, 0

        def __getattr__(self, name):
            return getattr(self._tok, name)

        def stream_decoder(self):
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("decoder broke")
            return self._tok.stream_decoder()

    async def main():
        eng = AsyncEngine(model, Flaky(TOK), EngineConfig(max_sessions=4, step_token_budget=64))
        eng.start()
        try:
            with pytest.raises(Exception, match="failed"):
                await collect(eng, GenerateRequest(prompt(5), SamplingParams(max_tokens=2)))
            good = await collect(eng, GenerateRequest(prompt(5), SamplingParams(max_tokens=2)))
            return good, eng.is_alive, eng.stats()
        finally:
            await eng.stop(drain_timeout=5)
    good, alive, stats = asyncio.run(main())
    assert alive and len(good[0][0]) == 2 and stats.slots_used == 0


def test_rules_are_decided_once_with_one_error_each(model):
    """The engine owns every request rule: context length (ContextLengthExceeded), vocabulary, max_tokens, n."""
    from engine import ContextLengthExceeded

    async def body(eng):
        with pytest.raises(ContextLengthExceeded) as info:
            await eng.submit(GenerateRequest([1] * 65))
        assert info.value.param == "prompt" and "65 tokens" in str(info.value)
        with pytest.raises(ContextLengthExceeded):
            await eng.embed([[1] * 65])
        with pytest.raises(InvalidRequest, match="outside the vocabulary") as info:
            await eng.embed([[1, 70000]])
        assert info.value.param == "input"
        with pytest.raises(InvalidRequest) as info:
            await eng.submit(GenerateRequest([1], n=5))
        assert info.value.param == "n"
    run_engine(model, body, max_prompt_tokens=64, max_sessions=4)


def test_constrained_rows_match_their_grammar_and_free_rows_are_unchanged(model):
    """A regex, a choice and a JSON schema, mixed with free requests in one batch: every constrained output
    matches, each seed gives the same tokens alone and in the batch, and the free rows equal their solo runs."""
    import json
    import re

    from engine import Choice, JsonSchema, Regex
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}
    specs = [Regex(r"[a-c]{3}-[0-9]{2}", "structured_outputs.regex"), Choice(("yes", "no", "maybe"), "choice"),
             JsonSchema.of(schema, "response_format"), None, None]

    def req(i, spec):
        return GenerateRequest(prompt(6, seed=i), SamplingParams(max_tokens=40, temperature=1.0, seed=100 + i),
                               constraint=spec, request_id=f"r{i}")

    async def body(eng):
        alone = [await collect(eng, req(i, spec)) for i, spec in enumerate(specs)]
        together = await asyncio.gather(*(collect(eng, req(i, spec)) for i, spec in enumerate(specs)))
        return alone, together
    alone, together = run_engine(model, body)
    for (toks_a, text_a, fin_a, _, _), (toks_b, _, _, _, _) in zip(alone, together):
        assert toks_a == toks_b
    assert re.fullmatch(r"[a-c]{3}-[0-9]{2}", alone[0][1][0]) and alone[0][2][0] is FinishReason.STOP
    assert alone[1][1][0] in ("yes", "no", "maybe")
    obj = json.loads(alone[2][1][0])
    assert set(obj) == {"n", "ok"} and 0 <= obj["n"] <= 99 and isinstance(obj["ok"], bool)


def test_bad_constraints_are_refused_at_submit(model):
    from engine import JsonSchema, Regex

    async def body(eng):
        with pytest.raises(InvalidRequest) as info:
            await eng.submit(GenerateRequest([1, 2], constraint=Regex("([a-z", "structured_outputs.regex")))
        assert info.value.param == "structured_outputs.regex"
        with pytest.raises(InvalidRequest) as info:
            await eng.submit(GenerateRequest([1, 2], SamplingParams(ignore_eos=True),
                                             constraint=JsonSchema.of({"type": "object"}, "response_format")))
        assert info.value.param == "ignore_eos"
        return eng.is_alive
    assert run_engine(model, body)


def test_constraints_with_n_logprobs_stop_strings_and_abort(model):
    """n > 1 sequences each follow the grammar on their own; logprobs come back for constrained tokens; a stop
    string still ends the text; aborting a constrained request frees its slots."""
    import re

    from engine import Regex
    pattern = r"(ab|cd)+x[0-9]{3}"

    async def body(eng):
        toks, text, fin, lps, _ = await collect(eng, GenerateRequest(
            prompt(5), SamplingParams(max_tokens=30, seed=1, logprobs=2), n=3, constraint=Regex(pattern, "regex")))
        stopped = await collect(eng, GenerateRequest(
            prompt(5), SamplingParams(max_tokens=30, seed=1, stop=("x",)), constraint=Regex(pattern, "regex")))
        gen = eng.generate(GenerateRequest(prompt(5), SamplingParams(max_tokens=500, seed=2), n=2,
                                           constraint=Regex("(ab)+", "regex")))
        await gen.__anext__()
        await gen.aclose()
        for _ in range(100):
            if eng.stats().slots_used == 0:
                break
            await asyncio.sleep(0.02)
        return (toks, text, fin, lps), stopped, eng.stats()
    (toks, text, fin, lps), stopped, stats = run_engine(model, body)
    assert len(text) == 3 and all(re.fullmatch(pattern, text[i]) for i in range(3))
    assert all(fin[i] is FinishReason.STOP for i in range(3))
    assert all(len(lps[i]) == len(toks[i]) and all(lp.top for lp in lps[i]) for i in range(3))
    assert re.fullmatch(r"(ab|cd)+", stopped[1][0]) and stopped[2][0] is FinishReason.STOP
    assert stats.slots_used == 0 and stats.running == 0
