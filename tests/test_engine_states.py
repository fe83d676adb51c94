"""The engine's conversation states: starting from a given state, keeping the final one, snapshots at message
boundaries, whole-prompt hits, stored states found at submit, and initial states."""
import asyncio

import pytest
import torch

from bench.random_checkpoint import CheckpointShape, write_checkpoint
from engine import GenerateRequest, InvalidRequest, SamplingParams, StateStore, StoreConfig, TokenPrefix, load_model
from tests.test_engine import collect, prompt
from tests.test_engine import run_engine as run

SHAPE = CheckpointShape(n_layer=2, n_embd=64, head_size=32, vocab_size=65536, decay_lora=16, iclr_lora=16,
                        value_lora=16, gate_lora=16, logit_scale=4.0)
GREEDY = SamplingParams(max_tokens=8, temperature=0, logprobs=0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("states")
    write_checkpoint(d / "a.pth", SHAPE, seed=3)
    write_checkpoint(d / "b.pth", SHAPE, seed=4)
    return load_model(d / "a.pth", "cpu fp32"), load_model(d / "b.pth", "cpu fp32")


def greedy_path(model, tokens, steps, state=None):
    """Greedy tokens by model.forward one at a time: the ground truth of a continuation."""
    logits, state = model.forward(torch.tensor([tokens]), state)
    out = []
    for _ in range(steps):
        tok = int(logits[0].argmax())
        out.append(tok)
        logits, state = model.forward(torch.tensor([[tok]]), state)
    return out


def test_identical_prompt_resumes_whole_with_its_logits(models):
    model, _ = models
    p = prompt(50, seed=1)

    async def body(eng):
        first = await collect(eng, GenerateRequest(p, GREEDY))
        again = await collect(eng, GenerateRequest(p, GREEDY))
        return first, again, eng.stats()
    (toks, _, _, lps, _), (toks2, _, _, lps2, outs2), stats = run(model, body)
    assert outs2[0].cached_prompt_tokens == 50 and stats.prefix_cache_hits >= 1
    assert toks2 == toks and toks[0] == greedy_path(model, p, 8)
    assert [a.logprob for a in lps2[0]] == pytest.approx([a.logprob for a in lps[0]], abs=1e-5)


def test_kept_state_continues_exactly(models):
    """keep_state hands back the state after the prompt and every output token but the last: a request starting
    there with the last token and new ones gives what one cold prompt of the whole conversation gives."""
    model, _ = models
    p, more = prompt(40, seed=2), prompt(9, seed=3)

    async def body(eng):
        toks, *_, outs = await collect(eng, GenerateRequest(p, GREEDY, keep_state=True))
        kept = outs[-1].state
        assert kept is not None and kept.prefix == TokenPrefix().extend(p + toks[0][:-1])
        cont = toks[0][-1:] + more
        toks2, *_, outs2 = await collect(eng, GenerateRequest(cont, GREEDY, start=kept, keep_state=True))
        return toks[0], toks2[0], outs2
    out1, out2, outs2 = run(model, body, prefix_cache_bytes=0)
    history = p + out1 + more
    assert out2 == greedy_path(model, history, 8)
    assert outs2[0].prompt_tokens == len(history) and outs2[0].cached_prompt_tokens == len(p) + len(out1) - 1
    assert outs2[-1].state.prefix.length == len(history) + 7


def test_message_boundaries_are_snapshot_points(models):
    """A shared first message (a system prompt) and the history before the newest message are resumed."""
    model, _ = models
    system, turn, edit_a, edit_b = prompt(30, seed=4), prompt(25, seed=5), prompt(6, seed=6), prompt(7, seed=7)

    async def body(eng):
        await collect(eng, GenerateRequest(system + prompt(10, seed=8), GREEDY, boundaries=(30,)))
        *_, outs = await collect(eng, GenerateRequest(system + prompt(12, seed=9), GREEDY, boundaries=(30,)))
        first = outs[0].cached_prompt_tokens
        a = system + turn + edit_a
        await collect(eng, GenerateRequest(a, GREEDY, boundaries=(30, 55)))
        toks, *_, outs = await collect(eng, GenerateRequest(system + turn + edit_b, GREEDY, boundaries=(30, 55)))
        return first, outs[0].cached_prompt_tokens, toks[0]
    first, edited, toks = run(model, body)
    assert first == 30 and edited == 55
    assert toks == greedy_path(model, system + turn + edit_b, 8)


def test_stored_states_are_found_at_boundaries_and_only_for_their_model(models, tmp_path):
    """A conversation state saved by one engine is found by another sharing the store (a whole-history prompt
    resumes at the boundary), and never by an engine of other weights."""
    a, b = models
    history, new = prompt(70, seed=10), prompt(8, seed=11)

    def store():
        return StateStore(StoreConfig(memory_bytes=0, disk_dir=str(tmp_path / "states"), fsync=False))

    async def save(eng):
        *_, outs = await collect(eng, GenerateRequest(history, SamplingParams(max_tokens=0), keep_state=True))
        eng.states.save(outs[-1].state)

    async def resend(eng):
        toks, *_, outs = await collect(eng, GenerateRequest(history + new, GREEDY, boundaries=(70,)))
        return toks[0], outs[0].cached_prompt_tokens
    run(a, save, store=store())
    toks, cached = run(a, resend, store=store(), prefix_cache_bytes=0)
    assert cached == 70 and toks == greedy_path(a, history + new, 8)
    toks_b, cached_b = run(b, resend, store=store())
    assert cached_b == 0 and toks_b == greedy_path(b, history + new, 8)
    conv = run(a, lambda eng: asyncio.to_thread(eng.states.load, "", TokenPrefix().extend(history)), store=store())
    assert conv is not None and conv.prefix.length == 70
    assert run(b, lambda eng: asyncio.to_thread(eng.states.load, "", TokenPrefix().extend(history)),
               store=store()) is None


def test_initial_state_is_the_start_of_every_prompt(models):
    model, _ = models
    _, tuned = model.forward(torch.tensor([prompt(20, seed=12)]), None)
    tuned.att_x = [torch.zeros_like(t) for t in tuned.att_x]
    tuned.ffn_x = [torch.zeros_like(t) for t in tuned.ffn_x]
    p = prompt(12, seed=13)

    async def body(eng):
        plain, *_ = await collect(eng, GenerateRequest(p, GREEDY))
        with_state, *_ = await collect(eng, GenerateRequest(p, GREEDY, initial="poet"))
        again, *_, outs = await collect(eng, GenerateRequest(p, GREEDY, initial="poet"))
        with pytest.raises(InvalidRequest) as info:
            await eng.submit(GenerateRequest(p, GREEDY, initial="nobody"))
        return plain[0], with_state[0], again[0], outs[0].cached_prompt_tokens, info.value.param
    plain, tuned_out, again, cached, param = run(model, body, initials={"poet": tuned})
    assert tuned_out == greedy_path(model, p, 8, tuned.clone()) and tuned_out != plain
    assert again == tuned_out and cached == 12            # the cache keys snapshots by initial state too
    assert param == "model"


def test_request_checks():
    with pytest.raises(InvalidRequest) as info:
        GenerateRequest([1, 2, 3], n=2, keep_state=True)
    assert info.value.param == "n"
    with pytest.raises(InvalidRequest) as info:
        GenerateRequest([1, 2, 3], boundaries=(3,))
    assert info.value.param == "boundaries"
