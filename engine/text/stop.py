"""Stop strings matched on decoded text: release what is safe, hold back a possible partial match."""
from __future__ import annotations

from engine.text.tokenizer_base import StreamDecoder


class TextStream:
    """Turns one sequence's tokens into text deltas, cut before the first stop string.

    ``push(token)`` returns (text safe to release now, stopped). Text that could still be the beginning of
    a stop string is held back until the next tokens decide it; ``finish()`` releases whatever is held.
    """

    def __init__(self, decoder: StreamDecoder, stop: tuple[str, ...]):
        self._decoder = decoder
        self._stop = tuple(s for s in stop if s)
        self._held = ""
        self.stopped = False

    def push(self, token_id: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        text = self._held + self._decoder.feed(token_id)
        if not self._stop:
            self._held = ""
            return text, False
        cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            self.stopped = True
            return text[:cut], True
        keep = self._partial_suffix(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], False

    def finish(self) -> str:
        """Release the held-back text and any bytes still pending in the decoder (end of the sequence)."""
        if self.stopped:
            return ""
        text = self._held + self._decoder.flush()
        self._held = ""
        cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return text[:cut]
        return text

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
