"""Chat messages -> RWKV prompt text (``User: ...\\n\\nAssistant:``), with the model's own template when it has one.

RWKV chat models are trained on turns separated by "\\n\\n" (RWKV-LM RWKV7-G1x-templates.txt; our
training/chat_data.py), so inside a message "\\r\\n" becomes "\\n", runs of blank lines collapse to one "\\n" and the
text is stripped: "\\n\\n" then only ever ends a turn, and stopping on "\\n\\n" ends the assistant's reply.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from engine.errors import InvalidRequest
from engine.text.tools import ToolFormat, ToolFunction

ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"developer": "system"}     # newer OpenAI clients send "developer" for system instructions
_BLANK_LINES = re.compile(r"\n{2,}")


@dataclass(frozen=True)
class ChatTemplate:
    """The RWKV chat format; goose.json's "chat" and "stop" entries override the RWKV World defaults."""
    user: str = "User"
    assistant: str = "Assistant"
    system: str = "System"
    separator: str = "\n\n"
    """Ends every turn."""
    generation_prompt: str = "Assistant:"
    """Appended after the last message; the model continues with the reply (usually starting with a space)."""
    stop: tuple[str, ...] = ("\n\n", "\nUser:")
    """Stop strings added to every chat request: the reply ends where the model starts a new turn."""
    bos: bool = True
    """Start the prompt with the end-of-text id, as documents are separated by it in training."""
    tools: ToolFormat = ToolFormat()
    """How tools, calls and results appear in the prompt; goose.json's "tools" object (see engine/text/tools.py)."""

    @classmethod
    def from_metadata(cls, meta: Mapping | None) -> ChatTemplate:
        """The template described by a goose.json dict ({"chat": {...}, "stop": [...], "tools": {...}});
        defaults where absent."""
        if not meta:
            return cls()
        chat = meta.get("chat") or {}
        if not isinstance(chat, Mapping):
            raise ValueError("goose.json: 'chat' must be an object")
        known = {"user", "assistant", "system", "separator", "generation_prompt", "bos"}
        unknown = set(chat) - known
        if unknown:
            raise ValueError(f"goose.json: unknown chat keys {sorted(unknown)}; known: {sorted(known)}")
        for key, value in chat.items():
            if not isinstance(value, bool if key == "bos" else str):
                raise ValueError(f"goose.json: chat.{key} has the wrong type ({value!r})")
        stop = meta.get("stop", cls.stop)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError("goose.json: 'stop' must be a list of non-empty strings")
        tools = ToolFormat.from_metadata(meta.get("tools"), chat.get("separator", cls.separator))
        return cls(**chat, stop=tuple(stop), tools=tools)

    def role_name(self, role: str) -> str:
        return {"system": self.system, "user": self.user, "assistant": self.assistant,
                "tool": self.tools.role}[role]


def clean_message(text: str) -> str:
    """Normalise one message: CRLF -> LF, blank-line runs -> one newline, stripped."""
    return _BLANK_LINES.sub("\n", text.replace("\r\n", "\n").replace("\r", "\n")).strip()


def message_text(content, index: int) -> str:
    """The text of a message's content: a string, None, or a list of {"type": "text", "text": ...} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest(f"messages[{index}].content: only text parts are supported, got "
                                     f"{str(kind)[:40]!r}", param=f"messages[{index}].content")
            parts.append(part["text"])
        return "\n".join(parts)
    raise InvalidRequest(f"messages[{index}].content must be a string or a list of text parts",
                         param=f"messages[{index}].content")


def render_chat(messages: Iterable[Mapping], template: ChatTemplate = ChatTemplate(),
                tools: Sequence[ToolFunction] = ()) -> str:
    """Prompt text for a conversation: "System: ...\\n\\nUser: ...\\n\\nAssistant: ...\\n\\n" + "Assistant:".

    messages are mappings with "role" (system, developer, user, assistant or tool) and "content" (see
    message_text); assistant messages may hold OpenAI "tool_calls", tool messages a "tool_call_id" naming an
    earlier call. ``tools`` are offered to the model in the system turn, in the template's tool format.
    """
    return "".join(seg.text for seg in render_segments(messages, template, tools))


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered prompt: tokenized on its own, so message boundaries are token boundaries."""
    index: int
    """The message it renders: -1 for the tools' own system turn, len(messages) for the generation prompt."""
    text: str
    end: bool
    """It ends its message (an assistant message is two pieces: the generation prompt and the reply)."""


