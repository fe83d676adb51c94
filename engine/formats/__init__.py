"""Checkpoint formats: the one reader of every format (checkpoint.py, which dispatches to gguf.py and hf.py's
naming), and `goose convert` between them (convert.py, which writes GGUF through gguf_write.py and the quantized
safetensors of --dtype i8|i4 through quantized.py, whose reading side open_checkpoint calls)."""
from engine.formats.checkpoint import load_weights, read_checkpoint

__all__ = ["load_weights", "read_checkpoint"]
