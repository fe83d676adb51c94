"""AsyncEngine: the engine's public, asyncio-facing API. It validates each request once, hands it to the step loop
(engine/core.py) through admission, and returns a stream of its outputs."""
from __future__ import annotations

import asyncio
import threading

import torch

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.embeddings import POOLINGS, EmbedJob
from engine.errors import ContextLengthExceeded, EngineDead, InvalidRequest
from engine.model.threads import call_in_new_thread
from engine.prefix_hash import PrefixHashes, TokenPrefix
from engine.request import EngineStats, GenerateRequest
from engine.saved_states import SavedStates
from engine.states import StateStore, StoreStats
from engine.streams import RequestStream, Sink
from engine.structured import CompiledGrammar, Constraint, GrammarCompiler
from engine.update import Group


class AsyncEngine:
    """Continuous batching over a fixed pool of RNN states; one background thread runs every model call."""

    def __init__(self, model, tokenizer, config: EngineConfig = EngineConfig(), *, store: StateStore | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.model_config = model.config
        self.vocab_size = min(model.config.vocab_size, getattr(tokenizer, "vocab_size", model.config.vocab_size))
        """Token ids in [0, vocab_size) are valid everywhere: the model embeds them and the tokenizer decodes them."""
        # zeroing the pool is parallel torch work: keep it off this (long-lived) thread, see engine/model/threads.py
        self.core = call_in_new_thread(EngineCore, model, tokenizer, config, vocab_size=self.vocab_size)
        self._thread: threading.Thread | None = None
        self._threads = config.threads or torch.get_num_threads()
        self._threads_in_use = 0
        self._compiler: GrammarCompiler | None = None
        self._compiler_lock = threading.Lock()
        self.states = SavedStates(model, self.core.initials, self.core.cache, store)
        """Initial states and stored conversation states (engine/saved_states.py)."""

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._thread = threading.Thread(target=self.core.run, args=(self._threads, self._started),
                                        name="goose-engine", daemon=True)
        self._thread.start()

    def _started(self, threads: int) -> None:
        self._threads_in_use = threads

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop admitting, let running requests finish for up to ``drain_timeout`` s, abort the rest."""
        core = self.core
        core.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout
        while self.is_alive and (core.groups or core.published[1] or core.waiting) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        with core.lock:
            for gid in list(core.groups):
                core._inbox.append(("abort", gid))
            core.stopping = True
        core.wake.set()
        if self._thread is not None:
            await loop.run_in_executor(None, self._thread.join)
        await asyncio.to_thread(self.states.close)        # the queued state writes land before we return

    @property
    def fingerprint(self) -> str:
        """What decides the tokens a seed gives: the model's identity (weights and config) and its strategy."""
        return f"{self.model.identity}:{self.model.strategy.text}:{self.model.decode_kernel}"

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.core.error is None

    @property
    def is_draining(self) -> bool:
        return self.core.draining

    # ------------------------------------------------------------------------------------------ requests
    async def submit(self, request: GenerateRequest) -> RequestStream:
        """Admit a request or raise before any token: InvalidRequest (ContextLengthExceeded), Overloaded,
        EngineDraining or EngineDead."""
        self._check_started()
        self.validate(request)
        grammar = None
        if request.constraint is not None:          # CPU work (bounded by GrammarLimits): never on the event loop
            grammar = await asyncio.to_thread(self.compile, request.constraint)
        start = request.start.prefix if request.start is not None else TokenPrefix()
        hashes = PrefixHashes(start, request.prompt_tokens)
        stored = None
        if self.states.shared and request.start is None and request.boundaries and \
                request.params.prompt_logprobs is None:   # disk and Redis reads: off the loop and the step thread
            stored = await asyncio.to_thread(self.states.find_boundary, request.initial, hashes, request.boundaries)
        sink = Sink(asyncio.get_running_loop(), self.core.outbox)
        self.core.enqueue(Group(request=request, sink=sink, grammar=grammar, hashes=hashes, stored=stored))
        return RequestStream(request.request_id, sink, self.core.abort)

    def compile(self, spec: Constraint) -> CompiledGrammar:
        """A constraint compiled for this model's vocabulary (cached); InvalidRequest naming the field when it is
        unusable. Blocking: call it from a worker thread."""
        with self._compiler_lock:                   # the vocabulary is built once (~0.7 s for World)
            if self._compiler is None:
                self._compiler = GrammarCompiler(self.tokenizer, vocab_size=self.model_config.vocab_size)
        return self._compiler.compile(spec)

    async def generate(self, request: GenerateRequest):
        """Async generator of RequestOutput; closing it early aborts the request."""
        stream = await self.submit(request)
        try:
            async for out in stream:
                yield out
        finally:
            await stream.aclose()

    def abort(self, request_id: str) -> None:
        self.core.abort(request_id)

    async def embed(self, inputs: list[list[int]], pooling: str = "last") -> list[list[float]]:
        """Pooled final hidden states (ln_out output), L2-normalised, one vector per input."""
        self._check_started()
        if pooling not in POOLINGS:
            raise InvalidRequest(f"pooling must be 'last' or 'mean', got {pooling!r}", param="pooling")
        if not inputs or any(not ids for ids in inputs):
            raise InvalidRequest("input must not be empty", param="input")
        for ids in inputs:
            self._check_prompt(ids, "input")
        job = EmbedJob([list(x) for x in inputs], pooling, Sink(asyncio.get_running_loop(), self.core.outbox))
        self.core.enqueue_embed(job)
        item = await job.sink.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def validate(self, request: GenerateRequest) -> None:
        """Every rule a request must meet, decided here once (never per forward)."""
        validate_request(request, self.config, self.vocab_size)
        self.states.check_request(request)

    def _check_prompt(self, ids: list[int], param: str) -> None:
        check_prompt(ids, param, self.config, self.vocab_size)

    def _check_started(self) -> None:
        if self._thread is None:
            raise EngineDead("the engine is not started")
        if not self._thread.is_alive():
            raise EngineDead("the engine has stopped")
        self.core.check_open()

    # ------------------------------------------------------------------------------------------ stats
    def stats(self) -> EngineStats:
        core, c = self.core, self.core.counters
        running, _, used = core.published
        cache = core.cache
        return EngineStats(
            running=running, waiting=core.waiting, slots_total=core.pool.size, slots_used=used,
            state_bytes_per_slot=core.pool.bytes_per_row, state_bytes_total=core.pool.nbytes,
            prefix_cache_hits=cache.hits, prefix_cache_misses=cache.misses,
            prefix_cache_tokens_saved=cache.tokens_saved, prefix_cache_bytes=cache.bytes,
            prefix_cache_entries=len(cache), prompt_tokens_total=c["prompt_tokens"],
            generated_tokens_total=c["generated_tokens"], steps_total=c["steps"], aborted_total=c["aborted"],
            alive=self.is_alive, draining=core.draining, threads=self._threads_in_use)

    def store_stats(self) -> StoreStats | None:
        """The state store's counters per tier, or None without a store."""
        return self.states.store.stats() if self.states.store is not None else None


def validate_request(request: GenerateRequest, config: EngineConfig, vocab_size: int) -> None:
    """The engine's rules for a generation request (the prompt, max_tokens, n, token ids in the parameters)."""
    check_prompt(request.prompt_tokens, "prompt", config, vocab_size)
    if request.params.max_tokens > config.max_max_tokens:
        raise InvalidRequest(f"max_tokens is {request.params.max_tokens}; the most this server generates is "
                             f"{config.max_max_tokens}", param="max_tokens")
    if request.n > config.max_sessions:
        raise InvalidRequest(f"n is {request.n}, but this server runs at most {config.max_sessions} sequences at "
                             f"once", param="n")
    request.params.check_token_ids(vocab_size)
    if request.constraint is not None and request.params.ignore_eos:
        raise InvalidRequest("ignore_eos cannot be combined with a structured output: the grammar decides where the "
                             "output ends", param="ignore_eos")


def check_prompt(ids: list[int], param: str, config: EngineConfig, vocab_size: int) -> None:
    """A prompt (or embedding input) fits the context limit and holds only ids of the vocabulary."""
    limit = config.max_prompt_tokens
    if len(ids) > limit:
        raise ContextLengthExceeded(f"the {param} has {len(ids)} tokens; the limit is {limit}", param=param)
    for t in ids:
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size:
            raise InvalidRequest(f"token id {t!r} in the {param} is outside the vocabulary [0, {vocab_size})",
                                 param=param)
