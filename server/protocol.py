"""Pydantic models of the OpenAI surface: lenient requests (shared sampling mixin), exact responses and chunks."""
from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_serializer, model_validator

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


class ChatMessage(OpenAIRequest):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ResponseFormat(BaseModel):
    type: Literal["text"]


class ChatRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: NonNegInt | None = None
    logprobs: bool = False
    top_logprobs: LogprobCount | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=0)] | None = None
    """Tool calling is not supported; an empty list is accepted."""


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


# ------------------------------------------------------------------------------------------------ responses

class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(Strict):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(Strict):
    error: ErrorBody


class PromptTokensDetails(Strict):
    cached_tokens: int


class Usage(Strict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(Strict):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


FinishReasonOut = Literal["stop", "length"]


class CompletionChoice(Strict):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReasonOut | None = None


class CompletionResponse(Strict):
    """A completion, or one streamed chunk of it (then usage is null except in the final usage chunk)."""
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str


class TopLogprob(Strict):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Strict):
    content: list[TokenLogprobOut] | None
    refusal: None = None


class ChatMessageOut(Strict):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None


class ChatChoice(Strict):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReasonOut | None


class ChatResponse(Strict):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str


class ChatDelta(Strict):
    """Serialised without null fields: the role appears in the first delta of a choice only."""
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_nulls(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(Strict):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReasonOut | None = None


class ChatChunk(Strict):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str


class Embedding(Strict):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str
    """Floats, or base64 of little-endian float32 when encoding_format is base64."""


class EmbeddingUsage(Strict):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(Strict):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(Strict):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "goose"


class ModelList(Strict):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(Strict):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(Strict):
    prompt: str
    content: str


class TokenizerInfo(Strict):
    eos_token: str
    eos_token_id: int
    bos_token: str | None = None
    pad_token: str | None = None
    chat_template: str | None = None
    vocab_size: int
    tokenizer_class: str


class Health(Strict):
    status: Literal["ok", "ready"]
