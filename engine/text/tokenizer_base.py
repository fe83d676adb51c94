"""The interface every tokenizer implements (Tokenizer) and the incremental detokenizer behind it (StreamDecoder).

Everything is bytes underneath: ``decode_bytes(ids) == b"".join(id_to_token_bytes(i) for i in ids)`` always holds.
"""
from __future__ import annotations

import abc
import codecs
from collections.abc import Callable, Iterable

__all__ = ["Tokenizer", "StreamDecoder", "VOCAB_PAD", "padded_vocab_size", "scrub_surrogates"]

VOCAB_PAD = 64  # id spaces are padded to a multiple of this, like RWKV checkpoints (65530 -> 65536, 50277 -> 50304)


def padded_vocab_size(n: int) -> int:
    return -(-n // VOCAB_PAD) * VOCAB_PAD


def scrub_surrogates(text: str) -> str:
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


class Tokenizer(abc.ABC):
    """Text <-> token ids. Subclasses set name, vocab_size, eot_id, eot_text, special_ids and implement the bytes API."""

    name: str
    vocab_size: int              # size of the id space (padded); valid ids are 0 <= id < vocab_size
    eot_id: int                  # end-of-text / document separator id
    eot_text: str                # encode(eot_text, allow_special=True) == [eot_id]
    special_ids: frozenset[int]  # control ids; they decode to b""

    @abc.abstractmethod
    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of text. Special-token strings are plain text unless allow_special is True."""

    _table: list[bytes]          # id -> raw bytes, filled by each subclass

    def id_to_token_bytes(self, token_id: int) -> bytes:
        """Raw bytes that token_id contributes to decoded text (b"" for special and padding ids)."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is out of range [0, {self.vocab_size})")
        return self._table[token_id]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Concatenated token bytes; raises ValueError naming the first out-of-range id."""
        table = self._table
        return b"".join([table[i] for i in _check_ids(ids, self.vocab_size)])

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids; invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        """A fresh incremental decoder for one generation stream."""
        return StreamDecoder(self.id_to_token_bytes)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} vocab_size={self.vocab_size} eot_id={self.eot_id}>"


def _check_ids(ids: Iterable[int], size: int) -> list[int] | tuple[int, ...]:
    """ids as a sequence, all in [0, size); raises ValueError naming the first bad id and its position."""
    seq = ids if isinstance(ids, (list, tuple)) else list(ids)
    if seq and (min(seq) < 0 or max(seq) >= size):
        pos, bad = next((p, i) for p, i in enumerate(seq) if not 0 <= i < size)
        raise ValueError(f"token id {bad} at position {pos} is out of range [0, {size})")
    return seq


# Second-byte ranges of UTF-8 lead bytes whose continuation is restricted (RFC 3629); others take 0x80..0xBF.
_SECOND_BYTE = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}


def _dead_prefix(pending: bytes) -> bool:
    """True if pending (a held, incomplete UTF-8 sequence) can never complete to a valid character."""
    if len(pending) < 2:
        return False
    lo, hi = _SECOND_BYTE.get(pending[0], (0x80, 0xBF))
    return not lo <= pending[1] <= hi


class StreamDecoder:
    """Incremental detokenizer for one stream: O(1) amortized per token, never emits a partial UTF-8 character.

    Invariant: "".join(feed(i) for i in ids) + flush() == tokenizer.decode(ids), for any ids (valid UTF-8 or not).
    At most 3 bytes are ever held back; a sequence that can never become valid is emitted as U+FFFD at once.
    """

    __slots__ = ("_token_bytes", "_utf8")

    def __init__(self, token_bytes: Callable[[int], bytes]):
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        """Text completed by token_id (may be "")."""
        text = self._utf8.decode(self._token_bytes(token_id))
        pending = self._utf8.getstate()[0]
        if pending and _dead_prefix(pending):  # CPython holds e.g. b"\xed\xa0" (a surrogate) until the next byte
            text += self._utf8.decode(b"", final=True)
        return text

    def flush(self) -> str:
        """Whatever is held back, with U+FFFD for an incomplete trailing character; the decoder is reset."""
        return self._utf8.decode(b"", final=True)

    @property
    def pending_bytes(self) -> bytes:
        """Bytes held back waiting for the rest of a character (0..3 bytes)."""
        return self._utf8.getstate()[0]
