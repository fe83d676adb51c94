"""Typed engine errors; no HTTP here (the server maps each class to a status once)."""
from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class ModelLoadError(EngineError, ValueError):
    """A checkpoint, tokenizer or strategy could not be loaded; the message names the file, key or value."""


class InvalidRequest(EngineError, ValueError):
    """A request is malformed; ``param`` names the offending field when there is one."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthExceeded(InvalidRequest):
    """The prompt has more tokens than the engine's max_prompt_tokens."""


class Overloaded(EngineError):
    """The waiting queue is full; retry later (the server answers 429 with Retry-After)."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class EngineDead(EngineError):
    """The engine's step loop has stopped (crashed or shut down); nothing can be served."""


class EngineDraining(EngineError):
    """The engine is shutting down and admits no new requests."""


class RequestFailed(EngineError):
    """Processing of one request failed inside the engine; other requests are unaffected."""
