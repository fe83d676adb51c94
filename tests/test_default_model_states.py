"""Conversations as states on the shipped default model: a 10-turn chain by previous_response_id through the
official client against cold replays, and a state-tuning file served as "<model>:<state>" against the rwkv
package continuing from the same state."""
import asyncio
import contextlib
from dataclasses import replace
from pathlib import Path

import torch

from server.serve import add_initial_states, load_engine
from server.settings import load_settings
from tests.server.conftest import openai_client, serve

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ["What do you think of Mr. Darcy?", "And of his sister?", "Is Pemberley a fine house?",
             "Will you walk with me tomorrow?", "What news from London?", "Do you like to dance?",
             "Shall we read a novel together?", "Who is the most amiable young man you know?",
             "Is your mother well?", "Good night, then."]


@contextlib.asynccontextmanager
async def server(*, cache: bool = True, initial_states=None):
    settings = load_settings(ROOT / "config.yaml")
    if not cache:
        settings = replace(settings, engine=replace(settings.engine, prefix_cache_bytes=0),
                           states=replace(settings.states, memory_bytes=0))
    engine, info = load_engine(settings)
    if initial_states:
        add_initial_states(engine, initial_states)
        info = replace(info, initial_states=tuple(initial_states))
    async with serve(engine, settings, info=info) as http:
        yield openai_client(http), info.name


def test_ten_turn_chain_prefills_only_new_input_and_equals_cold_replays():
    """Each turn's cached_tokens covers the whole history, and its greedy output is what a server with no cache
    and no store answers to the whole conversation."""
    async def main():
        items, turns = [], []
        async with server() as (client, name), server(cache=False) as (cold, _):
            prev = None
            for q in QUESTIONS:
                r = await client.responses.create(model=name, input=q, previous_response_id=prev and prev.id,
                                                  max_output_tokens=30, temperature=0)
                items.append({"role": "user", "content": q})
                c = await cold.responses.create(model=name, input=items, store=False, max_output_tokens=30,
                                                temperature=0)
                turns.append((r, c, prev))
                items.append({"role": "assistant", "content": r.output_text})
                prev = r
        return turns
    turns = asyncio.run(main())
    for i, (r, cold, prev) in enumerate(turns):
        assert r.output_text == cold.output_text, (i, r.output_text, cold.output_text)
        assert r.usage.input_tokens == cold.usage.input_tokens and cold.usage.input_tokens_details.cached_tokens == 0
        if prev is not None:
            history = prev.usage.input_tokens + prev.usage.output_tokens - 1
            assert r.usage.input_tokens_details.cached_tokens >= history, i
    assert turns[-1][0].usage.input_tokens > 150          # a real history: ten turns of question and answer
    assert len({r.output_text for r, _, _ in turns}) > 5   # and real answers


def test_state_tuning_file_served_matches_the_rwkv_package(tmp_path):
    """A state file named in model.initial_states, used as the model "rwkv7-austen:<state>", changes the output,
    and the output is the rwkv package's greedy continuation from the same state (zero token shifts)."""
    from rwkv.model import RWKV

    from engine.formats.convert import main as convert
    from tests.test_state_file import package_time_states
    assert convert([str(ROOT / "models/rwkv7-austen/model.safetensors"), str(tmp_path / "austen.pth"), "-q"]) == 0
    theirs = RWKV(str(tmp_path / "austen"), "cpu fp32")
    warm = [0] + list(range(300, 340))                       # some text the state remembers
    states = package_time_states(theirs, warm)
    torch.save(states, tmp_path / "tuned.pth")
    prompt = [0, 1000, 1200, 45, 900]

    state = []
    for i in range(len(states)):
        wkv = states[f"blocks.{i}.att.time_state"]
        C = wkv.shape[0] * wkv.shape[1]
        state += [torch.zeros(C), wkv.clone(), torch.zeros(C)]
    expected, tokens = [], list(prompt)
    for _ in range(12):
        logits, state = theirs.forward(tokens, state)
        tokens = [int(logits.argmax())]
        expected.append(tokens[0])

    async def main():
        async with server(initial_states={"warm": str(tmp_path / "tuned.pth")}) as (client, name):
            models = [m.id async for m in client.models.list()]
            outs = {}
            for model in (name, f"{name}:warm"):
                r = await client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                                    logprobs=0)
                outs[model] = r.choices[0]
            return models, outs, name
    models, outs, name = asyncio.run(main())
    assert models == [name, f"{name}:warm"]
    from engine import load_tokenizer
    tok = load_tokenizer(str(ROOT / "models/rwkv7-austen/tokenizer.json"))
    tuned = outs[f"{name}:warm"]
    assert tuned.text == tok.decode(expected[:len(tuned.logprobs.tokens)])
    assert tuned.text != outs[name].text
