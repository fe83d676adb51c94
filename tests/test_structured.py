"""engine/structured: grammars over the real World and default-model vocabularies, driven like the engine drives them
(fill a batch of masks, apply them to logits, sample, accept); outputs checked with jsonschema and re."""
from __future__ import annotations

import json
import random
import re
import threading
import time
from pathlib import Path

import jsonschema
import pytest
import torch

from engine import InvalidRequest, RequestFailed, SamplingParams
from engine.sampling import SamplerRow, make_generator, sample
from engine.structured import (MAX_SPEC_CHARS, Choice, Grammar, GrammarCompiler, JsonObject, JsonSchema, MaskFiller,
                               Regex, ToolCalls, apply_mask)
from engine.text.tokenizer import WorldTokenizer, load_tokenizer
from engine.text.tool_parser import parse_tool_calls
from engine.text.tools import ToolFormat, ToolFunction

AUSTEN = Path(__file__).resolve().parent.parent / "models" / "rwkv7-austen" / "tokenizer.json"
NEG_INF = float("-inf")


@pytest.fixture(scope="module")
def world():
    return WorldTokenizer()


@pytest.fixture(scope="module")
def world_compiler(world):
    return GrammarCompiler(world)


@pytest.fixture(scope="module")
def austen():
    return load_tokenizer(AUSTEN)


@pytest.fixture(scope="module")
def austen_compiler(austen):
    return GrammarCompiler(austen)


@pytest.fixture(scope="module")
def filler():
    return MaskFiller(threads=2)


def walk(compiler, spec, seeds, filler, max_steps=400, bias=None):
    """Run one sequence per seed in one batch: each step fill the masks, apply them to logits, pick a token
    uniformly among the allowed ones (or by ``bias`` weights when given), accept it. Returns the texts."""
    compiled = compiler.compile(spec)
    matchers = [compiled.matcher() for _ in seeds]
    rngs = [random.Random(s) for s in seeds]
    tokens: list[list[int]] = [[] for _ in seeds]
    live = [True] * len(seeds)
    tok, eot = compiler.vocab.tokenizer, compiler.vocab.eot_id
    for _ in range(max_steps):
        batch = filler.fill([m if alive else None for m, alive in zip(matchers, live)])
        if batch is None:
            break
        assert not batch.errors
        logits = torch.zeros(len(seeds), compiler.vocab_size)
        apply_mask(logits, batch)
        for r in range(len(seeds)):
            allowed = (logits[r] > NEG_INF).nonzero().flatten().tolist()
            if not live[r]:
                assert len(allowed) == compiler.vocab_size          # a row without a matcher is untouched
                continue
            assert (eot in allowed) == matchers[r].can_end            # end-of-text exactly where the grammar may end
            assert allowed and all(t < tok.vocab_size for t in allowed)
            t = rngs[r].choice(allowed) if bias is None else bias(rngs[r], allowed)
            if t == eot:
                live[r] = False
                continue
            matchers[r].accept(t)
            tokens[r].append(t)
            if matchers[r].is_finished:
                live[r] = False
    assert not any(live), "a grammar did not end within max_steps"
    return [tok.decode(ids) for ids in tokens]


SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 6},
        "address": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                                     "city": {"type": "string", "maxLength": 4}},
                    "required": ["zip", "city"], "additionalProperties": False}},
        "required": ["name", "address"], "additionalProperties": False},
    "arrays": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
        "grid": {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                         "maximum": 9}, "maxItems": 2},
                 "minItems": 2, "maxItems": 2}},
        "required": ["tags", "grid"], "additionalProperties": False},
    "optional_and_bounds": {"type": "object", "properties": {
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "score": {"type": "number", "minimum": -1.5, "maximum": 2.5},
        "ok": {"type": "boolean"}, "note": {"type": ["string", "null"], "maxLength": 3}},
        "required": ["age"], "additionalProperties": False},
    "pattern_and_const": {"type": "object", "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{2,3}$"}, "kind": {"const": "user"},
        "level": {"enum": [1, 2, "three", None]}},
        "required": ["id", "kind", "level"], "additionalProperties": False},
    "defs_and_ref": {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -5,
                                                                              "maximum": 5}},
                                      "required": ["x"], "additionalProperties": False}},
                     "type": "array", "items": {"$ref": "#/$defs/pt"}, "minItems": 1, "maxItems": 3},
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_outputs_always_validate(name, world_compiler, austen_compiler, filler):
    schema = SCHEMAS[name]
    for compiler in (world_compiler, austen_compiler):
        for text in walk(compiler, JsonSchema.of(schema, "response_format.json_schema.schema"), range(12), filler):
            jsonschema.validate(json.loads(text), schema)
            assert "\n" not in text                     # never a chat stop string


