"""Checkpoint formats: the one reader of every format (checkpoint.py, which dispatches to gguf.py and hf.py's
naming), and `goose convert` between them (convert.py, which writes GGUF through gguf_write.py)."""
from engine.formats.checkpoint import load_weights, read_checkpoint

__all__ = ["load_weights", "read_checkpoint"]
