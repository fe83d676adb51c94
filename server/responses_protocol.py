"""Pydantic models of the Responses API (POST /v1/responses, GET/DELETE /v1/responses/{id}, .../input_items):
lenient requests, exact response objects, and the conversions between them (items, ids, pages)."""
from __future__ import annotations

import secrets
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_serializer

from server.output import Strict
from server.protocol import LogprobCount, NonNegInt, OpenAIRequest, PosInt, Seed

ItemStatus = Literal["in_progress", "completed", "incomplete"]
ResponseStatus = Literal["completed", "failed", "in_progress", "cancelled", "queued", "incomplete"]
MetadataKey = Annotated[str, Field(max_length=64)]
MetadataValue = Annotated[str, Field(max_length=512)]
Metadata = Annotated[dict[MetadataKey, MetadataValue], Field(max_length=16)]
"""At most 16 pairs; keys up to 64 characters, values up to 512 (OpenAI's limits)."""


def new_id(prefix: str) -> str:
    """An id like OpenAI's: resp_, msg_, fc_, call_, fco_ followed by 48 hex digits."""
    return f"{prefix}_{secrets.token_hex(24)}"


# ------------------------------------------------------------------------------------------------ requests

class InputText(OpenAIRequest):
    type: Literal["input_text"]
    text: str


class OutputTextIn(OpenAIRequest):
    """An assistant turn's text, as clients replay earlier output in input."""
    type: Literal["output_text"]
    text: str


InputContent = Annotated[InputText | OutputTextIn, Field(discriminator="type")]


class MessageItem(OpenAIRequest):
    """A message; "type" may be omitted (EasyInputMessage). input_image/input_file parts are not supported."""
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputContent]
    id: str | None = None
    status: ItemStatus | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(OpenAIRequest):
    """A tool call the model made earlier, replayed by a client that keeps its own history."""
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: ItemStatus | None = None


class FunctionCallOutputItem(OpenAIRequest):
    """The result of a tool call, sent back by the client."""
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputText]
    id: str | None = None
    status: ItemStatus | None = None

    @property
    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


def _item_type(value) -> str | None:
    if isinstance(value, dict):
        return value.get("type", "message")
    return getattr(value, "type", None)


InputItem = Annotated[Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
                      | Annotated[FunctionCallOutputItem, Tag("function_call_output")], Discriminator(_item_type)]


class FunctionTool(OpenAIRequest):
    """A function tool in the Responses API's flat form (no nested "function" object)."""
    type: Literal["function"]
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoiceFunction(OpenAIRequest):
    type: Literal["function"]
    name: str


class FormatText(OpenAIRequest):
    type: Literal["text"]


class FormatJSONObject(OpenAIRequest):
    type: Literal["json_object"]


class FormatJSONSchema(OpenAIRequest):
    type: Literal["json_schema"]
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


TextFormat = Annotated[FormatText | FormatJSONObject | FormatJSONSchema, Field(discriminator="type")]


class TextConfig(OpenAIRequest):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(OpenAIRequest):
    """POST /v1/responses. Sampling defaults are resolved by the server's one defaults function."""
    model: str | None = None
    input: str | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = None
    """A system message placed before the input; not carried over from previous_response_id."""
    previous_response_id: str | None = None
    store: bool = True
    stream: bool = False
    max_output_tokens: PosInt | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    metadata: Metadata | None = None
    text: TextConfig | None = None
    tools: Annotated[list[FunctionTool], Field(max_length=128)] = []
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction = "auto"
    parallel_tool_calls: bool = True
    truncation: Literal["auto", "disabled"] = "disabled"
    user: str | None = None
    top_logprobs: LogprobCount | None = None
    background: Literal[False] | None = None
    """Background responses are not supported; only false/null is accepted."""
    conversation: None = None
    """The Conversations API is not supported (use previous_response_id); only null is accepted."""

    @field_validator("background", mode="before")
    @classmethod
    def _only_false(cls, value):
        if value is not None and value is not False:     # a Literal[False] also takes 0
            raise ValueError("background responses are not supported; send false or leave it out")
        return value
    # RWKV / vLLM extras
    seed: Seed | None = None
    top_k: NonNegInt | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    penalty_decay: float | None = Field(None, gt=0, le=1)

    def input_items(self) -> list[MessageItem | FunctionCallItem | FunctionCallOutputItem]:
        """input as items: a string is one user message."""
        if isinstance(self.input, str):
            return [MessageItem(role="user", content=self.input)]
        return list(self.input)