def test_json_object_is_any_object(austen_compiler, filler):
    # a random walk over "any object" rarely ends by itself, so close whatever is open when allowed
    def closing(rng, allowed):
        closers = [t for t in allowed if austen_compiler.vocab.tokenizer.id_to_token_bytes(t) in (b"}", b"]", b'"')]
        return rng.choice(closers) if closers and rng.random() < 0.6 else rng.choice(allowed)
    for text in walk(austen_compiler, JsonObject(), range(8), filler, max_steps=600, bias=closing):
        assert isinstance(json.loads(text), dict)


def test_regex_and_choice(world_compiler, austen_compiler, filler):
    pattern = r"[a-z]{1,6}@[a-z]{2,4}\.(com|org)"
    for compiler in (world_compiler, austen_compiler):
        assert all(re.fullmatch(pattern, t) for t in walk(compiler, Regex(pattern), range(10), filler))
    options = ("yes", "no", "maybe so", "café ☕", 'a "quoted"\nline')
    seen = set(walk(world_compiler, Choice(options), range(40), filler))
    assert seen <= set(options) and len(seen) >= 3


def test_lark_and_gbnf_grammars(world_compiler, filler):
    lark = 'start: expr\nexpr: NUM | "(" expr OP expr ")"\nOP: "+" | "*"\nNUM: /[1-9]/\n'
    for text in walk(world_compiler, Grammar(lark), range(10), filler):
        assert re.fullmatch(r"[()1-9+*]+", text) and eval(text) > 0     # well-formed arithmetic
    gbnf = 'root ::= "ab" [0-9] [0-9]?'
    assert all(re.fullmatch(r"ab[0-9]{1,2}", t) for t in walk(world_compiler, Grammar(gbnf), range(8), filler))


def test_model_vocabulary_wider_than_the_tokenizer(austen, filler):
    compiler = GrammarCompiler(austen, vocab_size=austen.vocab_size + 64)
    batch = filler.fill([compiler.compile(Regex("[a-z]+")).matcher()])
    logits = torch.zeros(1, austen.vocab_size + 64)
    apply_mask(logits, batch)
    assert torch.isinf(logits[0, austen.vocab_size:]).all() and (logits[0, :austen.vocab_size] == 0).any()


def test_rows_without_a_matcher_are_untouched_and_free(world_compiler, filler):
    compiled = world_compiler.compile(Regex("[0-9]{3}"))
    assert filler.fill([None, None]) is None
    logits = torch.randn(4, world_compiler.vocab_size)
    before = logits.clone()
    apply_mask(logits, None)
    assert torch.equal(logits, before)
    a, b = compiled.matcher(), compiled.matcher()
    b.accept(world_compiler.vocab.tokenizer.encode("1")[0])
    apply_mask(logits, filler.fill([a, None, b, None]))
    assert torch.equal(logits[1], before[1]) and torch.equal(logits[3], before[3])
    for row, m in ((0, a), (2, b)):
        allowed = set(m.allowed_token_ids())
        finite = set((logits[row] > NEG_INF).nonzero().flatten().tolist())
        assert finite == allowed and 0 < len(allowed) < 1000
        assert torch.equal(logits[row, sorted(allowed)], before[row, sorted(allowed)])


def test_clones_are_independent(world, world_compiler):
    m = world_compiler.compile(JsonSchema.of(SCHEMAS["nested"], "x")).matcher()
    for t in world.encode('{"name": "ab'):
        m.accept(t)
    start = m.allowed_token_ids()
    c = m.clone()
    for t in world.encode('c", "address": {'):
        c.accept(t)
    assert m.allowed_token_ids() == start and c.allowed_token_ids() != start
    for t in world.encode('", "address": {"zip": "12345", "city": "x"}}'):
        m.accept(t)
    assert m.is_finished and not c.is_finished and m.tokens > c.tokens - 20


def test_end_and_rejected_tokens(world, world_compiler):
    m = world_compiler.compile(Regex("ab+")).matcher()
    m.accept(world.encode("a")[0])
    assert not m.can_end and 0 not in m.allowed_token_ids()
    m.accept(world.encode("b")[0])
    assert m.can_end and not m.is_finished and 0 in m.allowed_token_ids() and m.end_token_ids == (0,)
    with pytest.raises(RequestFailed, match="breaks the output's grammar"):
        m.accept(world.encode("z")[0])
    assert m.error


