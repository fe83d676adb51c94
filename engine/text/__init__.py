"""Text: tokenizers (tokenizer.py loads one: the interface in tokenizer_base.py, World in world.py, tokenizer.json in
hf_tokenizer.py), the chat template (chat.py), stop strings over streamed text (stop.py), and tool calls as text
(tools.py: the prompt format; tool_parser.py: replies -> calls)."""
from engine.text.chat import ChatTemplate, Segment, render_chat, render_segments
from engine.text.stop import TextStream
from engine.text.tokenizer import load_tokenizer
from engine.text.tool_parser import (ArgumentsDelta, CallStart, ContentDelta, ParsedReply, ToolCall, ToolCallStream,
                                     ToolEvent, new_call_id, parse_tool_calls)
from engine.text.tools import ToolFormat, ToolFunction

__all__ = ["ChatTemplate", "Segment", "render_chat", "render_segments", "TextStream", "load_tokenizer",
           "ArgumentsDelta", "CallStart",
           "ContentDelta", "ParsedReply", "ToolCall", "ToolCallStream", "ToolEvent", "new_call_id",
           "parse_tool_calls", "ToolFormat", "ToolFunction"]
