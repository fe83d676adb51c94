"""Thin route handlers: OpenAI /v1 routes, the lm-evaluation-harness tokenizer routes, health, readiness, metrics."""
from __future__ import annotations

import asyncio
import base64
import math

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response

from engine import EngineDead, EngineDraining, InvalidRequest
from server import formatters, prepare, sse
from server.errors import NotFound, NotReady
from server.protocol import ChatRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest, TokenizeRequest
from server.output import ChatChunk, ChatResponse, CompletionResponse, DetokenizeResponse, Embedding, EmbeddingResponse, EmbeddingUsage, ErrorResponse, Health, ModelCard, ModelList, TokenizeResponse, TokenizerInfo

router = APIRouter()
_ERR = {"model": ErrorResponse}
ERRORS = {400: _ERR, 401: _ERR, 404: _ERR, 413: _ERR, 429: _ERR, 503: _ERR}
READ_ERRORS = {401: _ERR, 404: _ERR, 503: _ERR}
SSE_200 = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or server-sent events when stream is "
                 "true (each event's data is a chunk, an error object, or [DONE]; see app._sse_event_schema)"}}
CLIENT_CLOSED = 499
SSE_CHUNKS = {"/v1/completions": CompletionResponse, "/v1/chat/completions": ChatChunk}


def ready(request: Request):
    """The app state when it can take inference requests; else NotReady / EngineDraining / EngineDead."""
    state = request.app.state.goose
    if state.engine is None:
        raise NotReady(f"the model failed to load: {state.load_error}" if state.load_error else
                       "the model is still loading")
    if state.draining or state.engine.is_draining:
        raise EngineDraining("the server is shutting down")
    if not state.engine.is_alive:
        raise EngineDead("the engine has stopped")
    return state


async def _respond(request: Request, state, chunks, stream: bool, collect):
    on_gone = state.metrics.client_disconnects.inc
    if stream:
        return sse.SSEResponse(chunks, on_disconnect=on_gone)
    result = await sse.until_disconnect(request.receive, collect(chunks), on_gone)
    return Response(status_code=CLIENT_CLOSED) if result is None else result


@router.post("/v1/completions", response_model=CompletionResponse, responses={**SSE_200, **ERRORS})
async def completions(body: CompletionRequest, request: Request):
    state = ready(request)
    gen = await prepare.start_completion(state, body)
    usage = not body.stream or bool(body.stream_options and body.stream_options.include_usage)
    return await _respond(request, state, formatters.completion_chunks(gen, usage), body.stream,
                          formatters.collect_completion)


@router.post("/v1/chat/completions", response_model=ChatResponse, responses={**SSE_200, **ERRORS})
async def chat_completions(body: ChatRequest, request: Request):
    state = ready(request)
    gen = await prepare.start_chat(state, body)
    usage = not body.stream or bool(body.stream_options and body.stream_options.include_usage)
    return await _respond(request, state, formatters.chat_chunks(gen, usage), body.stream, formatters.collect_chat)


@router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERRORS)
async def embeddings(body: EmbeddingRequest, request: Request):
    state = ready(request)
    if prepare.check_model(state, body.model):
        raise InvalidRequest("initial states apply to generation, not to embeddings: use the model itself",
                             param="model")
    items = prepare.prompt_items(state, body.input, "input")
    inputs = await asyncio.to_thread(prepare.token_lists, state, items, allow_special=True)
    width = state.engine.model_config.n_embd
    if body.dimensions is not None and body.dimensions > width:
        raise InvalidRequest(f"dimensions must be at most {width} for this model", param="dimensions")
    vectors = await sse.until_disconnect(
        request.receive, state.engine.embed(inputs, pooling=state.settings.server.embedding_pooling),
        state.metrics.client_disconnects.inc)
    if vectors is None:
        return Response(status_code=CLIENT_CLOSED)
    data = [Embedding(index=i, embedding=_encode(v, body.dimensions, body.encoding_format))
            for i, v in enumerate(vectors)]
    tokens = sum(map(len, inputs))
    return EmbeddingResponse(data=data, model=state.info.name,
                             usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))


def _encode(vector: list[float], dimensions: int | None, fmt: str) -> list[float] | str:
    v = np.asarray(vector, dtype=np.float32)
    if dimensions is not None:
        v = v[:dimensions]
        norm = float(np.linalg.norm(v))
        v = v / norm if norm > 0 and math.isfinite(norm) else v
    if fmt == "base64":
        return base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
    return v.tolist()


@router.get("/v1/models", response_model=ModelList, responses=READ_ERRORS)
async def list_models(request: Request):
    state = ready(request)
    return ModelList(data=[ModelCard(id=m, created=state.info.created) for m in prepare.model_ids(state.info)])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=READ_ERRORS)
async def get_model(model_id: str, request: Request):
    state = ready(request)
    if model_id not in prepare.model_ids(state.info):
        raise NotFound(f"model {model_id[:200]!r} does not exist", param="model")
    return ModelCard(id=model_id, created=state.info.created)


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
async def tokenize(body: TokenizeRequest, request: Request):
    state = ready(request)
    prepare.check_model(state, body.model)
    ids = await asyncio.to_thread(state.engine.tokenizer.encode, body.text, True)
    return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=state.engine.config.max_prompt_tokens)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
async def detokenize(body: DetokenizeRequest, request: Request):
    state = ready(request)
    prepare.check_model(state, body.model)
    vocab = state.engine.vocab_size
    bad = next((t for t in body.tokens if t >= vocab), None)
    if bad is not None:
        raise InvalidRequest(f"token id {bad} is outside the vocabulary [0, {vocab})", param="tokens")
    text = await asyncio.to_thread(state.engine.tokenizer.decode, body.tokens)
    return DetokenizeResponse(prompt=text, content=text)


@router.get("/tokenizer_info", response_model=TokenizerInfo, responses=READ_ERRORS)
async def tokenizer_info(request: Request):
    state = ready(request)
    tok = state.engine.tokenizer
    return TokenizerInfo(eos_token=tok.eot_text, eos_token_id=tok.eot_id, vocab_size=state.engine.vocab_size,
                         tokenizer_class=type(tok).__name__)


@router.get("/health", response_model=Health, responses={503: _ERR})
async def health(request: Request):
    """Liveness: cheap, never queued behind inference; 503 while loading or when the engine has died."""
    state = request.app.state.goose
    if state.engine is None:
        raise NotReady(f"the model failed to load: {state.load_error}" if state.load_error else
                       "the model is still loading")
    if not state.engine.is_alive and not (state.draining or state.engine.is_draining):
        raise EngineDead("the engine has stopped")
    return Health(status="ok")


@router.get("/ready", response_model=Health, responses={401: _ERR, 503: _ERR})
async def readiness(request: Request):
    """Readiness: 503 while loading, draining for shutdown, or dead."""
    ready(request)
    return Health(status="ready")


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}, 401: _ERR})
async def metrics(request: Request):
    body, content_type = request.app.state.goose.metrics.render()
    return Response(body, media_type=content_type)