def test_masked_logits_through_the_sampler(world, world_compiler, filler):
    """The mask composes with every sampler path: no bias, penalty, temperature or filter revives a token."""
    compiled = world_compiler.compile(Choice(("alpha", "beta", "gamma")))
    banned_word = world.encode("zeta")[0]
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.5, top_p=0.5),
              SamplingParams(top_k=5, min_p=0.1), SamplingParams(presence_penalty=-2, frequency_penalty=-2),
              SamplingParams(logit_bias=((banned_word, 100.0),)), SamplingParams(temperature=0.7)]
    for seed in range(5):
        matchers = [compiled.matcher() for _ in params]
        logits = torch.randn(len(params), world.vocab_size, generator=torch.Generator().manual_seed(seed)) * 5
        apply_mask(logits, filler.fill(matchers))
        rows = [SamplerRow(p, make_generator(seed, i), torch.full((world.vocab_size,), 3.0)) for i, p in
                enumerate(params)]
        tokens, _ = sample(logits, rows)
        for m, t in zip(matchers, tokens):
            assert t in m.allowed_token_ids()
            m.accept(t)


@pytest.mark.parametrize("spec,param,words", [
    (JsonSchema.of({"type": "object", "not": {"type": "null"}}, "response_format.json_schema.schema"),
     "response_format.json_schema.schema", "'not', which structured outputs do not support"),
    (JsonSchema.of({"type": "string", "format": "zipcode"}, "structured_outputs.json"), "structured_outputs.json",
     "format 'zipcode'"),
    (JsonSchema.of({"$ref": "#/$defs/missing"}, "response_format.json_schema.schema"),
     "response_format.json_schema.schema", "does not exist"),
    (JsonSchema.of({"type": "integer", "minimum": 5, "maximum": 1}, "structured_outputs.json"),
     "structured_outputs.json", "never be satisfied"),
    (Regex("a(b", "structured_outputs.regex"), "structured_outputs.regex", "not a valid regular expression"),
    (Regex("a(?=b)", "structured_outputs.regex"), "structured_outputs.regex", "look-around"),
    (Grammar("start: foo", "structured_outputs.grammar"), "structured_outputs.grammar", "not usable"),
    (ToolCalls((ToolFunction("ok", parameters='{"type": "object"}', param="tools[0].function.parameters"),
                ToolFunction("bad", parameters='{"type": "object", "not": {}}', param="tools[1].function.parameters"))),
     "tools[1].function.parameters", "'not'"),
])
def test_bad_specs_name_the_field(spec, param, words, world_compiler):
    with pytest.raises(InvalidRequest) as info:
        world_compiler.compile(spec)
    assert info.value.param == param and words in str(info.value)
    assert "<state>" not in str(info.value) and "\n" not in str(info.value)


def test_huge_and_explosive_schemas_are_refused_fast(world_compiler):
    huge = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(MAX_SPEC_CHARS // 20)}}
    t0 = time.perf_counter()
    with pytest.raises(InvalidRequest, match="too large") as info:
        JsonSchema.of(huge, "response_format.json_schema.schema")
    assert info.value.param == "response_format.json_schema.schema" and time.perf_counter() - t0 < 1
    explosive = {"allOf": [{"anyOf": [{"type": "object", "properties": {f"p{i}_{k}": {"type": "integer"}},
                                       "required": [f"p{i}_{k}"]} for k in range(8)]} for i in range(8)]}
    t0 = time.perf_counter()
    with pytest.raises(InvalidRequest, match="too large or complex"):
        world_compiler.compile(JsonSchema.of(explosive, "structured_outputs.json"))
    assert time.perf_counter() - t0 < 5


def test_cache_and_threads(world_compiler):
    spec = JsonSchema.of({"type": "object", "properties": {"a": {"type": "integer"}}}, "response_format")
    same = JsonSchema.of({"type": "object", "properties": {"a": {"type": "integer"}}}, "structured_outputs.json")
    assert world_compiler.compile(spec) is world_compiler.compile(same)       # param is not part of the key
    results, errors = [], []

    def work(k):
        try:
            for j in range(5):
                c = world_compiler.compile(Regex(f"x{k % 3}[0-9]{{{j + 1}}}"))
                results.append(c.matcher().allowed_token_ids())
        except Exception as e:          # noqa: BLE001 - collected for the assertion below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 30


WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "y": {"$ref": "#/$defs/small"}},
       "$defs": {"small": {"type": "integer", "minimum": -9, "maximum": 9}},
       "required": ["x", "y"], "additionalProperties": False}
TOOLS = (ToolFunction("get_weather", "Weather now", json.dumps(WEATHER), "tools[0].function.parameters"),
         ToolFunction("add", None, json.dumps(ADD), "tools[1].function.parameters"))
SCHEMA_OF = {"get_weather": WEATHER, "add": ADD}


def _check_calls(text, fmt=ToolFormat(), parallel=True):
    reply = parse_tool_calls(text, fmt)
    assert reply.calls and reply.content is None, text
    assert parallel or len(reply.calls) == 1
    for call in reply.calls:
        jsonschema.validate(json.loads(call.arguments), SCHEMA_OF[call.name])
    return reply


