"""OpenAI requests -> engine GenerateRequests: validation the schema cannot express, the one defaults function,
tokenizing (in a worker thread) and admission, for completions and chat alike."""
from __future__ import annotations

import asyncio
import time
import uuid

from engine import Choice, GenerateRequest, Grammar, InvalidRequest, Overloaded, Regex, SamplingParams
from server.conversation import ChatPrompt, chat_prompt, close_chat_later
from server.errors import ModelNotFound
from server.structured import structured_request
from server.generation import Generation
from server.protocol import ChatRequest, CompletionRequest, SamplingFields


def sampling_params(req: SamplingFields, ctx, *, max_tokens: int | None, logprobs: int | None = None,
                    prompt_logprobs: int | None = None, extra_stop: tuple[str, ...] = ()) -> SamplingParams:
    """The one place request fields and server defaults become engine SamplingParams (the engine checks them)."""
    max_tokens = ctx.engine.config.default_max_tokens if max_tokens is None else max_tokens
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    stop = tuple(dict.fromkeys(stop + extra_stop))
    bias = []
    for key, value in (req.logit_bias or {}).items():
        if not key.strip().lstrip("-").isdigit():
            raise InvalidRequest(f"logit_bias keys must be token ids, got {key[:40]!r}", param="logit_bias")
        bias.append((int(key), float(value)))
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        min_p=req.min_p or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        penalty_decay=1.0 if req.penalty_decay is None else req.penalty_decay,
        logit_bias=tuple(bias), stop=stop, stop_token_ids=tuple(req.stop_token_ids or ()), seed=req.seed,
        logprobs=logprobs, prompt_logprobs=prompt_logprobs, ignore_eos=req.ignore_eos)


def check_model(ctx, name: str | None) -> str:
    """The initial state a request's model names: "" for the model itself, <state> for "<model>:<state>"."""
    if name is None or name == ctx.info.name:
        return ""
    base, sep, initial = name.rpartition(":")
    if sep and base == ctx.info.name and initial in ctx.info.initial_states:
        return initial
    raise ModelNotFound(f"model {name[:200]!r} does not exist; this server serves "
                        f"{', '.join(repr(m) for m in model_ids(ctx.info))}", param="model")


def model_ids(info) -> list[str]:
    """The model ids this server answers to: the model, then "<model>:<state>" per initial state."""
    return [info.name] + [f"{info.name}:{s}" for s in info.initial_states]


def precheck(ctx, sequences: int) -> None:
    """Refuse fast, before any tokenizing, what admission would refuse anyway: a full queue. (Every other rule is
    the engine's, decided once when the request is submitted.)"""
    limit = ctx.engine.config.max_waiting
    if sequences > limit:
        raise InvalidRequest(f"the request asks for {sequences} sequences (prompts x n); the most one request may "
                             f"ask for is {limit}", param="n")
    if ctx.engine.stats().waiting + sequences > limit:
        raise Overloaded("too many requests waiting; retry later", retry_after=1.0)


def prompt_items(ctx, value, param: str) -> list:
    """str | list[str] | list[int] | list[list[int]] -> the list of prompts, at most server.max_batch of them."""
    items = [value] if isinstance(value, str) or isinstance(value[0], int) else list(value)
    if len(items) > ctx.settings.server.max_batch:
        raise InvalidRequest(f"{param} holds {len(items)} items; the limit is {ctx.settings.server.max_batch}",
                             param=param)
    return items


def token_lists(ctx, items: list, *, allow_special: bool) -> list[list[int]]:
    """Prompts -> token lists; token ids are never re-tokenized. Runs in a worker thread (tokenizing a large
    prompt is CPU work)."""
    tok = ctx.engine.tokenizer
    return [tok.encode(item, allow_special=allow_special) if isinstance(item, str) else list(item) for item in items]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def _submit(ctx, gen: Generation, params: SamplingParams, prompt_param: str, constraint=None, *,
                  initial: str = "", boundaries: tuple[int, ...] = (), keep_state: bool = False) -> Generation:
    try:
        for p, ids in enumerate(gen.prompts):
            rid = gen.id if len(gen.prompts) == 1 else f"{gen.id}-{p}"
            gen.streams.append(await ctx.engine.submit(
                GenerateRequest(prompt_tokens=ids, params=params, n=gen.n, request_id=rid, constraint=constraint,
                                initial=initial, boundaries=boundaries, keep_state=keep_state)))
    except BaseException as exc:
        for stream in gen.streams:
            await stream.aclose()
        if isinstance(exc, InvalidRequest) and exc.param == "prompt":
            exc.param = prompt_param            # the engine's prompt is this endpoint's messages
        raise
    return gen


async def start_completion(ctx, req: CompletionRequest) -> Generation:
    initial = check_model(ctx, req.model)
    if req.stream_options is not None and not req.stream:
        raise InvalidRequest("stream_options is only allowed with stream=true", param="stream_options")
    if req.best_of is not None and req.best_of != req.n:
        raise InvalidRequest("best_of other than n is not supported", param="best_of")
    items = prompt_items(ctx, req.prompt, "prompt")
    structured = structured_request(req, ctx.info.template)
    precheck(ctx, len(items) * req.n)
    prompts = await asyncio.to_thread(token_lists, ctx, items, allow_special=True)
    params = sampling_params(req, ctx, max_tokens=req.max_tokens, logprobs=req.logprobs,
                             prompt_logprobs=req.logprobs if req.echo else None)
    gen = Generation(ctx, new_id("cmpl"), int(time.time()), [], prompts, req.n, echo=req.echo,
                     logprobs=req.logprobs)
    return await _submit(ctx, gen, params, "prompt", structured.constraint, initial=initial)


async def start_chat(ctx, req: ChatRequest) -> Generation:
    initial = check_model(ctx, req.model)
    if req.stream_options is not None and not req.stream:
        raise InvalidRequest("stream_options is only allowed with stream=true", param="stream_options")
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequest("top_logprobs requires logprobs=true", param="top_logprobs")
    template = ctx.info.template
    structured = structured_request(req, template)
    precheck(ctx, req.n)
    messages = [m.model_dump(include={"role", "content", "tool_calls", "tool_call_id"}, exclude_none=True)
                for m in req.messages]
    prompt = await asyncio.to_thread(_chat_tokens, ctx, messages, structured.tools)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    k = (req.top_logprobs or 0) if req.logprobs else None
    # a regex, choice or grammar says exactly where the reply ends: the template's turn stops would cut it
    own_form = isinstance(structured.constraint, (Regex, Choice, Grammar))
    params = sampling_params(req, ctx, max_tokens=max_tokens, logprobs=k, extra_stop=() if own_form else template.stop)
    # a reply's state is worth storing where other replicas or a restart can find it (plain replies: n = 1, no calls)
    states = getattr(ctx.engine, "states", None)
    keep = req.n == 1 and not structured.parse_tools and states is not None and states.persistent
    gen = Generation(ctx, new_id("chatcmpl"), int(time.time()), [], [prompt.tokens], req.n, logprobs=k,
                     tools=template.tools if structured.parse_tools else None, keep=keep)
    if keep:
        gen.on_done = close_chat_later(ctx, messages=messages, tools=structured.tools, prompt=prompt.tokens,
                                       initial=initial)
    return await _submit(ctx, gen, params, "messages", structured.constraint, initial=initial,
                         boundaries=prompt.boundaries, keep_state=keep)


def _chat_tokens(ctx, messages: list[dict], tools) -> ChatPrompt:
    return chat_prompt(ctx.engine.tokenizer, ctx.info.template, messages, tools)
