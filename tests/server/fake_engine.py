"""FakeEngine: the public AsyncEngine API with deterministic output, for HTTP contract tests (no model, no thread).

Each sequence repeats SCRIPT's tokens (shifted by the sequence index unless temperature is 0), one token per step;
it honours max_tokens, stop strings (through the engine's TextStream), stop_token_ids, end-of-text, logprobs,
prompt logprobs, n, abort and draining, and can be told to refuse (fail_submit) or fail mid-stream (fail_after).
"""
from __future__ import annotations

import asyncio
import hashlib
import math

from engine import (EngineConfig, EngineDead, EngineDraining, EngineStats, FinishReason, GenerateRequest,
                    InvalidRequest, ModelConfig, Overloaded, RequestFailed, RequestOutput, SequenceOutput,
                    TokenLogprob)
from engine.text.stop import TextStream

SCRIPT = " The quick brown fox jumps over the lazy dog. Élan, naïve café!\n\nUser: more"


class FakeStream:
    def __init__(self, engine: FakeEngine, request: GenerateRequest):
        self.engine, self.request, self.request_id = engine, request, request.request_id
        p = request.params
        script = engine.script
        self.offsets = [0 if p.temperature == 0 else i for i in range(request.n)]
        self.texts = [TextStream(engine.tokenizer.stream_decoder(), p.stop) for _ in range(request.n)]
        self.tokens = [[] for _ in range(request.n)]
        self.finished: list[FinishReason | None] = [None] * request.n
        self.script = script
        self.first = True
        self.done = False
        self.aborted = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.done:
            raise StopAsyncIteration
        await asyncio.sleep(self.engine.delay)
        eng, req = self.engine, self.request
        if self.aborted:
            return self._end([SequenceOutput(i, "", [], None, FinishReason.ABORT, len(self.tokens[i]))
                              for i in range(req.n) if self.finished[i] is None])
        if eng.fail_after is not None and len(self.tokens[0]) >= eng.fail_after:
            self.done = True
            eng.active.pop(self.request_id, None)
            raise RequestFailed(f"request {self.request_id} failed: RuntimeError")
        outs = [self._step(i) for i in range(req.n) if self.finished[i] is None]
        out = RequestOutput(req.request_id, outs, len(req.prompt_tokens),
                            prompt_logprobs=self._prompt_logprobs() if self.first else None)
        self.first = False
        if all(f is not None for f in self.finished):
            return self._end(outs, out)
        return out

    def _end(self, outs, out: RequestOutput | None = None) -> RequestOutput:
        self.done = True
        self.engine.active.pop(self.request_id, None)
        out = out or RequestOutput(self.request_id, outs, len(self.request.prompt_tokens))
        out.finished = True
        return out

    def _step(self, i: int) -> SequenceOutput:
        p = self.request.params
        if p.max_tokens == 0:
            self.finished[i] = FinishReason.LENGTH
            return SequenceOutput(i, "", [], [] if p.logprobs is not None else None, FinishReason.LENGTH, 0)
        k = len(self.tokens[i])
        eot = self.engine.tokenizer.eot_id
        tok = eot if self.engine.eot_after == k else self.script[(k + self.offsets[i]) % len(self.script)]
        self.tokens[i].append(tok)
        text, finish = "", None
        if (tok == eot and not p.ignore_eos) or tok in p.stop_token_ids:
            text, finish = self.texts[i].finish(), FinishReason.STOP
        else:
            text, stopped = self.texts[i].push(tok)
            if stopped:
                finish = FinishReason.STOP
            elif k + 1 >= p.max_tokens:
                text += self.texts[i].finish()
                finish = FinishReason.STOP if self.texts[i].stopped else FinishReason.LENGTH
        self.finished[i] = finish
        lps = [self._logprob(tok, -0.25 - 0.01 * k, p.logprobs)] if p.logprobs is not None else None
        return SequenceOutput(i, text, [tok], lps, finish, k + 1)

    def _logprob(self, tok: int, lp: float, k: int) -> TokenLogprob:
        vocab = self.engine.model_config.vocab_size
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
        V = self.model_config.vocab_size
        if any(not 0 <= t < V for t in request.prompt_tokens):
            raise InvalidRequest(f"token id outside the vocabulary [0, {V})", param="prompt")
        if request.params.max_tokens > self.config.max_max_tokens:
            raise InvalidRequest("max_tokens exceeds the limit", param="max_tokens")
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
