"""Tokenizers behind one interface: the RWKV World greedy byte-trie tokenizer and Hugging Face ``tokenizer.json``.

Everything is bytes underneath: ``decode_bytes(ids) == b"".join(id_to_token_bytes(i) for i in ids)`` always holds.
"""
from __future__ import annotations

import abc
import ast
import codecs
import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from engine.errors import ModelLoadError

__all__ = [
    "Tokenizer", "StreamDecoder", "WorldTokenizer", "HFTokenizer", "load_tokenizer",
    "WORLD_VOCAB_PATH", "WORLD_EOT_TEXT", "read_world_vocab",
]

WORLD_VOCAB_PATH = Path(__file__).resolve().parent / "data" / "rwkv_vocab_v20230424.txt"
WORLD_EOT_TEXT = "<|rwkv_tokenizer_end_of_text|>"
VOCAB_PAD = 64  # id spaces are padded to a multiple of this, like RWKV checkpoints (65530 -> 65536, 50277 -> 50304)
HF_EOT_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<|end|>")


def _padded(n: int) -> int:
    return -(-n // VOCAB_PAD) * VOCAB_PAD


def _utf8(text: str) -> bytes:
    """UTF-8 bytes of text; lone surrogates (possible from JSON "\\ud800") become U+FFFD, valid pairs are joined."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _scrub_surrogates(text).encode("utf-8")


def _scrub_surrogates(text: str) -> str:
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


# --------------------------------------------------------------------------------------------------------------------
# Interface
# --------------------------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------------------------
# RWKV World
# --------------------------------------------------------------------------------------------------------------------

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
        self.vocab_size = vocab_size if vocab_size is not None else _padded(n_ids)
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
                return self._fast(_scrub_surrogates(text))
        return self.encode_bytes(_utf8(text))

    def encode_bytes(self, data: bytes) -> list[int]:
        """Greedy longest-match ids of raw bytes with the pure-Python trie (any bytes, not only UTF-8)."""
        if self._trie is None:
            self._trie = _build_trie(self._vocab)
        return _trie_encode(self._trie, data, self._max_len)


# --------------------------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json
# --------------------------------------------------------------------------------------------------------------------

def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2 byte-level BPE: printable Latin-1 bytes stand for themselves, the other 68 map to U+0100.. in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    char_to_byte = {chr(b): b for b in keep}
    extra = 0
    for b in range(256):
        if b not in keep:
            char_to_byte[chr(256 + extra)] = b
            extra += 1
    return char_to_byte


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def component_types(node) -> set[str]:
    """All "type" names in a tokenizer.json component (decoders/pre-tokenizers nest in Sequence)."""
    if isinstance(node, dict):
        found = {node["type"]} if isinstance(node.get("type"), str) else set()
        for value in node.values():
            found |= component_types(value)
        return found
    if isinstance(node, list):
        return set().union(*map(component_types, node)) if node else set()
    return set()


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json via the `tokenizers` library; no special tokens are added on encode.

    Decoding goes through per-token raw bytes: the byte-level alphabet for byte-level BPE (so partial UTF-8 streams
    correctly), "<0xNN>" byte-fallback tokens, and "▁" -> " " for Metaspace (keeping the leading space HF's decode
    strips at the start of a sequence); added tokens decode to their content,
    special ones to b"" (like HF's skip_special_tokens). eot_id is the eot_token argument, else tokenizer_config.json's
    eos_token next to the file, else the first of HF_EOT_CANDIDATES present.
    """

    def __init__(self, path: str | os.PathLike, eot_token: str | None = None, vocab_size: int | None = None):
        from tokenizers import Tokenizer as _HF

        self.path = Path(path)
        try:
            raw = self.path.read_text(encoding="utf-8")
            spec = json.loads(raw)
            self._tok = _HF.from_str(raw)
        except Exception as e:  # OSError, JSON errors, and the tokenizers library's plain Exception
            raise ModelLoadError(f"cannot load Hugging Face tokenizer {self.path}: {e}") from e
        self._raw = raw
        self._tok.encode_special_tokens = True  # default encode treats "<|endoftext|>" etc. as text
        self._tok_special: _HF | None = None
        self.name = f"hf:{self.path}"
        n_ids = self._tok.get_vocab_size(with_added_tokens=True)
        self.vocab_size = vocab_size if vocab_size is not None else _padded(n_ids)
        added = self._tok.get_added_tokens_decoder()  # {id: AddedToken}
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        self._table = self._token_table(spec, added, n_ids)
        self.eot_id, self.eot_text = self._find_eot(eot_token)

    def _token_table(self, spec: dict, added: dict, n_ids: int) -> list[bytes]:
        """id -> raw bytes for all vocab_size ids (padding and special ids -> b"")."""
        types = component_types(spec.get("decoder")) | component_types(spec.get("pre_tokenizer"))
        byte_level = "ByteLevel" in types
        byte_fallback = "ByteFallback" in types
        metaspace = "Metaspace" in types or "▁" in json.dumps(spec.get("decoder"), ensure_ascii=False)
        alphabet = _byte_level_alphabet()
        table = [b""] * self.vocab_size
        for i in range(n_ids):
            if i in added:
                table[i] = b"" if added[i].special else added[i].content.encode("utf-8")
                continue
            token = self._tok.id_to_token(i)
            if token is None:
                continue
            if byte_level:
                table[i] = bytes(alphabet[c] for c in token) if all(c in alphabet for c in token) \
                    else token.encode("utf-8")
            elif byte_fallback and (m := _BYTE_FALLBACK.fullmatch(token)):
                table[i] = bytes([int(m.group(1), 16)])
            else:
                table[i] = (token.replace("▁", " ") if metaspace else token).encode("utf-8")
        return table

    def _find_eot(self, eot_token: str | None) -> tuple[int, str]:
        candidates = [eot_token] if eot_token is not None else [*self._config_eos(), *HF_EOT_CANDIDATES]
        for text in candidates:
            tid = self._tok.token_to_id(text)
            if tid is not None:
                return tid, text
        raise ModelLoadError(f"Hugging Face tokenizer {self.path}: no end-of-text token among {candidates}; "
                             f"pass eot_token=")

    def _config_eos(self) -> list[str]:
        """eos_token from a tokenizer_config.json beside the tokenizer file, if any."""
        try:
            eos = json.loads((self.path.parent / "tokenizer_config.json").read_text(encoding="utf-8")).get("eos_token")
        except (OSError, ValueError, AttributeError):
            return []
        eos = eos.get("content") if isinstance(eos, dict) else eos
        return [eos] if isinstance(eos, str) else []

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        tok = self._special_tokenizer() if allow_special else self._tok
        try:
            return tok.encode(text, add_special_tokens=False).ids
        except Exception:  # lone surrogates cannot cross into Rust
            return tok.encode(_scrub_surrogates(text), add_special_tokens=False).ids

    def _special_tokenizer(self):
        """A second instance that parses special tokens (a flag flip on the shared one would race across threads)."""
        if self._tok_special is None:
            from tokenizers import Tokenizer as _HF

            tok = _HF.from_str(self._raw)
            tok.encode_special_tokens = False
            self._tok_special = tok
        return self._tok_special


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------

_ACCEPTED = ("'world', a Hugging Face tokenizer.json (any *.json), an rwkv_vocab_*.txt file, "
             "or a directory containing rwkv_vocab_v20230424.txt or tokenizer.json")


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """Tokenizer from a spec: "world" (shipped World vocab), a tokenizer.json, an rwkv_vocab_*.txt, or a directory
    holding rwkv_vocab_v20230424.txt (preferred) or tokenizer.json. Raises ModelLoadError (a ValueError) otherwise."""
    if isinstance(spec, str) and spec.strip().lower() == "world":
        return WorldTokenizer()
    path = Path(spec)
    if path.is_dir():
        for name, cls in (("rwkv_vocab_v20230424.txt", WorldTokenizer), ("tokenizer.json", HFTokenizer)):
            if (path / name).is_file():
                return cls(path / name)
        raise ModelLoadError(f"tokenizer spec {str(spec)!r}: directory has neither rwkv_vocab_v20230424.txt nor "
                             f"tokenizer.json; expected {_ACCEPTED}")
    if path.is_file():
        if path.suffix == ".json":
            return HFTokenizer(path)
        if path.name.startswith("rwkv_vocab_") and path.suffix == ".txt":
            return WorldTokenizer(path)
        raise ModelLoadError(f"tokenizer spec {str(spec)!r}: unrecognized file name; expected {_ACCEPTED}")
    raise ModelLoadError(f"tokenizer spec {str(spec)!r}: no such file or directory; expected {_ACCEPTED}")
