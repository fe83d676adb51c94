"""AsyncEngine: a background step loop (schedule -> run -> update) with an asyncio-facing API."""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
from dataclasses import dataclass, field

import torch

from engine.config import EngineConfig
from engine.errors import EngineDead, EngineDraining, InvalidRequest, Overloaded, RequestFailed
from engine.model.rwkv7 import RWKV7
from engine.prefix_cache import PrefixCache
from engine.request import EngineStats, FinishReason, GenerateRequest, RequestOutput, SequenceOutput
from engine.state_pool import StatePool
from engine.sampling import SamplerRow, make_generator, sample, top_logprobs
from engine.scheduler import Scheduler
from engine.text.stop import TextStream
from engine.model.threads import call_in_new_thread

log = logging.getLogger("goose.engine")


@dataclass
class _Seq:
    index: int
    row: SamplerRow
    text: TextStream
    tokens: list[int] = field(default_factory=list)
    pending: int | None = None          # sampled, not yet fed to the model
    finished: FinishReason | None = None
    delta: str = ""                     # text released since the last delivery
    released: bool = False              # its state row has been given back


@dataclass
class _Group:
    request: GenerateRequest
    sink: "_Sink"
    seqs: list[_Seq] = field(default_factory=list)
    cached: int = 0
    prompt_logprobs: list | None = None
    sent_prompt: bool = False

    @property
    def id(self) -> str:
        return self.request.request_id

    def key(self, index: int) -> tuple[str, int]:
        return (self.id, index)


@dataclass
class _EmbedJob:
    """Inputs grouped by length into batches; one chunk of one batch runs per engine step."""
    inputs: list[list[int]]
    pooling: str
    sink: "_Sink"
    results: dict[int, list[float]] = field(default_factory=dict)
    batches: list[list[int]] = field(default_factory=list)    # input indexes of equal length
    position: int = 0                                         # tokens done in the current batch
    state: object = None
    total: object = None

    def __post_init__(self):
        by_len: dict[int, list[int]] = {}
        for i, ids in enumerate(self.inputs):
            by_len.setdefault(len(ids), []).append(i)
        self.batches = list(by_len.values())


class _Sink:
    """One asyncio consumer's queue. The engine thread puts items into its outbox; the outbox hands a whole
    step's items to each event loop in one call, so a step wakes the loop once, not once per request."""

    def __init__(self, loop: asyncio.AbstractEventLoop, outbox: "_Outbox"):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self._outbox = outbox

    def put(self, item) -> None:
        self._outbox.items.append((self, item))


class _Outbox:
    """Items produced by the engine thread since the last flush (touched by the engine thread only)."""

    def __init__(self):
        self.items: list[tuple[_Sink, object]] = []

    def flush(self) -> None:
        if not self.items:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for sink, item in self.items:
            by_loop.setdefault(sink.loop, []).append((sink, item))
        self.items = []
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_hand_over, batch)
            except RuntimeError:      # the event loop is closed: nobody is listening any more
                pass


def _hand_over(batch) -> None:
    for sink, item in batch:
        sink.queue.put_nowait(item)


class RequestStream:
    """Async iterator of RequestOutput for one request; closing it early aborts the request."""

    def __init__(self, engine: "AsyncEngine", request_id: str, sink: _Sink):
        self.request_id = request_id
        self._engine = engine
        self._sink = sink
        self._done = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        item = await self._sink.queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finished:
            self._done = True
        return item

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._engine.abort(self.request_id)