def render_segments(messages: Iterable[Mapping], template: ChatTemplate = ChatTemplate(),
                    tools: Sequence[ToolFunction] = ()) -> list[Segment]:
    """render_chat's text in pieces, one per message, the generation prompt last. An assistant message that
    begins with the generation prompt is cut after it, so a prompt's tokens followed by its reply's tokens are the
    tokens of the conversation that holds the reply (tokenizing piece by piece)."""
    out: list[Segment] = []
    calls: dict[str, str] = {}           # tool call id -> function name, for the results that follow
    tool_block = template.tools.system_text(tools) if tools else ""
    count = 0
    for i, msg in enumerate(messages):
        count += 1
        role = msg.get("role")
        role = ROLE_ALIASES.get(role, role)
        if role not in ROLES:
            raise InvalidRequest(f"messages[{i}].role must be one of system, developer, user, assistant, tool; "
                                 f"got {str(role)[:40]!r}", param=f"messages[{i}].role")
        text = clean_message(message_text(msg.get("content"), i))
        if role == "system" and i == 0 and tool_block:
            text, tool_block = f"{text}\n{tool_block}" if text else tool_block, ""
        elif role == "assistant" and msg.get("tool_calls"):
            text = _with_calls(text, msg["tool_calls"], i, template.tools, calls)
        elif role == "tool":
            text = template.tools.result_text(text, _called(msg.get("tool_call_id"), i, calls))
        turn = f"{template.role_name(role)}: {text}{template.separator}"
        cut = len(template.generation_prompt)
        if role == "assistant" and cut and turn.startswith(template.generation_prompt) and len(turn) > cut:
            out += [Segment(i, turn[:cut], False), Segment(i, turn[cut:], True)]
        else:
            out.append(Segment(i, turn, True))
    if not count:
        raise InvalidRequest("messages must not be empty", param="messages")
    if tool_block:
        out.insert(0, Segment(-1, f"{template.system}: {tool_block}{template.separator}", True))
    return out + [Segment(count, template.generation_prompt, False)]


def _with_calls(text: str, tool_calls, index: int, fmt: ToolFormat, calls: dict[str, str]) -> str:
    """An assistant message's text followed by its calls, each as the model would have written it."""
    if not isinstance(tool_calls, (list, tuple)):
        raise InvalidRequest(f"messages[{index}].tool_calls must be a list", param=f"messages[{index}].tool_calls")
    rendered = []
    for j, call in enumerate(tool_calls):
        where = f"messages[{index}].tool_calls[{j}]"
        function = call.get("function") if isinstance(call, Mapping) else None
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"{where}.function.name must be a non-empty string", param=f"{where}.function.name")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                pass                      # kept as the string the model wrote
        rendered.append((name, arguments))
        if isinstance(call.get("id"), str):
            calls[call["id"]] = name
    block = fmt.render_calls(rendered)
    return f"{text}\n{block}" if text else block


def _called(call_id, index: int, calls: dict[str, str]) -> str:
    """The function name of the earlier call a tool message answers."""
    if not isinstance(call_id, str) or call_id not in calls:
        shown = "is missing" if call_id is None else f"{str(call_id)[:60]!r} does not match any earlier tool call"
        raise InvalidRequest(f"messages[{index}].tool_call_id {shown}; a tool message answers a call that an "
                             f"earlier assistant message made", param=f"messages[{index}].tool_call_id")
    return calls[call_id]
