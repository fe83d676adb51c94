"""Goose engine: the RWKV-7 model, weights, tokenizers, state and the continuous-batching engine (no HTTP
imports). The public API is what this module exports."""
from engine.config import EngineConfig, ModelConfig
from engine.engine import AsyncEngine, RequestStream
from engine.errors import (EngineDead, EngineDraining, EngineError, InvalidRequest, ModelLoadError, Overloaded,
                           RequestFailed)
from engine.model import RWKV7, load_model
from engine.prompt import ChatTemplate, render_chat
from engine.request import (MAX_LOGPROBS, MAX_N, MAX_STOP, MAX_STOP_LEN, EngineStats, FinishReason,
                            GenerateRequest, RequestOutput, SamplingParams, SequenceOutput, TokenLogprob)
from engine.allocator import tune_malloc
from engine.state import RNNState
from engine.strategy import Strategy, parse_strategy
from engine.threads import acall_in_new_thread, call_in_new_thread


def load_tokenizer(spec: str):
    """Load "world" (the RWKV World vocabulary) or a path to a tokenizer.json / rwkv_vocab file / directory."""
    from engine.tokenizer import load_tokenizer as _load
    return _load(spec)


__all__ = ["EngineConfig", "ModelConfig", "AsyncEngine", "RequestStream", "EngineDead", "EngineDraining",
           "EngineError", "InvalidRequest", "ModelLoadError", "Overloaded", "RequestFailed", "RWKV7", "load_model",
           "EngineStats", "FinishReason", "GenerateRequest", "RequestOutput", "SamplingParams", "SequenceOutput",
           "TokenLogprob", "RNNState", "Strategy", "parse_strategy", "load_tokenizer", "ChatTemplate", "render_chat",
           "MAX_LOGPROBS", "MAX_N", "MAX_STOP", "MAX_STOP_LEN", "tune_malloc", "call_in_new_thread",
           "acall_in_new_thread"]
