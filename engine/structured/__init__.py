"""Structured outputs: constrain sampling to a JSON schema, regex, choice list, grammar or tool-call format.

Use: ``compiler = GrammarCompiler(tokenizer, model_vocab_size)`` once per engine; per request (in a worker
thread) ``compiled = compiler.compile(spec)`` (InvalidRequest on a bad spec); per sequence
``matcher = compiled.matcher()``; per step ``batch = filler.fill(matchers)`` (may overlap the forward), then
``apply_mask(logits, batch)`` after every other logit edit, sample, and ``matcher.accept(token)``.
"""
from engine.structured.compiler import CompiledGrammar, GrammarCompiler, GrammarLimits
from engine.structured.masks import MaskBatch, MaskFiller, apply_mask
from engine.structured.matcher import Matcher
from engine.structured.spec import (MAX_CHOICES, MAX_SPEC_CHARS, Choice, Constraint, Grammar, JsonObject, JsonSchema,
                                    Regex, ToolCalls)
from engine.structured.vocab import GrammarVocab, grammar_vocab

__all__ = ["CompiledGrammar", "GrammarCompiler", "GrammarLimits", "MaskBatch", "MaskFiller", "apply_mask", "Matcher",
           "MAX_CHOICES", "MAX_SPEC_CHARS", "Choice", "Constraint", "Grammar", "JsonObject", "JsonSchema", "Regex",
           "ToolCalls", "GrammarVocab", "grammar_vocab"]
