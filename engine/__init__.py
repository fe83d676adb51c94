"""Goose engine: the RWKV-7 model, its checkpoints and text, and the continuous-batching engine (no HTTP imports).

The map (each job has one place):
    serving core   async_engine.py   AsyncEngine: validate once, admit, stream outputs (the public front)
                   core.py           EngineCore: the step loop (schedule -> execute -> update) and admission
                   scheduler.py      pure policy: slots, FIFO admission order, each step's token budget
                   runner.py         the model calls of a step on rows of the state pool (state_pool.py)
                   update.py         per-token finish rules, detokenized deltas, RequestOutputs
                   sampling.py       the batched sampler; prefix_cache.py: state snapshots by token prefix
                   prefix_hash.py    names of token prefixes (a hash chain a conversation carries), ConvState
                   saved_states.py   initial states (state-tuning files) and stored conversation states
                   embeddings.py     pooled hidden states; streams.py: the asyncio hand-over of outputs
                   request.py        GenerateRequest, SamplingParams, outputs; config.py; errors.py
    model/         the RWKV-7 forward, matrix products, RNNState, strategies, CPU thread/allocator knobs
    formats/       the one checkpoint reader (.pth, safetensors, HF, GGUF) and `goose convert`
    states/        the StateStore: checked blobs of states and records in memory, a directory, Redis
    text/          tokenizers, the chat template (tools too), stop strings, tool-call parsing
    structured/    constrained decoding (llguidance): grammars from JSON schemas, regexes, choices, Lark, tool calls;
                   per-sequence matchers and the batched token masks

The public API is what this module exports.
"""
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig, ModelConfig
from engine.errors import (ContextLengthExceeded, EngineDead, EngineDraining, EngineError, InvalidRequest,
                           ModelLoadError, Overloaded, RequestFailed)
from engine.model import RNNState, RWKV7, Strategy, acall_in_new_thread, call_in_new_thread, load_model
from engine.model import parse_strategy, tune_malloc
from engine.request import (MAX_LOGPROBS, MAX_N, MAX_STOP, MAX_STOP_LEN, SEED_MAX, SEED_MIN, EngineStats,
                            FinishReason, GenerateRequest, RequestOutput, SamplingParams, SequenceOutput,
                            TokenLogprob)
from engine.formats.state_file import load_state_file
from engine.prefix_hash import ConvState, TokenPrefix
from engine.states import StateKey, StateStore, StoreConfig, StoreStats, TierStats
from engine.streams import RequestStream
from engine.text import ChatTemplate, Segment, load_tokenizer, render_chat, render_segments
from engine.structured import (Choice, CompiledGrammar, Constraint, Grammar, GrammarCompiler, GrammarLimits, JsonObject,
                               JsonSchema, MaskBatch, MaskFiller, Matcher, Regex, ToolCalls, apply_mask)
from engine.text import (ArgumentsDelta, CallStart, ContentDelta, ParsedReply, ToolCall, ToolCallStream, ToolFormat,
                         ToolFunction, parse_tool_calls)

__all__ = ["EngineConfig", "ModelConfig", "AsyncEngine", "RequestStream", "ContextLengthExceeded", "EngineDead",
           "EngineDraining", "EngineError", "InvalidRequest", "ModelLoadError", "Overloaded", "RequestFailed",
           "RWKV7", "load_model", "EngineStats", "FinishReason", "GenerateRequest", "RequestOutput",
           "SamplingParams", "SequenceOutput", "TokenLogprob", "RNNState", "Strategy", "parse_strategy",
           "load_tokenizer", "ChatTemplate", "render_chat", "render_segments", "Segment", "MAX_LOGPROBS", "MAX_N",
           "MAX_STOP", "MAX_STOP_LEN",
           "SEED_MIN", "SEED_MAX", "tune_malloc", "call_in_new_thread", "acall_in_new_thread",
           "Choice", "CompiledGrammar", "Constraint", "Grammar", "GrammarCompiler", "GrammarLimits", "JsonObject",
           "JsonSchema", "MaskBatch", "MaskFiller", "Matcher", "Regex", "ToolCalls", "apply_mask",
           "ArgumentsDelta", "CallStart", "ContentDelta", "ParsedReply", "ToolCall", "ToolCallStream", "ToolFormat",
           "ToolFunction", "parse_tool_calls", "load_state_file", "ConvState", "TokenPrefix", "StateKey",
           "StateStore", "StoreConfig", "StoreStats", "TierStats"]
