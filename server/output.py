"""Pydantic models of what the server answers: exact responses, stream chunks and errors (extra fields forbidden, so
tests with the official client catch any drift)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, model_serializer


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


FinishReasonOut = Literal["stop", "length", "tool_calls"]


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


class FunctionCallOut(Strict):
    name: str
    arguments: str
    """JSON text."""


class ToolCallOut(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatMessageOut(Strict):
    """content is null when the reply only calls tools; tool_calls is left out when there are none."""
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCallOut] | None = None

    @model_serializer(mode="wrap")
    def _drop_no_calls(self, handler):
        out = handler(self)
        if out.get("tool_calls") is None:
            out.pop("tool_calls", None)
        return out


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


class _NoNulls(Strict):
    @model_serializer(mode="wrap")
    def _drop_nulls(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class FunctionDelta(_NoNulls):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_NoNulls):
    """A streamed call: the first delta of call ``index`` has id, type and function.name (arguments ""), later
    ones function.arguments fragments only."""
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta | None = None


class ChatDelta(Strict):
    """Serialised without null fields: the role appears in the first delta of a choice only."""
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

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
