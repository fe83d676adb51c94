"""EngineCore: the step loop's thread and everything it owns (scheduler, state pool, prefix cache, live requests).

Admission is the one doorway in: a request is counted against max_waiting in the same critical section that queues
it, so a burst can never make the loop hold more than it promised. Every step is schedule -> execute -> update.
Anything that goes wrong for one request (its data, its callbacks, its output) fails that request alone; only a
failure of the batched model call or of the loop itself stops the engine.
"""
from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from engine.config import EngineConfig
from engine.cuda_graphs import DecodeGraphs, use_static_decode
from engine.embeddings import EmbedJob, run_chunk
from engine.errors import EngineDead, EngineDraining, EngineError, InvalidRequest, Overloaded, RequestFailed
from engine.model.state import RNNState
from engine.prefix_cache import PrefixCache
from engine.request import FinishReason
from engine.runner import ModelRunner, PrefillResult
from engine.sampling import on_device, sample, top_logprobs
from engine.scheduler import SchedulePlan, Scheduler
from engine.state_pool import StatePool
from engine.streams import Outbox
from engine.structured import MaskBatch, MaskFiller
from engine.update import Group, Sequence, abort_output, advance, start_sequences, take_output

log = logging.getLogger("goose.engine")


@dataclass
class Batch:
    """Rows to sample in one pass: their sequences, their logits [len, V], and their grammar masks (a Future
    while they are being filled during the forward)."""
    seqs: list[tuple[Group, Sequence]]
    logits: torch.Tensor
    masks: Future | None = None
    sampled: Callable[[], list[int]] | None = None      # the ids sampled on the device (static decode)


