"""The static decode (engine/cuda_graphs.py) and the device sampler (engine.sampling.sample_on_device).

On CPU the graph body runs eagerly on the same static buffers, so these tests prove what a capture would replay:
bucket padding, padding rows that are never anyone's, states written back to the right rows, and tokens equal to
the plain decode path's for the same seeds. The gpu-marked tests capture real graphs and check that a step
needs no host synchronisation but the copy of its ids.
"""
from __future__ import annotations

import asyncio

import pytest
import torch

from engine import AsyncEngine, EngineConfig, GenerateRequest, load_tokenizer
from engine.cuda_graphs import DecodeGraphs, buckets, use_static_decode
from engine.request import SamplingParams as Params
from engine.sampling import SamplerRow, draw_uniforms, make_generator, sample, sample_on_device
from engine.state_pool import StatePool
from tests.conftest import rel_err

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def test_buckets_and_modes():
    assert buckets(1) == [1] and buckets(8) == [1, 2, 4, 8] and buckets(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not use_static_decode("auto", cpu) and use_static_decode("auto", cuda)
    assert use_static_decode("on", cpu) and not use_static_decode("off", cuda)
    with pytest.raises(ValueError, match="cuda_graphs"):
        use_static_decode("sometimes", cpu)
    with pytest.raises(ValueError, match="cuda_graphs"):
        EngineConfig(cuda_graphs="yes")


# ------------------------------------------------------------------------------- the sampler
MIXED = [Params(temperature=0), Params(temperature=0.8), Params(temperature=1.0, top_p=0.9),
         Params(temperature=1.2, top_k=5), Params(temperature=0.7, min_p=0.1), Params(top_k=40, top_p=0.5),
         Params(temperature=1.0), Params(temperature=0.5, top_p=0.95, top_k=100, min_p=0.02)]


def sampler_rows(seed):
    return [SamplerRow(p, make_generator(seed, i)) for i, p in enumerate(MIXED)]


def static_params(rows, device="cpu"):
    f = lambda vals, dt=torch.float32: torch.tensor(vals, dtype=dt, device=device)  # noqa: E731
    ps = [r.params for r in rows]
    return (f([p.temperature for p in ps]), f([p.top_k for p in ps], torch.long), f([p.top_p for p in ps]),
            f([p.min_p for p in ps]), f([p.greedy for p in ps], torch.bool))


@pytest.mark.parametrize("seed", range(6))
def test_device_sampler_equals_the_host_sampler_for_the_same_seeds(seed):
    """Greedy, temperature, top-p (peaked rows: the nucleus lies in the top 64), top-k, min-p and all at once:
    the same generators give the same tokens through sample() and sample_on_device(), step after step."""
    V = 3000
    logits = torch.randn(len(MIXED), V, generator=torch.Generator().manual_seed(seed)) * 6
    host_rows, dev_rows = sampler_rows(seed), sampler_rows(seed)
    for step in range(4):
        x = logits.roll(step * 17, dims=1)
        want, _ = sample(x, host_rows, want_logprobs=False)
        u = torch.tensor(draw_uniforms(dev_rows))
        got = sample_on_device(x, *static_params(dev_rows), u, filters=True)
        assert got.tolist() == want, step
        plain = [i for i, p in enumerate(MIXED) if p.top_k <= 0 and p.top_p >= 1 and p.min_p == 0]
        unfiltered = sample_on_device(x, *static_params(dev_rows), u, filters=False)
        assert unfiltered[plain].tolist() == [want[i] for i in plain]


# ------------------------------------------------------------------------------- the static buffers
def greedy_rows(n):
    return [SamplerRow(Params(temperature=0), make_generator(0, i)) for i in range(n)]


def test_padding_rows_are_freed_and_states_land_in_their_rows(tiny_model):
    """3 decoding sequences scattered over an 8-row pool, a prefilling one in row 3 (inside bucket 4's padding):
    the step moves it out (its state intact), writes the decoders' rows as a plain forward would, and samples
    the argmax of that forward's logits."""
    m = tiny_model
    pool = StatePool(m, 8)
    graphs = DecodeGraphs(m, pool)
    assert not graphs.capture and graphs.sizes == [1, 2, 4, 8]
    for key in ("a", "b", "c", "prefilling"):
        pool.alloc(key)
    for row, key in ((6, "a"), (2, "b"), (5, "c"), (3, "prefilling")):          # put them where the test wants
        pool._row[key], pool._holder[row] = row, key
    pool._holder = [next((k for k, r in pool._row.items() if r == i), None) for i in range(8)]
    gen = torch.Generator().manual_seed(0)
    for t in pool.state.tensors():
        t.copy_(torch.randn(t.shape, generator=gen))
    keys, tokens = ["a", "b", "c"], [5, 77, 300]
    want_states = {k: pool.snapshot(k) for k in ("a", "b", "c", "prefilling")}
    want_logits, after = m.forward(torch.tensor([[t] for t in tokens]),
                                   RNNStateCat([want_states[k] for k in keys]))
    logits, ids = graphs.launch(keys, tokens, greedy_rows(3))
    assert [pool.row_of(k) for k in keys] == [0, 1, 2] and pool.row_of("prefilling") >= 4
    assert ids() == want_logits.argmax(-1).tolist()
    assert rel_err(logits, want_logits) < 1e-6
    for j, k in enumerate(keys):
        got = pool.view(k)
        for a, b in zip(got.tensors(), after.narrow(j, 1).tensors()):
            assert rel_err(a, b) < 1e-6, k
    for a, b in zip(pool.view("prefilling").tensors(), want_states["prefilling"].tensors()):
        assert torch.equal(a, b)


def RNNStateCat(states):
    from engine.model.state import RNNState
    return RNNState.cat(states)


def test_a_step_that_cannot_be_padded_falls_back(tiny_model):
    """5 decoders in a 6-row pool with one more row taken: bucket 6 has no free row to pad with."""
    pool = StatePool(tiny_model, 6)
    graphs = DecodeGraphs(tiny_model, pool)
    for key in range(6):
        pool.alloc(key)
    assert graphs.launch(list(range(5)), [1] * 5, greedy_rows(5)) is None and graphs.fallbacks == 1
    pool.free(5)
    assert graphs.launch(list(range(5)), [1] * 5, greedy_rows(5)) is not None and graphs.steps == 1


def test_pool_clear():
    class Fake:
        config = type("C", (), {"state_bytes": 0})()

        def zero_state(self, n):
            from engine.model.state import RNNState
            return RNNState([torch.arange(n, dtype=torch.float32).unsqueeze(1)], [], [])
    pool = StatePool(Fake(), 6)
    for key in "abcd":
        pool.alloc(key)                              # rows 5, 4, 3, 2
    pool.state.att_x[0].copy_(torch.arange(6.0).unsqueeze(1))      # each row holds its number
    assert pool.clear(2, 4) is False                 # c and d need two free rows >= 4: none
    pool.free("a")
    pool.free("b")
    assert pool.clear(2, 4) and {pool.row_of("c"), pool.row_of("d")} == {4, 5}
    assert pool.state.att_x[0][pool.row_of("c"), 0] == 3 and pool.state.att_x[0][pool.row_of("d"), 0] == 2


# ------------------------------------------------------------------------------- the engine
REQUESTS = [(30, Params(max_tokens=9, temperature=0)),
            (12, Params(max_tokens=7, temperature=0.9, seed=11)),       # n = 2
            (25, Params(max_tokens=8, temperature=1.0, top_p=0.8, top_k=50, seed=5)),
            (9, Params(max_tokens=6, temperature=0.7, min_p=0.05, seed=3)),
            (17, Params(max_tokens=6, temperature=0.8, logprobs=2, seed=9)),           # the host sampler
            (14, Params(max_tokens=6, temperature=0.8, presence_penalty=0.5, seed=8))]  # the host sampler


def run_all(model, **config):
    tok = load_tokenizer("world")

    async def main():
        eng = AsyncEngine(model, tok, EngineConfig(max_sessions=6, step_token_budget=64, prefill_chunk=8,
                                                   **config))
        eng.start()
        try:
            async def one(n, params):
                prompt = [(i * 7919 + n) % model.config.vocab_size for i in range(n)]
                out = {}
                async for o in eng.generate(GenerateRequest(prompt, params, n=2 if params.seed == 11 else 1)):
                    for so in o.outputs:
                        out.setdefault(so.index, []).extend(so.token_ids)
                return out
            results = await asyncio.gather(*(one(n, p) for n, p in REQUESTS))
            return results, eng
        finally:
            await eng.stop(drain_timeout=5)
    return asyncio.run(main())


def test_engine_static_decode_equals_the_plain_path(tiny_model):
    """Seven sequences (one n=2) of mixed sampling through a 6-slot engine, prompts prefilled in chunks while
    others decode: cuda_graphs "on" (the static path, eager on CPU) gives the same tokens as "off"."""
    want, _ = run_all(tiny_model, cuda_graphs="off")
    got, eng = run_all(tiny_model, cuda_graphs="on")
    assert got == want
    graphs = eng.core.graphs
    assert not graphs.capture and graphs.steps > graphs.sampled > 0        # both samplers ran
