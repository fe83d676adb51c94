"""FakeEngine: the public AsyncEngine API with deterministic output, for HTTP contract tests (no model, no thread).

Each sequence repeats SCRIPT's tokens (shifted by the sequence index unless temperature is 0), one token per step.
Validation, finish rules (max_tokens, stop strings, stop_token_ids, end-of-text), text deltas and outputs are the
real engine's (engine/async_engine.py's validate_request, engine/update.py); it adds n, abort and draining, and can be
told to refuse (fail_submit) or fail mid-stream (fail_after).
"""
from __future__ import annotations

import asyncio
import hashlib
import math

from engine import (EngineConfig, EngineDead, EngineDraining, EngineStats, GenerateRequest, InvalidRequest,
                    ModelConfig, Overloaded, RequestFailed, RequestOutput, TokenLogprob)
from engine.async_engine import check_prompt, validate_request
from engine.update import Group, abort_output, advance, start_sequences, take_output

SCRIPT = " The quick brown fox jumps over the lazy dog. Élan, naïve café!\n\nUser: more"


class FakeStream:
    """One request: tokens come from the script instead of a model; the finish rules, text deltas and outputs are
    the real engine's (engine/update.py)."""

    def __init__(self, engine: FakeEngine, request: GenerateRequest):
        self.engine, self.request, self.request_id = engine, request, request.request_id
        self.group = Group(request=request, sink=None)
        start_sequences(self.group, engine.tokenizer, engine.vocab_size)
        self.offsets = [0 if request.params.temperature == 0 else i for i in range(request.n)]
        self.group.prompt_logprobs = self._prompt_logprobs()
        self.done = False
        self.aborted = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.done:
            raise StopAsyncIteration
        await asyncio.sleep(self.engine.delay)
        eng, g = self.engine, self.group
        if self.aborted:
            return self._end(abort_output(g))
        if eng.fail_after is not None and g.seqs and len(g.seqs[0].tokens) >= eng.fail_after:
            self.done = True
            eng.active.pop(self.request_id, None)
            raise RequestFailed(f"request {self.request_id} failed: RuntimeError")
        if g.params.max_tokens == 0:
            new = {s.index: [] for s in g.seqs}
        else:
            new = {s.index: [self._step(s)] for s in g.seqs if s.finished is None}
        out = take_output(g, new)
        return self._end(out) if out.finished else out

    def _end(self, out: RequestOutput) -> RequestOutput:
        self.done = True
        self.engine.active.pop(self.request_id, None)
        out.finished = True
        return out

    def _step(self, s) -> tuple[int, TokenLogprob | None]:
        p, eng = self.request.params, self.engine
        k = len(s.tokens)
        script = eng.script
        tok = eng.tokenizer.eot_id if eng.eot_after == k else script[(k + self.offsets[s.index]) % len(script)]
        advance(s, p, tok, eng.tokenizer.eot_id)
        return tok, (self._logprob(tok, -0.25 - 0.01 * k, p.logprobs) if p.logprobs is not None else None)

    def _logprob(self, tok: int, lp: float, k: int) -> TokenLogprob:
        vocab = self.engine.vocab_size
        top = [(tok, lp)] + [((tok + j) % vocab, lp - j) for j in range(1, k)]
        return TokenLogprob(tok, lp, tuple(top[:k]))

    def _prompt_logprobs(self):
        k = self.request.params.prompt_logprobs
        if k is None:
            return None
        ids = self.request.prompt_tokens
        return [None] + [self._logprob(t, -1.5, k) for t in ids[1:]]

    async def aclose(self) -> None:
        if not self.done:
            self.done = True
            self.engine.abort(self.request_id)


class FakeEngine:
    def __init__(self, tokenizer, config: EngineConfig | None = None, *, n_embd: int = 16, delay: float = 0.0,
                 script: str = SCRIPT):
        self.tokenizer = tokenizer
        self.config = config or EngineConfig(max_sessions=8, max_waiting=32, step_token_budget=64)
        self.model_config = ModelConfig(n_layer=1, n_embd=n_embd, n_head=1, head_size=n_embd,
                                        vocab_size=tokenizer.vocab_size, dim_ffn=4 * n_embd, decay_lora=8,
                                        iclr_lora=8, value_lora=0, gate_lora=8)
        self.vocab_size = min(tokenizer.vocab_size, self.model_config.vocab_size)
        self.script = tokenizer.encode(script)
        self.delay = delay
        self.active: dict[str, FakeStream] = {}
        self.submitted: list[GenerateRequest] = []
        self.aborted: list[str] = []
        self.fail_submit: BaseException | None = None
        self.fail_after: int | None = None
        self.eot_after: int | None = None
        self.started = False
        self.dead = False
        self.fingerprint = "fake-model:cpu fp32"
        self._draining = False

    def start(self) -> None:
        if self.started:
            raise RuntimeError("engine already started")
        self.started = True

    async def stop(self, drain_timeout: float = 30.0) -> None:
        self._draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout
        while self.active and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for rid in list(self.active):
            self.abort(rid)
        self.started = False

    @property
    def is_alive(self) -> bool:
        return self.started and not self.dead

    @property
    def is_draining(self) -> bool:
        return self._draining

    def _admissible(self) -> None:
        if self.fail_submit is not None:
            raise self.fail_submit
        if not self.is_alive:
            raise EngineDead("the engine has stopped")
        if self._draining:
            raise EngineDraining("the server is shutting down")

    async def submit(self, request: GenerateRequest) -> FakeStream:
        self._admissible()
        validate_request(request, self.config, self.vocab_size)
        if sum(s.request.n for s in self.active.values()) + request.n > self.config.max_sessions + \
                self.config.max_waiting:
            raise Overloaded("too many requests waiting; retry later", retry_after=2.0)
        if request.request_id in self.active:
            raise InvalidRequest("request id in use", param="request_id")
        self.submitted.append(request)
        stream = FakeStream(self, request)
        self.active[request.request_id] = stream
        return stream

    def abort(self, request_id: str) -> None:
        stream = self.active.pop(request_id, None)
        if stream is not None:
            stream.aborted = True
            self.aborted.append(request_id)

    async def embed(self, inputs: list[list[int]], pooling: str = "last") -> list[list[float]]:
        self._admissible()
        if not inputs or any(not x for x in inputs):
            raise InvalidRequest("input must not be empty", param="input")
        for ids in inputs:
            check_prompt(ids, "input", self.config, self.vocab_size)
        await asyncio.sleep(self.delay)
        return [_vector(ids, pooling, self.model_config.n_embd) for ids in inputs]

    def stats(self) -> EngineStats:
        running = sum(s.request.n for s in self.active.values())
        slots = self.config.max_sessions
        return EngineStats(running=min(running, slots), waiting=max(0, running - slots), slots_total=slots,
                           slots_used=min(running, slots), state_bytes_per_slot=1024, state_bytes_total=1024 * slots,
                           prefix_cache_hits=0, prefix_cache_misses=0, prefix_cache_tokens_saved=0,
                           prefix_cache_bytes=0, prefix_cache_entries=0, prompt_tokens_total=0,
                           generated_tokens_total=0, steps_total=0, aborted_total=len(self.aborted),
                           alive=self.is_alive, draining=self._draining)


def _vector(ids: list[int], pooling: str, dim: int) -> list[float]:
    raw = hashlib.sha256(f"{pooling}:{ids}".encode()).digest() * (dim // 32 + 1)
    v = [b / 255.0 - 0.5 for b in raw[:dim]]
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]
