"""The model calls of one engine step: prompt chunks (alone or batched by length) and the batched decode, on rows
of the state pool. The only place where a plan meets tensors."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.model.state import RNNState
from engine.prefix_cache import PrefixCache
from engine.prefix_hash import ConvState, PrefixHashes
from engine.sampling import top_logprobs
from engine.state_pool import StatePool
from engine.update import Group, Sequence

log = logging.getLogger("goose.engine")


@dataclass
class PrefillResult:
    """One group's prompt chunk has run: the logits of its last position, or the exception it raised."""
    group: Group
    start: int
    end: int
    logits: torch.Tensor | None = None          # [1, V] at the chunk's last position
    error: Exception | None = None


class ModelRunner:
    def __init__(self, model, pool: StatePool, cache: PrefixCache, *, snapshot_every: int,
                 initials: dict[str, tuple[str, RNNState | None]], graphs=None):
        self.model = model
        self.graphs = graphs                # engine.cuda_graphs.DecodeGraphs when the static decode is on
        self.pool = pool
        self.cache = cache
        self.snapshot_every = snapshot_every
        self.initials = initials            # initial-state name -> (its key in stored states, the state)

    def initial_key(self, g: Group) -> str:
        return self.initials[g.request.initial][0]

    @staticmethod
    def snapshot_points(g: Group) -> tuple[int, ...]:
        """Where a prompt's chunks end for a snapshot besides its end: the first message boundary (a shared system
        prompt) and the last (the history before the newest message: an edited or regenerated turn)."""
        b = g.request.boundaries
        return tuple(sorted({b[0], b[-1]})) if b else ()

    def begin(self, g: Group) -> int:
        """Admitted: take a state row, load the start (a conversation state, an initial state, else zeros), and
        resume from the longest cached prefix, in memory or found in the state store at submit (unless prompt
        logprobs are wanted, which need every position's logits); returns the prompt tokens already in the state."""
        key = g.key(0)
        self.pool.alloc(key)
        start = g.request.start.state if g.request.start is not None else self.initials[g.request.initial][1]
        if start is not None:
            self.pool.load(key, start)
        if g.params.prompt_logprobs is not None:
            g.prompt_logprobs = [None]
            return 0
        hit = self.cache.lookup(self.initial_key(g), g.hashes) if g.hashes is not None else None
        if g.stored is not None and (hit is None or g.stored.tokens > hit.tokens):
            hit = g.stored
        g.stored = None
        if hit is not None:
            self.pool.load(key, hit.state)
            g.cached, g.first_logits = hit.tokens, hit.logits
        return g.cached

    def prefill(self, chunks: list[tuple[Group, int]], ntok: int) -> list[PrefillResult]:
        """Run ``ntok`` prompt tokens from each (group, start); equal-length chunks share one forward on a copy
        of their rows. If the batched forward fails nothing was written back, and each prompt is retried alone so
        a failure stays with the request that caused it."""
        if len(chunks) > 1:
            try:
                return self._prefill_batch(chunks, ntok)
            except Exception:                                     # noqa: BLE001 - retried one by one below
                log.warning("batched prefill of %d prompts failed; retrying them one by one", len(chunks))
        results = []
        for g, start in chunks:
            try:
                results.append(self._prefill_one(g, start, ntok))
            except Exception as exc:                              # noqa: BLE001 - this request's data broke it
                results.append(PrefillResult(g, start, start + ntok, error=exc))
        return results

    def _prefill_one(self, g: Group, start: int, ntok: int) -> PrefillResult:
        want_all = g.prompt_logprobs is not None
        chunk = torch.tensor([g.request.prompt_tokens[start:start + ntok]], device=self.model.device)
        logits, _ = self.model.forward(chunk, self.pool.view(g.key(0)), full_output=want_all)
        return self._after(g, start, start + ntok, logits[0] if want_all else None,
                           logits[:, -1] if want_all else logits)

    def _prefill_batch(self, chunks: list[tuple[Group, int]], ntok: int) -> list[PrefillResult]:
        rows = torch.tensor([self.pool.row_of(g.key(0)) for g, _ in chunks], device=self.model.device)
        want_all = any(g.prompt_logprobs is not None for g, _ in chunks)
        tokens = torch.tensor([g.request.prompt_tokens[s:s + ntok] for g, s in chunks], device=self.model.device)
        state = self.pool.state.index_select(rows)
        logits, state = self.model.forward(tokens, state, full_output=want_all)
        self.pool.state.index_copy_(rows, state)
        results = []
        for j, (g, start) in enumerate(chunks):
            row = logits[j:j + 1]
            results.append(self._after(g, start, start + ntok, row[0] if g.prompt_logprobs is not None else None,
                                       row[:, -1] if want_all else row))
        return results

    def _after(self, g: Group, start: int, end: int, all_logits, last_logits) -> PrefillResult:
        """Prompt logprobs and prefix-cache snapshots of a chunk that ran."""
        result = PrefillResult(g, start, end, logits=last_logits)
        prompt = g.request.prompt_tokens
        try:
            if all_logits is not None:
                self._prompt_logprobs(g, all_logits, start, end)
            last = end == len(prompt)
            if self.cache.enabled and g.hashes is not None and (
                    last or end % self.snapshot_every == 0 or end in self.snapshot_points(g)):
                self.cache.insert(self.initial_key(g), g.hashes.digest(end), g.started_at + end,
                                  self.pool.view(g.key(0)), logits=last_logits if last else None)
        except Exception as exc:                                  # noqa: BLE001 - fails this request alone
            result.error = exc
        return result

    @staticmethod
    def _prompt_logprobs(g: Group, logits: torch.Tensor, start: int, end: int) -> None:
        prompt = g.request.prompt_tokens
        k = g.params.prompt_logprobs
        lp = torch.log_softmax(logits, dim=-1)                    # [T, V]
        for t in range(end - start):
            pos = start + t + 1                                   # logits at t predict prompt[pos]
            if pos < len(prompt):
                g.prompt_logprobs.append(top_logprobs(lp, t, prompt[pos], k))

    def fork(self, g: Group) -> None:
        """n > 1: rows for sequences 1..n-1, copies of the prompt's state in row 0."""
        for i in range(1, g.request.n):
            self.pool.alloc(g.key(i))
            self.pool.copy(g.key(0), g.key(i))

    def decode(self, seqs: list[tuple[Group, Sequence]]) -> torch.Tensor:
        """One token for each sequence: one forward in place on the packed pool rows; logits [D, V]."""
        state = self.pool.pack([g.key(s.index) for g, s in seqs])
        tokens = torch.tensor([[s.pending] for _, s in seqs], device=self.model.device)
        logits, _ = self.model.forward(tokens, state)
        return logits

    def decode_static(self, seqs: list[tuple[Group, Sequence]], sample: bool):
        """decode() through the static buffers (CUDA graphs on CUDA, engine/cuda_graphs.py): (logits [D, V] valid
        until the next step, a function returning the ids sampled on the device when ``sample``), or None when
        this step must run decode() instead."""
        return self.graphs.launch([g.key(s.index) for g, s in seqs], [s.pending for _, s in seqs],
                                  [s.row for _, s in seqs], sample=sample)

    def release(self, g: Group, s: Sequence, snapshot: bool) -> None:
        """A sequence finished: snapshot its conversation state for the next turn (and hand it back when the
        request keeps it), free its row. The state holds the prompt and every output token but the last (sampled,
        never fed)."""
        key = g.key(s.index)
        want = g.request.keep_state or (self.cache.enabled and len(s.tokens) > 1)
        if snapshot and want and g.hashes is not None:
            fed = s.tokens[:-1]
            after = PrefixHashes(g.hashes.prefix(len(g.request.prompt_tokens)), fed)
            view = self.pool.view(key)
            if g.request.keep_state:
                g.kept = ConvState(view.to("cpu") if view.wkv[0].device.type != "cpu" else view.clone(),
                                   after.prefix(len(fed)), g.request.initial)
            if self.cache.enabled and len(s.tokens) > 1:
                try:
                    self.cache.insert(self.initial_key(g), after.digest(len(fed)), after.start.length + len(fed),
                                      view)
                except Exception:                                 # noqa: BLE001 - the cache is an optimisation
                    log.exception("prefix-cache snapshot of %s failed", g.id)
        self.pool.free(key)

    def free(self, g: Group) -> None:
        for i in range(g.request.n):
            self.pool.free(g.key(i))