@pytest.mark.parametrize("parallel", [True, False])
def test_required_tool_calls_are_valid_calls(parallel, world_compiler, austen_compiler, filler):
    for compiler in (world_compiler, austen_compiler):
        spec = ToolCalls(TOOLS, "required", parallel)
        for text in walk(compiler, spec, range(10), filler):
            _check_calls(text, parallel=parallel)


def test_named_tool_choice_and_other_formats(world_compiler, filler):
    fmt = ToolFormat(begin="<functioncall> ", end="", separator="\n")
    for text in walk(world_compiler, ToolCalls(TOOLS[1:], "required", False, fmt), range(8), filler):
        assert [c.name for c in _check_calls(text, fmt, parallel=False).calls] == ["add"]


def test_auto_tool_calls_free_text_then_only_calls(world, world_compiler, filler):
    compiled = world_compiler.compile(ToolCalls(TOOLS, "auto"))
    m = compiled.matcher()
    for t in world.encode(" The weather is fine.\nBye"):
        m.accept(t)
    assert m.can_end and 0 in m.allowed_token_ids()                         # plain text may end
    for t in world.encode(" Let me look. <tool_call>"):
        m.accept(t)
    assert [world.id_to_token_bytes(t) for t in m.allowed_token_ids()] == [b"\n"]
    prefix = world.encode(" Let me look. <tool_call>")
    for text in walk_from(world_compiler, compiled, prefix, range(10), filler):
        reply = parse_tool_calls(text)
        assert reply.content == " Let me look." and reply.calls
        for call in reply.calls:
            jsonschema.validate(json.loads(call.arguments), SCHEMA_OF[call.name])


def test_auto_with_a_json_answer(world_compiler, filler):
    spec = ToolCalls(TOOLS, "auto", answer=JsonSchema.of({"type": "object", "properties": {"v": {"enum": [1, 2]}},
                                                          "required": ["v"], "additionalProperties": False}, "x"))
    for text in walk(world_compiler, spec, range(12), filler):
        reply = parse_tool_calls(text)
        if not reply.calls:
            assert json.loads(reply.content)["v"] in (1, 2)


def walk_from(compiler, compiled, prefix, seeds, filler, max_steps=300):
    """walk() for matchers that have already accepted ``prefix``; returns the texts including it."""
    tok = compiler.vocab.tokenizer
    out = []
    for seed in seeds:
        m, rng, ids = compiled.matcher(), random.Random(seed), list(prefix)
        for t in prefix:
            m.accept(t)
        for _ in range(max_steps):
            logits = torch.zeros(1, compiler.vocab_size)
            apply_mask(logits, filler.fill([m]))
            t = rng.choice((logits[0] > NEG_INF).nonzero().flatten().tolist())
            if t == compiler.vocab.eot_id:
                break
            m.accept(t)
            ids.append(t)
            if m.is_finished:
                break
        else:
            pytest.fail("the call grammar did not end")
        out.append(tok.decode(ids))
    return out


def test_sparse_and_dense_mask_paths_agree(world_compiler, filler):
    import engine.structured.masks as masks
    few = world_compiler.compile(Regex("[0-9]{2}")).matcher()           # a handful of tokens: sparse
    many = world_compiler.compile(Regex("(.|\\n)*")).matcher()          # nearly everything: dense
    for matchers in ([few, None, few.clone()], [many, few, None], [None, many]):
        batch = filler.fill(matchers)
        logits = torch.randn(len(matchers), world_compiler.vocab_size + 32)
        a, b = logits.clone(), logits.clone()
        masks._apply_sparse(a, batch)
        masks._apply_dense(b, batch)
        assert torch.equal(a, b)
        for r, m in enumerate(matchers):
            finite = (a[r] > NEG_INF).nonzero().flatten().tolist()
            assert finite == (m.allowed_token_ids() if m else list(range(logits.shape[1])))


def test_tool_arguments_take_only_the_declared_properties():
    """Tool parameters that say nothing of additionalProperties are closed in the call grammar (nested objects too),
    and what a schema says explicitly stays as it is."""
    from engine.structured.lark import closed
    schema = {"type": "object", "properties": {"q": {"type": "string"}, "opts": {"type": "object", "properties": {
        "n": {"type": "integer"}}}, "free": {"type": "object", "properties": {}, "additionalProperties": True}}}
    out = closed(schema)
    assert out["additionalProperties"] is False and out["properties"]["opts"]["additionalProperties"] is False
    assert out["properties"]["free"]["additionalProperties"] is True and "additionalProperties" not in schema
