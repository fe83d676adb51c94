"""One sequence's position in its grammar: which tokens may come next, accept the sampled one, has it ended."""
from __future__ import annotations

import llguidance
import torch

from engine.errors import RequestFailed
from engine.structured.vocab import GrammarVocab


def first_line(message: str, limit: int = 300) -> str:
    line = message.strip().split("\n", 1)[0]
    return line if len(line) <= limit else line[:limit] + "…"


class Matcher:
    """A grammar state for one sequence (not thread-safe: one sequence, one thread at a time).

    The engine asks MaskFiller for the next-token mask of a batch of matchers, samples, then calls ``accept``
    with each constrained row's token. ``is_finished`` is True once the grammar can take nothing more (the
    engine ends the sequence with "stop" without sampling again); end-of-text is allowed by the mask exactly
    when ``can_end``. A token the grammar rejects raises RequestFailed: it means the mask was not applied.
    """

    __slots__ = ("_m", "vocab", "tokens")

    def __init__(self, ll_matcher: llguidance.LLMatcher, vocab: GrammarVocab):
        self._m = ll_matcher
        self.vocab = vocab
        self.tokens = 0
        """Tokens accepted so far."""

    @property
    def ll(self) -> llguidance.LLMatcher:
        """The llguidance matcher (for MaskFiller)."""
        return self._m

    def accept(self, token_id: int) -> None:
        """Advance past a sampled token; RequestFailed if the grammar does not allow it (never silently)."""
        if not self._m.consume_token(token_id):
            raise RequestFailed(f"token {token_id} breaks the output's grammar (was the mask applied?): "
                                f"{first_line(self._m.get_error()) or 'rejected'}")
        self.tokens += 1

    @property
    def is_finished(self) -> bool:
        """The grammar has ended: only end-of-text may follow, so the sequence is complete."""
        return self._m.is_stopped() and not self._m.is_error()

    @property
    def can_end(self) -> bool:
        """The output so far is complete under the grammar (end-of-text is allowed now)."""
        return self._m.is_accepting()

    @property
    def error(self) -> str | None:
        """Why the grammar failed (a work limit hit while computing a mask, a rejected token), or None."""
        return first_line(self._m.get_error()) if self._m.is_error() else None

    @property
    def end_token_ids(self) -> tuple[int, ...]:
        """The tokens that end a constrained output where the grammar allows it."""
        return (self.vocab.eot_id,)

    def clone(self) -> Matcher:
        """An independent copy at the same position (for n > 1 forks); the compiled grammar is shared."""
        out = Matcher(self._m.deep_copy(), self.vocab)
        out.tokens = self.tokens
        return out

    def allowed_token_ids(self) -> list[int]:
        """Every id the grammar allows next (computes a mask; for tests and debugging, not the hot path)."""
        bits = torch.frombuffer(bytearray(self._m.compute_bitmask()), dtype=torch.uint8)
        flags = (bits.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1      # [bytes, 8], bit i = id 8b+i
        return flags.flatten().nonzero().flatten().tolist()
