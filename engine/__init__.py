"""Goose engine: the RWKV-7 model, weights, tokenizers, state and the continuous-batching engine (no HTTP
imports). The public API is what this module exports."""
from engine.config import EngineConfig, ModelConfig
from engine.engine import AsyncEngine, RequestStream
from engine.errors import (EngineDead, EngineDraining, EngineError, InvalidRequest, ModelLoadError, Overloaded,
                           RequestFailed)
from engine.model import RNNState, RWKV7, Strategy, acall_in_new_thread, call_in_new_thread, load_model, parse_strategy
from engine.model import tune_malloc
from engine.request import (MAX_LOGPROBS, MAX_N, MAX_STOP, MAX_STOP_LEN, EngineStats, FinishReason,
                            GenerateRequest, RequestOutput, SamplingParams, SequenceOutput, TokenLogprob)
from engine.text import ChatTemplate, load_tokenizer, render_chat
from engine.structured import (Choice, CompiledGrammar, Constraint, Grammar, GrammarCompiler, GrammarLimits, JsonObject,
                               JsonSchema, MaskBatch, MaskFiller, Matcher, Regex, ToolCalls, apply_mask)
from engine.text import (ArgumentsDelta, CallStart, ContentDelta, ParsedReply, ToolCall, ToolCallStream, ToolFormat,
                         ToolFunction, parse_tool_calls)

__all__ = ["EngineConfig", "ModelConfig", "AsyncEngine", "RequestStream", "EngineDead", "EngineDraining",
           "EngineError", "InvalidRequest", "ModelLoadError", "Overloaded", "RequestFailed", "RWKV7", "load_model",
           "EngineStats", "FinishReason", "GenerateRequest", "RequestOutput", "SamplingParams", "SequenceOutput",
           "TokenLogprob", "RNNState", "Strategy", "parse_strategy", "load_tokenizer", "ChatTemplate", "render_chat",
           "MAX_LOGPROBS", "MAX_N", "MAX_STOP", "MAX_STOP_LEN", "tune_malloc", "call_in_new_thread",
           "acall_in_new_thread",
           "Choice", "CompiledGrammar", "Constraint", "Grammar", "GrammarCompiler", "GrammarLimits", "JsonObject",
           "JsonSchema", "MaskBatch", "MaskFiller", "Matcher", "Regex", "ToolCalls", "apply_mask",
           "ArgumentsDelta", "CallStart", "ContentDelta", "ParsedReply", "ToolCall", "ToolCallStream", "ToolFormat",
           "ToolFunction", "parse_tool_calls"]