class EngineCore:
    def __init__(self, model, tokenizer, config: EngineConfig, *, vocab_size: int):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.vocab_size = vocab_size
        self.pool = StatePool(model, config.max_sessions)
        self.cache = PrefixCache(config.prefix_cache_bytes)
        self.scheduler = Scheduler(max_slots=config.max_sessions, prefill_chunk=config.prefill_chunk,
                                   step_token_budget=config.step_token_budget,
                                   align=config.prefix_cache_interval if self.cache.enabled else 0)
        self.initials: dict[str, tuple[str, RNNState | None]] = {"": ("", None)}   # name -> (key, state)
        static = use_static_decode(config.cuda_graphs, self.pool.state.wkv[0].device)
        self.graphs = DecodeGraphs(model, self.pool) if static else None
        self.runner = ModelRunner(model, self.pool, self.cache, snapshot_every=config.prefix_cache_interval,
                                  initials=self.initials, graphs=self.graphs)
        self._ready: list[Batch] = []                # first tokens of prompts the cache covered whole
        self.mask_filler = MaskFiller()
        self._mask_thread: ThreadPoolExecutor | None = None
        self.outbox = Outbox()
        self.counters = collections.Counter()
        self.groups: dict[str, Group] = {}
        self.embed_jobs: collections.deque[EmbedJob] = collections.deque()
        # shared with the submitting threads, under the lock
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self._inbox: collections.deque = collections.deque()
        self._ids: set[str] = set()                  # request ids queued or live
        self._waiting = 0                            # sequences admitted here and not yet given slots
        self.draining = False
        self.stopping = False
        self.error: BaseException | None = None
        self.published = (0, 0, 0)                   # (running, waiting, slots used), written by the loop

    # ------------------------------------------------------------------------------------------ admission
    def check_open(self) -> None:
        if self.error is not None:
            raise EngineDead("the engine has stopped")
        if self.draining:
            raise EngineDraining("the server is shutting down")

    def enqueue(self, group: Group) -> None:
        """Queue a validated request, or raise Overloaded / InvalidRequest for it alone (never for the loop)."""
        n = group.request.n
        with self.lock:
            self.check_open()
            if group.id in self._ids:
                raise InvalidRequest(f"request id {group.id!r} is already in use", param="request_id")
            if self._waiting + n > self.config.max_waiting:
                raise Overloaded(f"too many requests waiting ({self._waiting}); retry later", retry_after=1.0)
            self._waiting += n
            self._ids.add(group.id)
            self._inbox.append(("add", group))
        self.wake.set()

    def enqueue_embed(self, job: EmbedJob) -> None:
        with self.lock:
            self.check_open()
            if len(self.embed_jobs) + sum(kind == "embed" for kind, _ in self._inbox) >= self.config.max_waiting:
                raise Overloaded("too many embedding requests waiting; retry later", retry_after=1.0)
            self._inbox.append(("embed", job))
        self.wake.set()

    def abort(self, request_id: str) -> None:
        with self.lock:
            self._inbox.append(("abort", request_id))
        self.wake.set()

    @property
    def waiting(self) -> int:
        return self._waiting

    def _admitted(self, group: Group) -> None:
        """The group left the waiting count (it got slots, or it ended before getting them); once."""
        if group.waiting:
            group.waiting = False
            with self.lock:
                self._waiting -= group.request.n

    def _forget(self, group_id: str) -> None:
        with self.lock:
            self._ids.discard(group_id)

    # ------------------------------------------------------------------------------------------ the loop
    def run(self, threads: int, on_start: Callable[[int], None]) -> None:
        # this thread runs every model call; its OpenMP team should be the only one (engine/model/threads.py)
        torch.set_num_threads(threads)
        on_start(torch.get_num_threads())
        if self.graphs is not None:                  # captured once, while every state row is free
            try:
                self.graphs.capture_all()
            except Exception:                        # noqa: BLE001 - decode eagerly instead
                log.exception("CUDA graph capture failed; decoding without graphs")
                self.graphs = self.runner.graphs = None
        try:
            with torch.inference_mode():
                while True:
                    self._drain_inbox()
                    self._publish()
                    if self.stopping and not self.groups:
                        break
                    if not self.scheduler.groups and not self.embed_jobs:
                        self.wake.wait(0.1)
                        self.wake.clear()
                        continue
                    self.step()
                    self._publish()
        except BaseException as exc:                 # noqa: BLE001 - the model call or the loop failed: fatal
            log.exception("engine loop crashed")
            self.error = exc
            self._fail_all(EngineDead(f"the engine stopped: {type(exc).__name__}"))
            self._publish()
        finally:
            if self._mask_thread is not None:
                self._mask_thread.shutdown(wait=False)

    def step(self) -> None:
        """One step: schedule, run the model, sample and deliver."""
        self.counters["steps"] += 1
        plan = self._schedule()
        batches = self._execute(plan)
        self._update(batches)
        if self.embed_jobs:
            self._embed_step(self.embed_jobs[0])

    def _schedule(self) -> SchedulePlan:
        whole = []
        for gid in self.scheduler.admit():
            g = self.groups[gid]
            self._admitted(g)
            if self._guard(g, self._begin, g) and g.first_logits is not None:
                whole.append(g)
        plan = self.scheduler.plan()
        for g in whole:                              # the cache held the prompt and its last logits: no forward
            batch = self._prompt_progress(PrefillResult(g, g.cached, g.cached, logits=g.first_logits))
            if batch is not None:
                self._ready.append(batch)
        return plan

    def _execute(self, plan: SchedulePlan) -> list[Batch]:
        """The plan's model calls; returns the batches of rows to sample."""
        batches, self._ready = self._ready, []
        if plan.decode:                              # decode first: prompts that finish now join the next step
            seqs = [(g, s) for g in (self.groups[i] for i in plan.decode if i in self.groups)
                    for s in g.seqs if s.finished is None]
            if seqs:
                masks = self._masks_async(seqs)      # grammar masks are filled while the forward runs
                batches.append(self._decode(seqs, masks))
        by_length: dict[int, list[tuple[Group, int]]] = {}
        for gid, ntok in plan.prefill:               # equal-length chunks share one batched forward
            g = self.groups.get(gid)
            if g is not None:
                by_length.setdefault(ntok, []).append((g, self.scheduler.groups[gid].position))
        for ntok, chunks in by_length.items():
            for result in self.runner.prefill(chunks, ntok):
                first = self._prompt_progress(result)
                if first is not None:
                    batches.append(first)
        return batches

    def _decode(self, seqs: list[tuple[Group, Sequence]], masks: Future | None) -> Batch:
        """The decode forward: through the static buffers (sampled there too unless a row needs the host
        sampler: logprobs, grammar masks, biases or penalties) when they are on and the step fits, else eagerly."""
        if self.graphs is not None:
            here = masks is None and all(g.params.logprobs is None and on_device(s.row) for g, s in seqs)
            out = self.runner.decode_static(seqs, sample=here)
            if out is not None:
                return Batch(seqs, out[0], masks, out[1] if here else None)
        return Batch(seqs, self.runner.decode(seqs), masks)

    def _prompt_progress(self, r: PrefillResult):
        """Record a prompt chunk; when the prompt is complete, its sequences' first tokens are to be sampled."""
        g = r.group
        if r.error is not None:
            self._fail(g, r.error)
            return None
        if not self.scheduler.prefilled(g.id, r.end - r.start):
            return None
        if not self._guard(g, self._start_decoding, g):
            return None
        live = [(g, s) for s in g.seqs if s.finished is None]
        return Batch(live, r.logits.expand(len(live), -1)) if live else None

    def _start_decoding(self, g: Group) -> None:
        self.runner.fork(g)
        start_sequences(g, self.tokenizer, self.vocab_size)
        if g.params.max_tokens == 0:
            self._deliver(g, {s.index: [] for s in g.seqs})

    def _update(self, batches: list[Batch]) -> None:
        """Sample every batch's rows, apply the finish rules, deliver group by group."""
        for batch in batches:
            self._sample_and_deliver(batch.seqs, batch.logits, self._masks(batch), batch.sampled)

    # ------------------------------------------------------------------------------------------ grammars
    def _masks_async(self, seqs: list[tuple[Group, Sequence]]) -> Future | None:
        matchers = [s.matcher for _, s in seqs]
        if all(m is None for m in matchers):
            return None
        if self._mask_thread is None:
            self._mask_thread = ThreadPoolExecutor(1, thread_name_prefix="goose-masks")
        return self._mask_thread.submit(self.mask_filler.fill, matchers)

    def _masks(self, batch: Batch) -> MaskBatch | None:
        """The batch's grammar masks (filled now unless they were filled during the forward); a row whose
        grammar hit a work limit fails its request."""
        if isinstance(batch.masks, Future):
            masks = batch.masks.result()
        elif any(s.matcher is not None for _, s in batch.seqs):
            masks = self.mask_filler.fill([s.matcher for _, s in batch.seqs])
        else:
            return None
        for row, why in (masks.errors if masks is not None else {}).items():
            self._fail(batch.seqs[row][0], RequestFailed(f"the output's grammar failed: {why}"))
        return masks

    # ------------------------------------------------------------------------------------------ sampling
    def _sample_and_deliver(self, seqs: list[tuple[Group, Sequence]], logits: torch.Tensor,
                            masks: MaskBatch | None = None, sampled: Callable[[], list[int]] | None = None) -> None:
        want = any(g.params.logprobs is not None for g, _ in seqs)
        try:
            tokens, logprobs = (sampled(), None) if sampled is not None else sample(
                logits.float().cpu(), [s.row for _, s in seqs], want_logprobs=want, mask=masks)
        except Exception:                            # noqa: BLE001 - isolate the culprit: sample rows one by one
            tokens, logprobs = None, None
        by_group: dict[str, tuple[Group, dict[int, list]]] = {}
        for j, (g, s) in enumerate(seqs):
            if g.id not in self.groups:
                continue
            try:
                if tokens is None:
                    one, lps = sample(logits[j:j + 1].float().cpu(), [s.row], want_logprobs=want,
                                      mask=masks.row(j) if masks is not None else None)
                    tok, lp_row, lp_src = one[0], 0, lps
                else:
                    tok, lp_row, lp_src = tokens[j], j, logprobs
                k = g.params.logprobs
                lp = top_logprobs(lp_src, lp_row, tok, k) if k is not None else None
                self.counters["generated_tokens"] += 1
                advance(s, g.params, tok, self.tokenizer.eot_id)
            except Exception as exc:                 # noqa: BLE001 - this request's data broke: fail it alone
                self._fail(g, exc)
                by_group.pop(g.id, None)
                continue
            by_group.setdefault(g.id, (g, {}))[1][s.index] = [(tok, lp)]
        for g, new in by_group.values():
            if g.id in self.groups:
                self._guard(g, self._deliver, g, new)

    def _deliver(self, g: Group, new: dict[int, list]) -> None:
        for s in g.seqs:
            if s.finished is not None and not s.released:
                s.released = True
                self.runner.release(g, s, snapshot=s.finished is not FinishReason.ABORT)
                self.scheduler.finish_seq(g.id)
        out = take_output(g, new)
        if out.finished:
            self.groups.pop(g.id, None)
            self._forget(g.id)
        g.sink.put(out)

    # ------------------------------------------------------------------------------------------ inbox, failures
    def _drain_inbox(self) -> None:
        with self.lock:
            items = list(self._inbox)
            self._inbox.clear()
        for kind, obj in items:
            if kind == "add":
                self.groups[obj.id] = obj
                stops = self.runner.snapshot_points(obj) if self.cache.enabled else ()
                self._guard(obj, self.scheduler.add, obj.id, len(obj.request.prompt_tokens), obj.request.n, stops)
            elif kind == "abort":
                self._abort(obj)
            elif kind == "embed":
                self.embed_jobs.append(obj)

    def _begin(self, g: Group) -> None:
        self.counters["prompt_tokens"] += len(g.request.prompt_tokens)
        cached = self.runner.begin(g)
        if cached:
            self.scheduler.skip_prompt(g.id, cached)

    def _guard(self, g: Group, fn, *args) -> bool:
        """Run one request's step work; an exception fails that request alone. True when it went through."""
        try:
            fn(*args)
            return True
        except Exception as exc:                     # noqa: BLE001 - any per-request failure, reported to it
            self._fail(g, exc)
            return False

    def _abort(self, request_id: str) -> None:
        g = self.groups.pop(request_id, None)
        if g is None:
            return
        self.counters["aborted"] += 1
        self._drop(g)
        g.sink.put(abort_output(g))

    def _fail(self, g: Group, exc: Exception) -> None:
        if g.id not in self.groups:
            return
        log.error("request %s failed: %s", g.id, type(exc).__name__, exc_info=exc)
        self.groups.pop(g.id, None)
        self._drop(g)
        g.sink.put(exc if isinstance(exc, EngineError) else
                   RequestFailed(f"request {g.id} failed: {type(exc).__name__}"))

    def _drop(self, g: Group) -> None:
        """Give back everything a group holds: its rows, its scheduler entry, its waiting count, its id."""
        self._admitted(g)
        self.runner.free(g)
        self.scheduler.remove(g.id)
        self._forget(g.id)

    def _fail_all(self, exc: BaseException) -> None:
        for g in list(self.groups.values()):
            g.sink.put(exc)
        self.groups.clear()
        with self.lock:
            for kind, obj in self._inbox:
                if kind in ("add", "embed"):
                    obj.sink.put(exc)
            self._inbox.clear()
        for job in self.embed_jobs:
            job.sink.put(exc)

    def _publish(self) -> None:
        """Stats first, then the outputs: a consumer woken by its last output sees its slots freed."""
        self.published = (self.scheduler.running_seqs, self.scheduler.waiting_seqs, self.pool.used)
        self.outbox.flush()

    # ------------------------------------------------------------------------------------------ embeddings
    def _embed_step(self, job: EmbedJob) -> None:
        try:
            run_chunk(self.model, job, self.config.prefill_chunk)
        except Exception as exc:                     # noqa: BLE001 - fails this embedding request alone
            log.exception("embedding failed")
            self.embed_jobs.popleft()
            job.sink.put(RequestFailed(f"embedding failed: {type(exc).__name__}"))
            return
        if job.done:
            self.embed_jobs.popleft()
            job.sink.put(job.vectors())
