"""schemathesis against the app's own OpenAPI schema (FakeEngine), all default checks, bounded examples, with and
without an API key: no 5xx, every response matches the declared schema, schema-violating input is refused, and the
keyed app refuses requests that ignore the key.

JSON Schema cannot state a few rules (cross-field ones, the vocabulary, token counts after tokenizing); a
schema-valid request that breaks one of them must get 400, which the test asserts instead of positive acceptance.
"""
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from engine import EngineConfig, InvalidRequest
from engine.text.chat import render_chat
from server.app import ModelInfo, create_app
from server.settings import ServerSettings, Settings
from tests.server.conftest import MODEL
from tests.server.fake_engine import FakeEngine

KEY = "st-key"
ENGINE = EngineConfig(max_sessions=4, max_waiting=16, step_token_budget=64, default_max_tokens=8, max_max_tokens=64,
                      max_prompt_tokens=256)
N_EMBD = 16


def _app(bpe, keys: tuple[str, ...]):
    settings = Settings(server=ServerSettings(api_keys=keys, allowed_hosts=("testserver", "localhost"),
                                              max_body_bytes=64 << 10, max_batch=8), engine=ENGINE)
    return create_app(FakeEngine(bpe, ENGINE, n_embd=N_EMBD), settings, ModelInfo(name=MODEL))


@pytest.fixture(scope="module")
def open_schema(bpe):
    return schemathesis.openapi.from_asgi("/openapi.json", _app(bpe, ()))


@pytest.fixture(scope="module")
def keyed_schema(bpe):
    return schemathesis.openapi.from_asgi("/openapi.json", _app(bpe, (KEY,)),
                                          headers={"Authorization": f"Bearer {KEY}"})


def semantic_violation(path: str, body, bpe) -> str | None:
    """The documented rule a schema-valid body breaks, or None."""
    if not isinstance(body, dict):
        return None
    if path == "/v1/responses":
        return responses_violation(body, bpe)
    vocab = bpe.vocab_size
    ids = []
    for key in ("prompt", "input", "tokens", "stop_token_ids"):
        value = body.get(key)
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, str) and path != "/tokenize" and len(bpe.encode(item, allow_special=True)) > 256:
                return "prompt longer than engine.max_prompt_tokens"
            ids += [t for t in (item if isinstance(item, list) else [item]) if isinstance(t, (int, float))]
        if isinstance(value, list) and value and not isinstance(value[0], (int, float)) and len(value) > 8:
            return "more prompts than server.max_batch"
    if any(t >= vocab for t in ids) or any(not k.lstrip("-").isdigit() or not 0 <= int(k) < vocab
                                           for k in (body.get("logit_bias") or {})):
        return "token id outside the vocabulary"
    messages = body.get("messages")
    if path == "/v1/chat/completions" and isinstance(messages, list):
        try:
            text = render_chat([{"role": m.get("role"), "content": m.get("content")} for m in messages])
        except InvalidRequest:
            return "message the chat renderer refuses"
        if len(bpe.encode(text)) + 1 > ENGINE.max_prompt_tokens:
            return "chat prompt longer than engine.max_prompt_tokens"
    if body.get("stream_options") is not None and not body.get("stream"):
        return "stream_options without stream"
    if body.get("top_logprobs") is not None and not body.get("logprobs"):
        return "top_logprobs without logprobs"
    if body.get("best_of") is not None and body["best_of"] != body.get("n", 1):
        return "best_of other than n"
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if isinstance(limit, (int, float)) and limit > ENGINE.max_max_tokens:
        return "max_tokens over engine.max_max_tokens"
    prompts = body.get("prompt")
    count = len(prompts) if isinstance(prompts, list) and prompts and isinstance(prompts[0], (str, list)) else 1
    if count * body.get("n", 1) > ENGINE.max_waiting:
        return "more sequences than engine.max_waiting"
    stop = body.get("stop")
    if path == "/v1/chat/completions" and isinstance(stop, list) and len(set(stop) - {"\n\n", "\nUser:"}) > 14:
        return "more stop strings than room beside the chat template's"
    if isinstance(body.get("dimensions"), (int, float)) and body["dimensions"] > N_EMBD:
        return "dimensions wider than the model"
    return None


def responses_violation(body: dict, bpe) -> str | None:
    """The rules of POST /v1/responses that its schema cannot state."""
    from pydantic import ValidationError

    from server.responses_items import chat_messages, stored_input_items
    from server.responses_protocol import ResponsesRequest
    try:
        req = ResponsesRequest.model_validate(body)
    except ValidationError:
        return None
    if req.previous_response_id is not None:
        return "a previous response that was never stored"
    if req.top_logprobs:
        return "top_logprobs on /v1/responses"
    if req.max_output_tokens is not None and req.max_output_tokens > ENGINE.max_max_tokens:
        return "max_output_tokens over engine.max_max_tokens"
    try:
        text = render_chat(chat_messages(req.instructions, stored_input_items(req)))
    except InvalidRequest:
        return "input the chat renderer refuses"
    if len(bpe.encode(text)) + 1 > ENGINE.max_prompt_tokens:
        return "input longer than engine.max_prompt_tokens"
    return None


STRUCTURED = ("response_format", "structured_outputs", "tools", "tool_choice", "text")


def may_be_refused(body) -> bool:
    """A grammar, schema or tool list: whether it compiles, fits the tools or is supported is decided when the
    request is prepared (its 400 names the field), which JSON Schema cannot say beforehand."""
    return isinstance(body, dict) and any(body.get(k) not in (None, {}, [], "auto") for k in STRUCTURED)


def _check(case, bpe, headers=None):
    rule = semantic_violation(case.path, case.body, bpe) if case.meta.generation.mode.is_positive else None
    if rule is None and case.meta.generation.mode.is_positive and may_be_refused(case.body):
        response = case.call_and_validate(headers=headers, excluded_checks=[positive_data_acceptance])
        assert response.status_code == 200 or (
            response.status_code == 400 and (response.json()["error"]["param"] or "").startswith(STRUCTURED)), \
            (response.status_code, response.text)
        return
    if rule is None:
        case.call_and_validate(headers=headers)
        return
    response = case.call_and_validate(headers=headers, excluded_checks=[positive_data_acceptance])
    assert response.status_code in (400, 404), (rule, response.status_code, response.text)


open_api = schemathesis.pytest.from_fixture("open_schema")
keyed_api = schemathesis.pytest.from_fixture("keyed_schema")
BOUNDED = settings(max_examples=int(os.environ.get("ST_MAX_EXAMPLES", "8")), deadline=None, derandomize=True,
                   database=None, phases=[Phase.explicit, Phase.generate],
                   suppress_health_check=list(HealthCheck))


@open_api.parametrize()
@BOUNDED
def test_open_api(case, bpe):
    _check(case, bpe)


@keyed_api.parametrize()
@BOUNDED
def test_keyed_api(case, bpe):
    _check(case, bpe, {"Authorization": f"Bearer {KEY}"})
