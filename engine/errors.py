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
