"""Names of token prefixes: a cryptographic hash chain that a conversation can carry forward turn by turn.

A state after N tokens is stored under the digest of those N tokens. The digest must be computable from the
state's own description (a TokenPrefix: length, the chain over full blocks, the tokens of the open block), so a
turn that continues a stored state needs only its new tokens to name every later prefix, and a client that sends
the whole history computes the same names from scratch. BLAKE2b, so nobody can craft tokens whose prefix is named
like another conversation's (which would hand them its state).

    chain_0 = SEED;  chain_{j+1} = H(chain_j || block_j)           (blocks of BLOCK tokens, u32 little-endian)
    digest(N) = H(chain_{N // BLOCK} || N as u64 || tokens of the open block)
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from engine.model.state import RNNState

BLOCK = 64
_SIZE = 16
SEED = hashlib.blake2b(b"goose token prefix v1", digest_size=_SIZE).digest()


def _bytes(tokens) -> bytes:
    return np.asarray(tokens, dtype="<u4").tobytes()


def _digest(chain: bytes, length: int, tail: bytes) -> str:
    return hashlib.blake2b(chain + length.to_bytes(8, "little") + tail, digest_size=_SIZE).hexdigest()


@dataclass(frozen=True)
class TokenPrefix:
    """What a conversation state covers: ``length`` tokens, named by the chain over their full blocks and the
    tokens of the open block (fewer than BLOCK)."""
    length: int = 0
    chain: bytes = SEED
    tail: tuple[int, ...] = ()

    def __post_init__(self):
        if self.length < 0 or len(self.tail) >= BLOCK or (self.length - len(self.tail)) % BLOCK:
            raise ValueError(f"inconsistent TokenPrefix: length {self.length} with {len(self.tail)} open tokens")
        if len(self.chain) != _SIZE:
            raise ValueError(f"TokenPrefix.chain must be {_SIZE} bytes")

    @property
    def digest(self) -> str:
        """32 hex digits naming exactly these tokens."""
        return _digest(self.chain, self.length, _bytes(self.tail))

    def extend(self, tokens: list[int]) -> TokenPrefix:
        return PrefixHashes(self, tokens).prefix(len(tokens))

    def to_json(self) -> dict:
        return {"length": self.length, "chain": self.chain.hex(), "tail": list(self.tail)}

    @classmethod
    def from_json(cls, data: dict) -> TokenPrefix:
        """The inverse of to_json; ValueError when the data is not one."""
        try:
            return cls(int(data["length"]), bytes.fromhex(data["chain"]), tuple(int(t) for t in data["tail"]))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a TokenPrefix: {exc}") from None


class PrefixHashes:
    """Digests of ``start`` extended by each prefix of ``tokens``: the chain over the full blocks is computed once
    (one hash per BLOCK tokens); a digest then costs one hash of at most BLOCK tokens."""

    def __init__(self, start: TokenPrefix, tokens: list[int]):
        self.start = start
        self.tokens = tokens
        self._seq = np.asarray(list(start.tail) + list(tokens), dtype="<u4")   # from the start of the open block
        raw = self._seq.tobytes()
        chains = [start.chain]
        for j in range(len(self._seq) // BLOCK):
            chains.append(hashlib.blake2b(chains[-1] + raw[j * BLOCK * 4:(j + 1) * BLOCK * 4],
                                          digest_size=_SIZE).digest())
        self._chains = chains

    def _split(self, n: int) -> tuple[int, int]:
        if not 0 <= n <= len(self.tokens):
            raise IndexError(f"prefix length {n} outside 0..{len(self.tokens)}")
        k = len(self.start.tail) + n
        return k // BLOCK, k

    def digest(self, n: int) -> str:
        """The digest of start + tokens[:n]."""
        j, k = self._split(n)
        return _digest(self._chains[j], self.start.length + n, self._seq[j * BLOCK:k].tobytes())

    def prefix(self, n: int) -> TokenPrefix:
        """start + tokens[:n] as a TokenPrefix (to carry forward)."""
        j, k = self._split(n)
        return TokenPrefix(self.start.length + n, self._chains[j], tuple(int(t) for t in self._seq[j * BLOCK:k]))


@dataclass
class ConvState:
    """A conversation's RNN state: after ``prefix`` tokens run from the initial state named ``initial``
    ("" = the zero state). A batch of one, fp32, on the CPU."""
    state: RNNState
    prefix: TokenPrefix = field(default_factory=TokenPrefix)
    initial: str = ""