class InputItemsQuery(OpenAIRequest):
    """Query parameters of GET /v1/responses/{id}/input_items."""
    after: str | None = None
    limit: Annotated[PosInt, Field(le=100)] = 20
    order: Literal["asc", "desc"] = "desc"
    include: list[str] | None = None


# ------------------------------------------------------------------------------------------------ responses

class OutputText(Strict):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = []
    logprobs: list[Any] = []


class OutputMessage(Strict):
    type: Literal["message"] = "message"
    id: str
    status: ItemStatus
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class FunctionCall(Strict):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: ItemStatus


OutputItem = Annotated[OutputMessage | FunctionCall, Field(discriminator="type")]


class InputTokensDetails(Strict):
    cached_tokens: int
    """Input tokens not run because a stored state (previous_response_id) or a cached prefix covered them."""
    cache_write_tokens: int = 0


class OutputTokensDetails(Strict):
    reasoning_tokens: int = 0


class ResponseUsage(Strict):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()
    total_tokens: int


class ResponseError(Strict):
    code: Literal["server_error", "rate_limit_exceeded", "invalid_prompt"]
    message: str


class IncompleteDetails(Strict):
    reason: Literal["max_output_tokens", "content_filter"]


class Reasoning(Strict):
    effort: None = None
    summary: None = None


class FormatOut(Strict):
    """The echoed text.format: {"type": "text"}, {"type": "json_object"}, or the json_schema fields (null
    fields left out, schema under its own name)."""
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        out = handler(self)
        if "schema_" in out:
            out["schema"] = out.pop("schema_")
        return {k: v for k, v in out.items() if v is not None}


class TextConfigOut(Strict):
    format: FormatOut = FormatOut()
    verbosity: Literal["low", "medium", "high"] = "medium"


class FunctionToolOut(Strict):
    type: Literal["function"] = "function"
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoiceFunctionOut(Strict):
    type: Literal["function"] = "function"
    name: str


class ResponseObject(Strict):
    """A response (also inside the stream's lifecycle events). Dump it with model_dump(by_alias=True)."""
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: ResponseStatus
    background: bool = False
    completed_at: int | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    max_tool_calls: None = None
    metadata: dict[str, str] = {}
    model: str
    output: list[OutputItem] = []
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    reasoning: Reasoning = Reasoning()
    store: bool = True
    temperature: float
    text: TextConfigOut = TextConfigOut()
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunctionOut = "auto"
    tools: list[FunctionToolOut] = []
    top_logprobs: int = 0
    top_p: float
    truncation: Literal["auto", "disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None


class ResponseDeleted(Strict):
    id: str
    object: Literal["response"] = "response"
    deleted: Literal[True] = True


class InputTextOut(Strict):
    type: Literal["input_text"] = "input_text"
    text: str


class InputMessageOut(Strict):
    type: Literal["message"] = "message"
    id: str
    role: Literal["user", "system", "developer"]
    content: list[InputTextOut]
    status: ItemStatus = "completed"


class FunctionCallOutputOut(Strict):
    type: Literal["function_call_output"] = "function_call_output"
    id: str
    call_id: str
    output: str
    status: ItemStatus = "completed"


StoredItem = InputMessageOut | OutputMessage | FunctionCall | FunctionCallOutputOut
"""An item as GET .../input_items lists it (and as a stored conversation keeps it)."""


class InputItemList(Strict):
    object: Literal["list"] = "list"
    data: list[StoredItem]
    first_id: str | None
    last_id: str | None
    has_more: bool