class AsyncEngine:
    """Continuous batching over a fixed pool of RNN states; one background thread runs every model call."""

    def __init__(self, model: RWKV7, tokenizer, config: EngineConfig = EngineConfig()):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.model_config = model.config
        # zeroing the pool is parallel torch work: keep it off this (long-lived) thread, see engine/model/threads.py
        self.pool = call_in_new_thread(StatePool, model, config.max_sessions)
        self.cache = PrefixCache(config.prefix_cache_bytes)
        self.scheduler = Scheduler(max_slots=config.max_sessions, max_waiting=config.max_waiting,
                                   prefill_chunk=config.prefill_chunk, step_token_budget=config.step_token_budget,
                                   align=config.prefix_cache_interval if self.cache.enabled else 0)
        self._groups: dict[str, _Group] = {}
        self._inbox: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._embed_jobs: collections.deque[_EmbedJob] = collections.deque()
        self._draining = False
        self._stopping = False
        self._error: BaseException | None = None
        self._counters = collections.Counter()
        self._published = (0, 0, 0)                 # (running, waiting, slots used), written by the loop
        self._outbox = _Outbox()
        self._threads = config.threads or torch.get_num_threads()
        self._threads_in_use = 0

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._thread = threading.Thread(target=self._loop, name="goose-engine", daemon=True)
        self._thread.start()

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop admitting, let running requests finish for up to ``drain_timeout`` s, abort the rest."""
        self._draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout
        while self.is_alive and (self._groups or self._inbox) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        with self._lock:
            for gid in list(self._groups):
                self._inbox.append(("abort", gid))
            self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await loop.run_in_executor(None, self._thread.join)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._error is None

    @property
    def is_draining(self) -> bool:
        return self._draining

    # ------------------------------------------------------------------------------------------ requests
    async def submit(self, request: GenerateRequest) -> RequestStream:
        """Admit a request or raise (InvalidRequest, Overloaded, EngineDraining, EngineDead) before any token."""
        self._check_admissible()
        self._validate(request)
        sink = _Sink(asyncio.get_running_loop(), self._outbox)
        with self._lock:
            if request.request_id in self._groups or any(
                    item[0] == "add" and item[1].id == request.request_id for item in self._inbox):
                raise InvalidRequest(f"request id {request.request_id!r} is already in use", param="request_id")
            waiting = self._published[1] + sum(item[1].request.n for item in self._inbox if item[0] == "add")
            if waiting + request.n > self.config.max_waiting:
                raise Overloaded(f"too many requests waiting ({waiting}); retry later", retry_after=1.0)
            group = _Group(request=request, sink=sink)
            self._inbox.append(("add", group))
        self._wake.set()
        return RequestStream(self, request.request_id, sink)

    async def generate(self, request: GenerateRequest):
        """Async generator of RequestOutput; closing it early aborts the request."""
        stream = await self.submit(request)
        try:
            async for out in stream:
                yield out
        finally:
            await stream.aclose()

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(("abort", request_id))
        self._wake.set()

    async def embed(self, inputs: list[list[int]], pooling: str = "last") -> list[list[float]]:
        """Pooled final hidden states (ln_out output), L2-normalised, one vector per input."""
        self._check_admissible()
        if pooling not in ("last", "mean"):
            raise InvalidRequest(f"pooling must be 'last' or 'mean', got {pooling!r}", param="pooling")
        if not inputs or any(not ids for ids in inputs):
            raise InvalidRequest("input must not be empty", param="input")
        for ids in inputs:
            self._check_tokens(ids, "input")
        with self._lock:
            if len(self._embed_jobs) >= self.config.max_waiting:
                raise Overloaded("too many embedding requests waiting; retry later", retry_after=1.0)
            job = _EmbedJob([list(x) for x in inputs], pooling, _Sink(asyncio.get_running_loop(), self._outbox))
            self._inbox.append(("embed", job))
        self._wake.set()
        item = await job.sink.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def stats(self) -> EngineStats:
        c = self._counters
        running, waiting, used = self._published
        return EngineStats(
            running=running, waiting=waiting, slots_total=self.pool.size, slots_used=used,
            state_bytes_per_slot=self.pool.bytes_per_row, state_bytes_total=self.pool.nbytes,
            prefix_cache_hits=self.cache.hits, prefix_cache_misses=self.cache.misses,
            prefix_cache_tokens_saved=self.cache.tokens_saved, prefix_cache_bytes=self.cache.bytes,
            prefix_cache_entries=len(self.cache), prompt_tokens_total=c["prompt_tokens"],
            generated_tokens_total=c["generated_tokens"], steps_total=c["steps"], aborted_total=c["aborted"],
            alive=self.is_alive, draining=self._draining, threads=self._threads_in_use)

    def _check_admissible(self) -> None:
        if self._error is not None or (self._thread is not None and not self._thread.is_alive()):
            raise EngineDead("the engine has stopped")
        if self._thread is None:
            raise EngineDead("the engine is not started")
        if self._draining:
            raise EngineDraining("the server is shutting down")

    def _validate(self, request: GenerateRequest) -> None:
        self._check_tokens(request.prompt_tokens, "prompt")
        if len(request.prompt_tokens) > self.config.max_prompt_tokens:
            raise InvalidRequest(f"prompt has {len(request.prompt_tokens)} tokens; the limit is "
                                 f"{self.config.max_prompt_tokens}", param="prompt")
        if request.params.max_tokens > self.config.max_max_tokens:
            raise InvalidRequest(f"max_tokens {request.params.max_tokens} exceeds the limit "
                                 f"{self.config.max_max_tokens}", param="max_tokens")
        if request.n > self.config.max_sessions:
            raise InvalidRequest(f"n={request.n} exceeds the {self.config.max_sessions} state slots", param="n")
        request.params.check_token_ids(self.model_config.vocab_size)

    def _check_tokens(self, ids: list[int], param: str) -> None:
        V = self.model_config.vocab_size
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < V:
                raise InvalidRequest(f"token id {t!r} is outside the vocabulary [0, {V})", param=param)

    # ------------------------------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        # this thread runs every model call; its OpenMP team should be the only one (engine/model/threads.py)
        torch.set_num_threads(self._threads)
        self._threads_in_use = torch.get_num_threads()
        try:
            with torch.inference_mode():
                while True:
                    self._drain_inbox()
                    self._publish_and_flush()
                    if self._stopping and not self._groups:
                        break
                    if not self.scheduler.groups and not self._embed_jobs:
                        self._wake.wait(0.1)
                        self._wake.clear()
                        continue
                    self.step()
                    self._publish_and_flush()
        except BaseException as exc:            # the loop itself died: fail everyone, report dead
            log.exception("engine step loop died")
            self._error = exc
            self._fail_all(EngineDead(f"the engine stopped: {type(exc).__name__}"))
            self._outbox.flush()

    def _publish_and_flush(self) -> None:
        """Stats first, then the outputs: a consumer woken by its last output sees its slots freed."""
        self._published = (self.scheduler.running_seqs, self.scheduler.waiting_seqs, self.pool.used)
        self._outbox.flush()

    def step(self) -> None:
        """One step: admit, schedule, run the model, sample, deliver."""
        self._counters["steps"] += 1
        for gid in self.scheduler.admit():
            self._begin(self._groups[gid])
        plan = self.scheduler.plan()
        by_length: dict[int, list[_Group]] = {}
        for gid, ntok in plan.prefill:                 # equal-length chunks share one batched forward
            by_length.setdefault(ntok, []).append(self._groups[gid])
        for ntok, groups in by_length.items():
            if len(groups) == 1:
                self._prefill(groups[0], ntok)
            else:
                self._prefill_batch(groups, ntok)
        if plan.decode:
            self._decode([self._groups[g] for g in plan.decode if g in self._groups])
        if self._embed_jobs:
            self._embed_step(self._embed_jobs[0])

    def _drain_inbox(self) -> None:
        with self._lock:
            items = list(self._inbox)
            self._inbox.clear()
        for kind, obj in items:
            if kind == "add":
                self._groups[obj.id] = obj
                self.scheduler.add(obj.id, len(obj.request.prompt_tokens), obj.request.n)
            elif kind == "abort":
                self._abort(obj)
            elif kind == "embed":
                self._embed_jobs.append(obj)

    # ------------------------------------------------------------------------------------------ prefill
    def _begin(self, g: _Group) -> None:
        """Admitted: take a state row, resume from the longest cached prefix unless prompt logprobs are needed."""
        self.pool.alloc(g.key(0))
        prompt = g.request.prompt_tokens
        if g.request.params.prompt_logprobs is None:
            cached, state = self.cache.lookup(prompt)
            if state is not None:
                self.pool.load(g.key(0), state)
                g.cached = cached
                self.scheduler.skip_prompt(g.id, cached)
        else:
            g.prompt_logprobs = [None]
        self._counters["prompt_tokens"] += len(prompt)

    def _prefill(self, g: _Group, ntok: int) -> None:
        prompt = g.request.prompt_tokens
        start = self.scheduler.groups[g.id].position
        end = start + ntok
        try:
            chunk = torch.tensor([prompt[start:end]], device=self.model.device)
            want_all = g.prompt_logprobs is not None
            logits, _ = self.model.forward(chunk, self.pool.view(g.key(0)), full_output=want_all)
        except Exception as exc:                       # this request's data broke the step: fail it alone
            self._fail(g, exc)
            return
        self._after_prefill(g, logits[:, -1] if want_all else logits, start, end, logits[0] if want_all else None)

    def _after_prefill(self, g: _Group, last_logits: torch.Tensor, start: int, end: int,
                       all_logits: torch.Tensor | None) -> None:
        """Prompt logprobs, prefix-cache snapshots, and the first tokens once the whole prompt is in."""
        prompt = g.request.prompt_tokens
        try:
            if all_logits is not None:
                self._collect_prompt_logprobs(g, all_logits, start, end)
            if self.cache.enabled and (end == len(prompt) or end % self.config.prefix_cache_interval == 0):
                self.cache.insert(prompt[:end], self.pool.view(g.key(0)))
        except Exception as exc:
            self._fail(g, exc)
            return
        if self.scheduler.prefilled(g.id, end - start):
            self._start_decoding(g, last_logits)

    def _prefill_batch(self, groups: list[_Group], ntok: int) -> None:
        """One forward for several prompts' chunks of the same length, on a copy of their state rows.

        If the batched forward fails, nothing was written back, and each prompt is retried on its own so a
        failure stays with the request that caused it."""
        rows = torch.tensor([self.pool.row_of(g.key(0)) for g in groups], device=self.model.device)
        starts = [self.scheduler.groups[g.id].position for g in groups]
        want_all = any(g.prompt_logprobs is not None for g in groups)
        try:
            tokens = torch.tensor([g.request.prompt_tokens[s:s + ntok] for g, s in zip(groups, starts)],
                                  device=self.model.device)
            state = self.pool.state.index_select(rows)
            logits, state = self.model.forward(tokens, state, full_output=want_all)
        except Exception:
            log.warning("batched prefill of %d prompts failed; retrying them one by one", len(groups))
            for g in groups:
                self._prefill(g, ntok)
            return
        self.pool.state.index_copy_(rows, state)
        for j, (g, start) in enumerate(zip(groups, starts)):
            row_logits = logits[j:j + 1]
            self._after_prefill(g, row_logits[:, -1] if want_all else row_logits, start, start + ntok,
                                row_logits[0] if g.prompt_logprobs is not None else None)

    def _collect_prompt_logprobs(self, g: _Group, logits: torch.Tensor, start: int, end: int) -> None:
        prompt = g.request.prompt_tokens
        k = g.request.params.prompt_logprobs
        lp = torch.log_softmax(logits, dim=-1)               # [T, V]
        for t in range(end - start):
            pos = start + t + 1                              # logits at t predict prompt[pos]
            if pos < len(prompt):
                g.prompt_logprobs.append(top_logprobs(lp, t, prompt[pos], k))

    def _start_decoding(self, g: _Group, logits: torch.Tensor) -> None:
        """The prompt is in the state: clone it for n sequences and sample their first tokens."""
        p = g.request.params
        for i in range(g.request.n):
            if i:
                self.pool.alloc(g.key(i))
                self.pool.copy(g.key(0), g.key(i))
            counts = (torch.zeros(self.model_config.vocab_size) if p.presence_penalty or p.frequency_penalty
                      else None)
            row = SamplerRow(p, make_generator(p.seed, i), counts)
            g.seqs.append(_Seq(i, row, TextStream(self.tokenizer.stream_decoder(), p.stop)))
        if p.max_tokens == 0:
            for s in g.seqs:
                s.finished = FinishReason.LENGTH
            self._deliver(g, {s.index: [] for s in g.seqs})
            return
        self._sample_and_deliver([(g, s) for s in g.seqs], logits.expand(len(g.seqs), -1))

    # ------------------------------------------------------------------------------------------ decode
    def _decode(self, groups: list[_Group]) -> None:
        """One token for every live sequence: one forward in place on the packed pool rows, one sampling pass."""
        seqs = [(g, s) for g in groups for s in g.seqs if s.finished is None]
        if not seqs:
            return
        state = self.pool.pack([g.key(s.index) for g, s in seqs])
        tokens = torch.tensor([[s.pending] for _, s in seqs], device=self.model.device)
        logits, _ = self.model.forward(tokens, state)                   # [D, V], state advanced in place
        self._sample_and_deliver(seqs, logits)

    def _sample_and_deliver(self, seqs: list[tuple[_Group, _Seq]], logits: torch.Tensor) -> None:
        """Sample all rows in one vectorized pass, then update and deliver group by group."""
        want = any(g.request.params.logprobs is not None for g, _ in seqs)
        try:
            tokens, logprobs = sample(logits.float().cpu(), [s.row for _, s in seqs], want_logprobs=want)
        except Exception:                          # isolate the culprit: sample each group on its own
            tokens, logprobs = None, None
        by_group: dict[str, tuple[_Group, dict[int, list]]] = {}
        for j, (g, s) in enumerate(seqs):
            if g.id not in self._groups:
                continue
            try:
                if tokens is None:
                    one, lps = sample(logits[j:j + 1].float().cpu(), [s.row], want_logprobs=want)
                    tok, lp_row, lp_src = one[0], 0, lps
                else:
                    tok, lp_row, lp_src = tokens[j], j, logprobs
                k = g.request.params.logprobs
                lp = top_logprobs(lp_src, lp_row, tok, k) if k is not None else None
                self._advance(g, s, tok)
            except Exception as exc:                # this request's data broke: fail it alone
                self._fail(g, exc)
                by_group.pop(g.id, None)
                continue
            by_group.setdefault(g.id, (g, {}))[1][s.index] = [(tok, lp)]
        for g, new in by_group.values():
            if g.id in self._groups:
                self._deliver(g, new)

    def _advance(self, g: _Group, s: _Seq, tok: int) -> None:
        """Record a sampled token and decide whether its sequence finishes."""
        p = g.request.params
        s.tokens.append(tok)
        s.pending = tok
        self._counters["generated_tokens"] += 1
        s.delta = ""
        if (tok == self.tokenizer.eot_id and not p.ignore_eos) or tok in p.stop_token_ids:
            s.finished = FinishReason.STOP
            s.delta = s.text.finish()
            return
        text, stopped = s.text.push(tok)
        s.delta = text
        if stopped:
            s.finished = FinishReason.STOP
        elif len(s.tokens) >= p.max_tokens:
            s.finished = FinishReason.LENGTH
            s.delta += s.text.finish()
            if s.text.stopped:
                s.finished = FinishReason.STOP

    def _deliver(self, g: _Group, new: dict[int, list]) -> None:
        outputs = []
        for s in g.seqs:
            if s.index not in new:
                continue
            items = new[s.index]
            want_lp = g.request.params.logprobs is not None
            outputs.append(SequenceOutput(
                index=s.index, text=s.delta, token_ids=[t for t, _ in items],
                logprobs=[lp for _, lp in items] if want_lp else None,
                finish_reason=s.finished if s.finished and s.finished is not FinishReason.ABORT else None,
                cumulative_tokens=len(s.tokens)))
            s.delta = ""
        done = all(s.finished is not None for s in g.seqs)
        out = RequestOutput(request_id=g.id, outputs=outputs, prompt_tokens=len(g.request.prompt_tokens),
                            prompt_logprobs=None, cached_prompt_tokens=g.cached, finished=done)
        if not g.sent_prompt:
            out.prompt_logprobs = g.prompt_logprobs
            g.sent_prompt = True
        for s in g.seqs:
            if s.finished is not None and not s.released:
                s.released = True
                self._release_seq(g, s)
        if done:
            self._groups.pop(g.id, None)
        g.sink.put(out)

    def _release_seq(self, g: _Group, s: _Seq) -> None:
        """A sequence finished: snapshot its conversation state for the next turn, free its row."""
        key = g.key(s.index)
        if s.finished is not FinishReason.ABORT and self.cache.enabled and len(s.tokens) > 1:
            try:
                self.cache.insert(g.request.prompt_tokens + s.tokens[:-1], self.pool.view(key))
            except Exception:                          # the cache is an optimisation: never fail for it
                log.exception("prefix-cache snapshot of %s failed", g.id)
        self.pool.free(key)
        self.scheduler.finish_seq(g.id)

    # ------------------------------------------------------------------------------------------ abort/fail
    def _abort(self, request_id: str) -> None:
        g = self._groups.pop(request_id, None)
        if g is None:
            return
        self._counters["aborted"] += 1
        self._drop(g)
        g.sink.put(RequestOutput(request_id=g.id, prompt_tokens=len(g.request.prompt_tokens), finished=True,
                                 outputs=[SequenceOutput(index=s.index, text="", token_ids=[],
                                                         finish_reason=FinishReason.ABORT,
                                                         cumulative_tokens=len(s.tokens))
                                          for s in g.seqs if s.finished is None]))

    def _fail(self, g: _Group, exc: Exception) -> None:
        log.exception("request %s failed", g.id, exc_info=exc)
        self._groups.pop(g.id, None)
        self._drop(g)
        g.sink.put(RequestFailed(f"request {g.id} failed: {type(exc).__name__}"))

    def _drop(self, g: _Group) -> None:
        for i in range(g.request.n):
            self.pool.free(g.key(i))
        self.scheduler.remove(g.id)

    def _fail_all(self, exc: BaseException) -> None:
        for g in list(self._groups.values()):
            g.sink.put(exc)
        self._groups.clear()
        with self._lock:
            for kind, obj in self._inbox:
                if kind in ("add", "embed"):
                    obj.sink.put(exc)
            self._inbox.clear()
        for job in self._embed_jobs:
            job.sink.put(exc)

    # ------------------------------------------------------------------------------------------ embeddings
    def _embed_step(self, job: _EmbedJob) -> None:
        """Run one chunk (at most prefill_chunk tokens) of the job's current equal-length batch."""
        try:
            self._embed_chunk(job)
        except Exception as exc:
            log.exception("embedding failed")
            self._embed_jobs.popleft()
            job.sink.put(RequestFailed(f"embedding failed: {type(exc).__name__}"))
            return
        if not job.batches:
            self._embed_jobs.popleft()
            job.sink.put([job.results[i] for i in range(len(job.inputs))])

    def _embed_chunk(self, job: _EmbedJob) -> None:
        batch = job.batches[0]
        length = len(job.inputs[batch[0]])
        if job.position == 0:
            job.state, job.total = self.model.zero_state(len(batch)), None
        end = min(length, job.position + self.config.prefill_chunk)
        tokens = torch.tensor([job.inputs[i][job.position:end] for i in batch], device=self.model.device)
        mean = job.pooling == "mean"
        hidden, job.state = self.model.forward_hidden(tokens, job.state, full_output=mean)   # [k, (T,) C]
        part = hidden.sum(1) if mean else hidden
        job.total = part if (job.total is None or not mean) else job.total + part
        job.position = end
        if end == length:
            vecs = job.total / length if mean else job.total
            vecs = torch.nn.functional.normalize(vecs.float(), dim=-1).cpu()
            for i, vec in zip(batch, vecs):
                job.results[i] = vec.tolist()
            job.batches.pop(0)
            job.position, job.state, job.total = 0, None, None
