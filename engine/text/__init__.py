"""Text: tokenizers (tokenizer.py loads one: the interface in tokenizer_base.py, World in world.py, tokenizer.json in
hf_tokenizer.py), the chat template (chat.py), and stop strings over streamed text (stop.py)."""
from engine.text.chat import ChatTemplate, render_chat
from engine.text.stop import TextStream
from engine.text.tokenizer import load_tokenizer

__all__ = ["ChatTemplate", "render_chat", "TextStream", "load_tokenizer"]
