"""The RWKV World tokenizer: the rwkv_vocab_*.txt reader, greedy longest match through a byte trie, and the
pyrwkv_tokenizer fast path for encoding."""
from __future__ import annotations

import ast
import os
from collections.abc import Callable
from pathlib import Path

from engine.errors import ModelLoadError
from engine.text.tokenizer_base import Tokenizer, padded_vocab_size, scrub_surrogates

__all__ = ["WorldTokenizer", "WORLD_VOCAB_PATH", "WORLD_EOT_TEXT", "read_world_vocab"]

WORLD_VOCAB_PATH = Path(__file__).resolve().parent / "data" / "rwkv_vocab_v20230424.txt"
WORLD_EOT_TEXT = "<|rwkv_tokenizer_end_of_text|>"


def _utf8(text: str) -> bytes:
    """UTF-8 bytes of text; lone surrogates (possible from JSON "\\ud800") become U+FFFD, valid pairs are joined."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return scrub_surrogates(text).encode("utf-8")


def _parse_literal(lit: str) -> str | bytes:
    """Value of a Python str/bytes literal from the vocab file, without eval."""
    q = lit[:1]
    if q in ("'", '"') and len(lit) >= 2 and lit[-1] == q and "\\" not in lit and q not in lit[1:-1]:
        return lit[1:-1]  # plain quoted text: the common case, ~3x faster than literal_eval
    return ast.literal_eval(lit)


def read_world_vocab(path: str | os.PathLike) -> dict[int, bytes]:
    """{id: token bytes} from an rwkv_vocab_*.txt file (lines "<id> <str or bytes literal> <byte length>").

    Raises ModelLoadError (a ValueError) naming the file and line on any malformed line, a reserved or duplicate
    id, a duplicate token, or a missing single-byte token (every byte must be encodable).
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ModelLoadError(f"cannot read World vocab {path}: {e}") from e
    except UnicodeDecodeError as e:
        raise ModelLoadError(f"World vocab {path} is not UTF-8 text: {e}") from e
    vocab: dict[int, bytes] = {}
    seen: dict[bytes, int] = {}
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): literals may hold \x1c, \u2028 ...
        line = line.rstrip("\r")
        if not line.strip():
            continue
        try:
            tid, tok = _parse_vocab_line(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
            raise ModelLoadError(f"{path}:{lineno}: corrupt vocab line {line[:80]!r}: {e}") from None
        if tid in vocab:
            raise ModelLoadError(f"{path}:{lineno}: duplicate token id {tid}")
        if tok in seen:
            raise ModelLoadError(f"{path}:{lineno}: token {tok!r} already has id {seen[tok]}")
        vocab[tid] = tok
        seen[tok] = tid
    missing = [b for b in range(256) if bytes([b]) not in seen]
    if missing:
        raise ModelLoadError(f"World vocab {path} lacks single-byte tokens for {len(missing)} bytes "
                             f"(first: 0x{missing[0]:02x}); every byte must be encodable")
    return vocab


def _parse_vocab_line(line: str) -> tuple[int, bytes]:
    first, last = line.find(" "), line.rfind(" ")
    if first <= 0 or last <= first:
        raise ValueError("expected '<id> <literal> <byte length>'")
    tid, length = int(line[:first]), int(line[last + 1:])
    value = _parse_literal(line[first + 1:last])
    if isinstance(value, str):
        value = value.encode("utf-8")
    elif not isinstance(value, bytes):
        raise ValueError(f"literal is {type(value).__name__}, not str or bytes")
    if len(value) != length:
        raise ValueError(f"token is {len(value)} bytes but the line says {length}")
    if tid < 1:
        raise ValueError(f"id {tid} is reserved (0 = end-of-text) or negative")
    if not value:
        raise ValueError("empty token")
    return tid, value


_BEST = 256  # trie-node key holding (id, length) of the longest token that is a prefix of this node's path


def _build_trie(vocab: dict[int, bytes]) -> dict:
    """Nested dicts: node[byte] -> child node; node[_BEST] = (id, byte length) of the longest token ending at or
    above the node (on its root path). Every non-root node has _BEST because all 256 single bytes are tokens."""
    root: dict = {}
    for tid, tok in vocab.items():
        node = root
        for b in tok:
            node = node.setdefault(b, {})
        node[_BEST] = (tid, len(tok))
    stack = [(child, None) for child in root.values()]
    while stack:  # push each node's best down to descendants that are not tokens themselves
        node, best = stack.pop()
        best = node.setdefault(_BEST, best)
        stack.extend((child, best) for key, child in node.items() if key != _BEST)
    return root


def _trie_encode(root: dict, data: bytes, max_len: int) -> list[int]:
    """Greedy longest match: walk the trie as deep as data allows, emit the best token seen, restart after it."""
    out: list[int] = []
    append = out.append
    i, n = 0, len(data)
    while i < n:
        node = root
        for b in data[i:i + max_len]:  # no token is longer than max_len, so the slice bounds the walk
            child = node.get(b)
            if child is None:
                break
            node = child
        tid, length = node[256]  # = node[_BEST]; a literal, not a global lookup, in this hot loop
        append(tid)
        i += length
    return out


def _load_fast_encoder(path: Path, vocab: dict[int, bytes]) -> Callable[[str], list[int]] | None:
    """pyrwkv_tokenizer's compiled encoder for this vocab file, or None when it is missing or disagrees.

    Policy: use it when importable, it loads the same file, and its str vocabulary equals ours (its get_vocab()
    omits the 486 bytes-literal tokens, so the count of those is checked instead). The test suite proves
    identical ids against the reference tokenizer on a multilingual corpus. It is used for encode only: its
    decode panics on invalid UTF-8 and maps id 0 to "\\x00".
    """
    try:
        import pyrwkv_tokenizer
        fast = pyrwkv_tokenizer.WorldTokenizer(str(path))
        theirs = fast.get_vocab()
    except BaseException as e:  # ImportError, or a file the Rust parser rejects (a pyo3 panic is a BaseException)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return None
    ours: dict[str, int] = {}
    for tid, tok in vocab.items():
        try:
            ours[tok.decode("utf-8")] = tid
        except UnicodeDecodeError:
            pass
    mismatched = {k for k, v in theirs.items() if ours.get(k) != v}  # pyrwkv 0.9.1: one "Binary string" stand-in
    if len(mismatched) > 1 or len(theirs) - len(mismatched) != len(ours) or fast.vocab_size() != max(vocab) + 1:
        return None
    return fast.encode


class WorldTokenizer(Tokenizer):
    """RWKV World tokenizer: UTF-8 bytes, greedy longest match through a byte trie, no normalization.

    Id 0 is end-of-text (decodes to b""); ids past the file's last id up to vocab_size (65530..65535) are unused
    and decode to b"". fast=True uses pyrwkv_tokenizer for encode when it is installed and agrees (see
    _load_fast_encoder); self.fast says whether it is in use. The pure-Python trie is built on first need.
    """

    def __init__(self, vocab_path: str | os.PathLike | None = None, fast: bool = True, vocab_size: int | None = None):
        path = Path(vocab_path) if vocab_path is not None else WORLD_VOCAB_PATH
        vocab = read_world_vocab(path)
        n_ids = max(vocab) + 1
        self.vocab_size = vocab_size if vocab_size is not None else padded_vocab_size(n_ids)
        if self.vocab_size < n_ids:
            raise ModelLoadError(f"vocab_size {self.vocab_size} is smaller than the ids in {path} (max {n_ids - 1})")
        self.name = "world" if path.resolve() == WORLD_VOCAB_PATH else f"world:{path}"
        self.path = path
        self.eot_id = 0
        self.eot_text = WORLD_EOT_TEXT
        self.special_ids = frozenset({0})
        table = [b""] * self.vocab_size  # id -> bytes; 0 and unused ids stay b""
        for tid, tok in vocab.items():
            table[tid] = tok
        self._table = table
        self._max_len = max(map(len, vocab.values()))
        self._vocab = vocab
        self._trie: dict | None = None
        self._fast = _load_fast_encoder(path, vocab) if fast else None
        self.fast = self._fast is not None

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if not allow_special or self.eot_text not in text:
            return self._encode_plain(text)
        out: list[int] = []
        for k, piece in enumerate(text.split(self.eot_text)):
            if k:
                out.append(self.eot_id)
            out += self._encode_plain(piece)
        return out

    def _encode_plain(self, text: str) -> list[int]:
        if self._fast is not None:
            try:
                return self._fast(text)
            except UnicodeEncodeError:  # lone surrogates
                return self._fast(scrub_surrogates(text))
        return self.encode_bytes(_utf8(text))

    def encode_bytes(self, data: bytes) -> list[int]:
        """Greedy longest-match ids of raw bytes with the pure-Python trie (any bytes, not only UTF-8)."""
        if self._trie is None:
            self._trie = _build_trie(self._vocab)
        return _trie_encode(self._trie, data, self._max_len)
