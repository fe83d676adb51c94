"""Specs -> compiled grammars with bounded work, cached; errors in plain words naming the request field.

Compiling is CPU work meant for a worker thread: llguidance drops the GIL while it builds a grammar and its first
mask, the cache is guarded by a lock held only for dictionary operations, and two threads compiling the same new
spec at once both succeed (one result is kept).
"""
from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import llguidance

from engine.errors import InvalidRequest
from engine.structured.lark import grammar_text
from engine.structured.matcher import Matcher, first_line
from engine.structured.spec import Choice, Constraint, Grammar, JsonObject, JsonSchema, Regex, ToolCalls
from engine.structured.vocab import GrammarVocab, grammar_vocab
from engine.text.tokenizer import Tokenizer


@dataclass(frozen=True)
class GrammarLimits:
    """Bounds on grammar work (llguidance's LLParserLimits; its defaults). Compiling stops with an error past the
    first four; a mask step past the last two fails that one sequence."""
    max_grammar_size: int = 500_000
    """Symbols in the grammar's productions."""
    initial_lexer_fuel: int = 1_000_000
    """Work building the lexer's regexes (~50k per ms)."""
    max_lexer_states: int = 250_000
    """Lexer states (1-2 kB each)."""
    max_items_in_row: int = 2_000
    """Earley items in one row (the grammar's ambiguity)."""
    step_lexer_fuel: int = 200_000
    """Lexer work per mask (~14k per ms)."""
    step_max_items: int = 50_000
    """Earley items per mask (~20k per ms)."""

    def ll(self) -> llguidance.LLParserLimits:
        return llguidance.LLParserLimits(
            max_items_in_row=self.max_items_in_row, initial_lexer_fuel=self.initial_lexer_fuel,
            step_lexer_fuel=self.step_lexer_fuel, step_max_items=self.step_max_items,
            max_lexer_states=self.max_lexer_states, max_grammar_size=self.max_grammar_size,
            verbose_errors=False)      # no grammar dumps in errors or logs


class CompiledGrammar:
    """A spec compiled against one vocabulary; ``matcher()`` starts a sequence at its beginning (cheap: the
    grammar, its lexer and the first mask's work are shared with every matcher)."""

    def __init__(self, spec: Constraint, template: llguidance.LLMatcher, vocab: GrammarVocab):
        self.spec = spec
        self.vocab = vocab
        self._template = template
        self._lock = threading.Lock()

    def matcher(self) -> Matcher:
        with self._lock:                         # one borrow of the template at a time
            return Matcher(self._template.deep_copy(), self.vocab)


class GrammarCompiler:
    """Compiles specs for one tokenizer and model vocabulary (build one per engine; its vocabulary is cached per
    tokenizer). ``compile`` is thread-safe and keeps the last ``cache_size`` grammars."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int | None = None, *, cache_size: int = 64,
                 limits: GrammarLimits = GrammarLimits()):
        self.vocab = grammar_vocab(tokenizer, vocab_size)
        self.limits = limits
        self._ll_limits = limits.ll()
        self._cache: OrderedDict[Constraint, CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @property
    def vocab_size(self) -> int:
        """Width of the masks (the model's logits, or the tokenizer's ids if more)."""
        return self.vocab.vocab_size

    def compile(self, spec: Constraint) -> CompiledGrammar:
        """The compiled grammar of ``spec``; InvalidRequest(param=spec's field) when it is unusable."""
        with self._lock:
            found = self._cache.get(spec)
            if found is not None:
                self._cache.move_to_end(spec)
                return found
        compiled = self._compile(spec)
        with self._lock:
            self._cache[spec] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: Constraint) -> CompiledGrammar:
        try:
            text = grammar_text(spec)
        except ValueError as e:                   # bad JSON text, or GBNF that cannot be converted
            raise InvalidRequest(_explain(spec, str(e)), param=spec.param) from None
        matcher = llguidance.LLMatcher(self.vocab.ll, text, log_level=0, limits=self._ll_limits)
        if not matcher.is_error():
            matcher.compute_bitmask()             # builds the lexer states of the start, shared by every copy
        if matcher.is_error():
            raise self._culprit(spec) or InvalidRequest(_explain(spec, matcher.get_error()), param=spec.param)
        return CompiledGrammar(spec, matcher, self.vocab)

    def _culprit(self, spec: Constraint) -> InvalidRequest | None:
        """For a tool-call grammar that failed: the error of the first part that fails alone (a tool's parameters
        or the answer's schema), so the error names that field; None when only the whole is too much."""
        if not isinstance(spec, ToolCalls):
            return None
        parts = [JsonSchema(t.parameters, t.param) for t in spec.tools]
        if isinstance(spec.answer, JsonSchema):
            parts.append(spec.answer)
        for part in parts:
            failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
                grammar_text(part), self.vocab.ll, limits=self._ll_limits)
            if failed:
                return InvalidRequest(_explain(part, messages[0]), param=part.param)
        return None


_WHAT = {JsonSchema: "the JSON schema", JsonObject: "the JSON object format", Regex: "the regex",
         Choice: "the list of choices", Grammar: "the grammar", ToolCalls: "the tools' parameter schemas"}
_UNIMPLEMENTED = re.compile(r'Unimplemented keys: \[(.*?)\]')
_FORMAT = re.compile(r"Unknown format: (\S+)")
_POINTER = re.compile(r"Pointer '([^']*)' does not exist")
_RESOURCE = re.compile(r"Resource '([^']*)' is not present")
_REGEX_ERR = re.compile(r"^error: (.*)$", re.M)
_LIMIT = ("too large", "too complex", "limit", "fuel", "TooComplex")


def _explain(spec: Constraint, raw: str) -> str:
    """llguidance's error as plain words that name what the caller sent."""
    what = _WHAT[type(spec)]
    if m := _UNIMPLEMENTED.search(raw):
        keys = ", ".join(repr(k.strip().strip('"')) for k in m.group(1).split(","))
        return f"{what} uses {keys}, which structured outputs do not support"
    if m := _FORMAT.search(raw):
        return f"{what} uses the string format {m.group(1)!r}, which structured outputs do not support"
    if "oneOf constraints are not supported" in raw:
        return f"{what} uses 'oneOf' with alternatives that may overlap, which structured outputs do not " \
               f"support; use 'anyOf'"
    if m := _POINTER.search(raw):
        return f"{what} has a $ref to '#{m.group(1)}', which does not exist in the schema"
    if m := _RESOURCE.search(raw):
        return f"{what} has a $ref to {m.group(1)!r}; only references inside the schema are supported"
    if "look-around" in raw:
        return f"{what} uses look-around ((?=...), (?!...), ...), which structured outputs do not support"
    if any(word in raw for word in _LIMIT):
        return f"{what} is too large or complex for structured outputs ({first_line(raw, 120)})"
    if m := _REGEX_ERR.search(raw):
        return f"{what} is not a valid regular expression: {m.group(1)}"
    if "Unsatisfiable" in raw:
        return f"{what} can never be satisfied: {first_line(raw).split(':', 1)[-1].strip()}"
    return f"{what} is not usable: {first_line(raw)}"

