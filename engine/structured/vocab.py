"""The grammar engine's view of a tokenizer: every token's bytes and the end-of-text id, built once and cached.

llguidance walks a trie of all token byte strings to compute masks, so it needs the raw bytes of every id (our
``Tokenizer.id_to_token_bytes``) and an encode function (for text the grammar forces). Ids with no bytes (end-of-text,
other control ids, padding) are never allowed by a mask, except end-of-text where the grammar may end. Building the
trie of a 65536-token vocabulary takes ~0.2 s, so one is kept per (tokenizer, vocabulary size).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import llguidance

from engine.text.tokenizer import Tokenizer, WorldTokenizer

_lock = threading.Lock()
_cache: dict[Tokenizer, dict[int, GrammarVocab]] = {}   # by identity; a process serves one or two tokenizers


@dataclass(frozen=True)
class GrammarVocab:
    """An llguidance tokenizer over ``vocab_size`` ids: the engine tokenizer's ids, then b"" padding up to the
    model's vocabulary (ids the model can emit but the tokenizer never produces, always masked)."""
    tokenizer: Tokenizer
    vocab_size: int
    eot_id: int
    ll: llguidance.LLTokenizer


class _Wrapped:
    """The duck-typed object llguidance.TokenizerWrapper reads: token bytes, end-of-text id, an encode callable."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        n = tokenizer.vocab_size
        self.tokens = [tokenizer.id_to_token_bytes(i) for i in range(n)] + [b""] * (vocab_size - n)
        self.eos_token_id = tokenizer.eot_id
        self.bos_token_id = None
        self.special_token_ids = sorted(tokenizer.special_ids)
        self._tokenizer = tokenizer

    def __call__(self, text: str | bytes) -> list[int]:
        tok = self._tokenizer
        if isinstance(text, bytes):
            if isinstance(tok, WorldTokenizer):
                return tok.encode_bytes(text)            # exact for any bytes, like the World tokenizer itself
            text = text.decode("utf-8", errors="replace")
        return tok.encode(text)


def grammar_vocab(tokenizer: Tokenizer, vocab_size: int | None = None) -> GrammarVocab:
    """The cached grammar vocabulary of ``tokenizer`` for a model with ``vocab_size`` logits (default: the
    tokenizer's own size; never less than it). Thread-safe; built at most once per pair."""
    size = max(tokenizer.vocab_size, vocab_size or 0)
    with _lock:
        per = _cache.setdefault(tokenizer, {})
        found = per.get(size)
        if found is None:
            ll = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrapped(tokenizer, size)))
            found = per[size] = GrammarVocab(tokenizer, size, tokenizer.eot_id, ll)
    return found
