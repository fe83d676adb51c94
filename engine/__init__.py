"""Goose engine: the RWKV-7 model, weights, tokenizers and state (no HTTP imports). The public API is here."""
from engine.config import ModelConfig
from engine.errors import EngineError, InvalidRequest, ModelLoadError
from engine.model import RWKV7, load_model
from engine.state import RNNState
from engine.strategy import Strategy, parse_strategy


def load_tokenizer(spec: str):
    """Load "world" (the RWKV World vocabulary) or a path to a tokenizer.json / rwkv_vocab file / directory."""
    from engine.tokenizer import load_tokenizer as _load
    return _load(spec)


__all__ = ["ModelConfig", "EngineError", "InvalidRequest", "ModelLoadError", "RWKV7", "load_model",
           "RNNState", "Strategy", "parse_strategy", "load_tokenizer"]
