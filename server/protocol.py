"""Pydantic models of OpenAI requests: lenient (unknown fields are accepted and logged once), with a shared sampling
mixin. What the server answers is in server/output.py."""
from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from engine import MAX_LOGPROBS, MAX_N, MAX_STOP, MAX_STOP_LEN, SEED_MAX, SEED_MIN

log = logging.getLogger("goose.server")
_warned: set[str] = set()


def _json_int(value):
    """JSON integers, including integral floats like 144.0; never booleans or strings (JSON Schema's view)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("Input should be an integer")
    return value


# Request models validate strictly (no "5" -> 5, no false -> 0), except that integers accept 144.0 as JSON does.
# Limits sit inside the Annotated, before the validator, so the OpenAPI schema shows them as minimum/maximum.
def _int(**limits):
    return Annotated[int, Field(strict=False, **limits), BeforeValidator(_json_int)]


Int = _int()
TokenId = NonNegInt = _int(ge=0)
PosInt = _int(ge=1)
Count = _int(ge=1, le=MAX_N)
LogprobCount = _int(ge=0, le=MAX_LOGPROBS)
Seed = _int(ge=SEED_MIN, le=SEED_MAX)   # the engine's rule (engine/request.py), shown in the schema
TokenList = Annotated[list[TokenId], Field(min_length=1)]
NonEmptyText = Annotated[str, Field(min_length=1)]
StopText = Annotated[str, Field(min_length=1, max_length=MAX_STOP_LEN)]
Prompt = NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1)] | TokenList \
    | Annotated[list[TokenList], Field(min_length=1)]


# ------------------------------------------------------------------------------------------------ requests

class OpenAIRequest(BaseModel):
    """Lenient input: unknown fields are accepted and logged once per name (clients keep adding parameters)."""
    model_config = ConfigDict(extra="allow", strict=True)

    @model_validator(mode="after")
    def _note_extra(self):
        for name in (self.model_extra or {}):
            if name not in _warned and len(_warned) < 256:
                _warned.add(name)
                log.info("ignoring unsupported request field %r", name[:60])
        return self


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaFormat(OpenAIRequest):
    """response_format.json_schema; strict is accepted (constrained output is always exact)."""
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIRequest):
    """{"type": "text" | "json_object" | "json_schema"}; llama.cpp's {"type": "json_object", "schema": {...}} too."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(OpenAIRequest):
    """vLLM's structured_outputs: exactly one of json (a schema), regex, choice, grammar (Lark or GBNF),
    json_object."""
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: Annotated[str, Field(min_length=1)] | None = None
    choice: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] | None = None
    grammar: Annotated[str, Field(min_length=1)] | None = None
    json_object: bool | None = None


class SamplingFields(OpenAIRequest):
    """Fields shared by /v1/completions and /v1/chat/completions; defaults are resolved in generation.py."""
    model: str | None = None
    """Optional: lm-evaluation-harness's gguf client omits it."""
    max_tokens: NonNegInt | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: Count = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP)] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(None, max_length=1024)
    seed: Seed | None = None
    user: str | None = None
    # RWKV / vLLM extras
    top_k: NonNegInt | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    penalty_decay: float | None = Field(None, gt=0, le=1)
    """RWKV penalty decay: occurrence counts are multiplied by this after every token."""
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP)] | None = None
    # structured outputs (server/structured.py turns them into an engine constraint)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None


class CompletionRequest(SamplingFields):
    prompt: Prompt
    echo: bool = False
    logprobs: LogprobCount | None = None
    best_of: Count | None = None
    suffix: None = None
    """Insertion (suffix) is not supported; only null is accepted."""


class TextPart(OpenAIRequest):
    type: Literal["text"]
    text: str


class CalledFunction(OpenAIRequest):
    name: str
    arguments: str | dict[str, Any] = "{}"
    """JSON text, as OpenAI sends it (an object is accepted too)."""


class AssistantToolCall(OpenAIRequest):
    """A call an earlier assistant message made (messages[i].tool_calls[j])."""
    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(OpenAIRequest):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None
    """Assistant messages: the calls it made."""
    tool_call_id: str | None = None
    """Tool messages: the call this result answers."""


MAX_TOOLS = 128


class FunctionDefinition(OpenAIRequest):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    """A JSON schema of the arguments (an object); none means no arguments."""
    strict: bool | None = None
    """Accepted; constrained calls always match their parameters."""


class Tool(OpenAIRequest):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(OpenAIRequest):
    name: str


class NamedToolChoice(OpenAIRequest):
    type: Literal["function"]
    function: NamedFunction


class ChatRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: NonNegInt | None = None
    logprobs: bool = False
    top_logprobs: LogprobCount | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    """Default: "auto" when tools are given."""
    parallel_tool_calls: bool | None = None
    """Default true: a reply may make several calls."""


class EmbeddingRequest(OpenAIRequest):
    input: Prompt
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: PosInt | None = None
    user: str | None = None


class TokenizeRequest(OpenAIRequest):
    """lm-evaluation-harness sends {"prompt", "add_special_tokens"}; llama.cpp clients {"content", "add_special"}."""
    prompt: str | None = None
    content: str | None = None
    model: str | None = None
    add_special_tokens: bool = True
    add_special: bool | None = None
    """Accepted for compatibility; RWKV tokenizers add no special tokens (no BOS)."""

    @property
    def text(self) -> str:
        """prompt, else content, else the empty string."""
        return self.prompt if self.prompt is not None else self.content or ""


class DetokenizeRequest(OpenAIRequest):
    tokens: list[TokenId]
    model: str | None = None
