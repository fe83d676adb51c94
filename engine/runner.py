"""The model calls of one engine step: prompt chunks (alone or batched by length) and the batched decode, on rows
of the state pool. The only place where a plan meets tensors."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.prefix_cache import PrefixCache
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
    def __init__(self, model, pool: StatePool, cache: PrefixCache, *, snapshot_every: int):
        self.model = model
        self.pool = pool
        self.cache = cache
        self.snapshot_every = snapshot_every

    def begin(self, g: Group) -> int:
        """Admitted: take a state row and resume from the longest cached prefix (unless prompt logprobs are
        wanted, which need every position's logits); returns the prompt tokens already in the state."""
        self.pool.alloc(g.key(0))
        if g.params.prompt_logprobs is not None:
            g.prompt_logprobs = [None]
            return 0
        cached, state = self.cache.lookup(g.request.prompt_tokens)
        if state is not None:
            self.pool.load(g.key(0), state)
            g.cached = cached
        return cached

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
            if self.cache.enabled and (end == len(prompt) or end % self.snapshot_every == 0):
                self.cache.insert(prompt[:end], self.pool.view(g.key(0)))
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

    def release(self, g: Group, s: Sequence, snapshot: bool) -> None:
        """A sequence finished: snapshot its conversation state for the next turn, free its row."""
        key = g.key(s.index)
        if snapshot and self.cache.enabled and len(s.tokens) > 1:
            try:
                self.cache.insert(g.request.prompt_tokens + s.tokens[:-1], self.pool.view(key))
            except Exception:                                     # noqa: BLE001 - the cache is an optimisation
                log.exception("prefix-cache snapshot of %s failed", g.id)
        self.pool.free(key)

    def free(self, g: Group) -> None:
        for i in range(g.request.n):
            self.pool.free(g.key(i))
