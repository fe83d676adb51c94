"""A Hugging Face ``tokenizer.json`` behind the Tokenizer interface (the `tokenizers` library encodes), decoding
through per-token raw bytes."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from engine.errors import ModelLoadError
from engine.text.tokenizer_base import Tokenizer, padded_vocab_size, scrub_surrogates

__all__ = ["HFTokenizer", "HF_EOT_CANDIDATES", "component_types"]

HF_EOT_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<|end|>")


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
        self.vocab_size = vocab_size if vocab_size is not None else padded_vocab_size(n_ids)
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
            return tok.encode(scrub_surrogates(text), add_special_tokens=False).ids

    def _special_tokenizer(self):
        """A second instance that parses special tokens (a flag flip on the shared one would race across threads)."""
        if self._tok_special is None:
            from tokenizers import Tokenizer as _HF

            tok = _HF.from_str(self._raw)
            tok.encode_special_tokens = False
            self._tok_special = tok
        return self._tok_special
