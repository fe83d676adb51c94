"""Tokenizers behind one interface: load_tokenizer picks one from a spec. The interface (tokenizer_base.py), the
World tokenizer (world.py) and the tokenizer.json one (hf_tokenizer.py) are re-exported here."""
from __future__ import annotations

import os
from pathlib import Path

from engine.errors import ModelLoadError
from engine.text.hf_tokenizer import HF_EOT_CANDIDATES, HFTokenizer, component_types
from engine.text.tokenizer_base import VOCAB_PAD, StreamDecoder, Tokenizer
from engine.text.world import WORLD_EOT_TEXT, WORLD_VOCAB_PATH, WorldTokenizer, read_world_vocab

__all__ = [
    "Tokenizer", "StreamDecoder", "WorldTokenizer", "HFTokenizer", "load_tokenizer",
    "WORLD_VOCAB_PATH", "WORLD_EOT_TEXT", "read_world_vocab", "VOCAB_PAD", "HF_EOT_CANDIDATES", "component_types",
]

_ACCEPTED = ("'world', a Hugging Face tokenizer.json (any *.json), an rwkv_vocab_*.txt file, "
             "or a directory containing rwkv_vocab_v20230424.txt or tokenizer.json")


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """Tokenizer from a spec: "world" (shipped World vocab), a tokenizer.json, an rwkv_vocab_*.txt, or a directory
    holding rwkv_vocab_v20230424.txt (preferred) or tokenizer.json. Raises ModelLoadError (a ValueError) otherwise."""
    if isinstance(spec, str) and spec.strip().lower() == "world":
        return WorldTokenizer()
    path = Path(spec)
    if path.is_dir():
        for name, cls in (("rwkv_vocab_v20230424.txt", WorldTokenizer), ("tokenizer.json", HFTokenizer)):
            if (path / name).is_file():
                return cls(path / name)
        raise ModelLoadError(f"tokenizer spec {str(spec)!r}: directory has neither rwkv_vocab_v20230424.txt nor "
                             f"tokenizer.json; expected {_ACCEPTED}")
    if path.is_file():
        if path.suffix == ".json":
            return HFTokenizer(path)
        if path.name.startswith("rwkv_vocab_") and path.suffix == ".txt":
            return WorldTokenizer(path)
        raise ModelLoadError(f"tokenizer spec {str(spec)!r}: unrecognized file name; expected {_ACCEPTED}")
    raise ModelLoadError(f"tokenizer spec {str(spec)!r}: no such file or directory; expected {_ACCEPTED}")
