"""Generated text -> content and tool calls, incrementally: the same parser serves streaming and whole replies.

``ToolCallStream.feed(delta)`` turns text deltas into events: ContentDelta, then for each call CallStart (its
index, a fresh id and the name) and ArgumentsDelta fragments of its arguments' JSON text. ``parse_tool_calls``
feeds a whole reply at once and folds the events, so a streamed reply always assembles to the same result
(ids aside). Whitespace right before a call, between calls and after the last call is not content; a reply
with calls and only whitespace besides has content None.

Replies constrained by the tool-call grammar have the exact shape ``<trigger><rest of begin>{"name": "<name>",
"arguments": <JSON>}<end>``; anything else after a trigger is parsed as a JSON object with "name" and
"arguments" once its end marker (or the end of the reply) arrives, and kept as content when it is not one.
"""
from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.text.tools import ToolFormat

_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"([A-Za-z0-9_.\-]{1,64})"\s*,\s*"arguments"\s*:\s*')


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str
    """The arguments as JSON text (OpenAI's ``function.arguments``)."""


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ArgumentsDelta:
    index: int
    text: str


ToolEvent = ContentDelta | CallStart | ArgumentsDelta


@dataclass
class ParsedReply:
    content: str | None
    calls: list[ToolCall] = field(default_factory=list)

    def finish_reason(self, engine_reason: str) -> str:
        """OpenAI's finish_reason: "tool_calls" when the reply ended normally with calls."""
        return "tool_calls" if self.calls and engine_reason == "stop" else engine_reason


class _JsonEnd:
    """Finds where one JSON value ends in text arriving in pieces (strings and escapes respected)."""

    def __init__(self):
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.started = False
        self.scalar = False

    def scan(self, text: str) -> int:
        """Index just past the value's end in ``text``, or -1 when it goes on."""
        for i, ch in enumerate(text):
            if not self.started:
                self.started = True
                if ch not in "{[\"":
                    self.scalar = True
            if self.scalar and not self.in_string:
                if ch in ",}] \t\r\n":
                    return i
                continue
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                    if self.depth == 0:
                        return i + 1
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        return -1


class ToolCallStream:
    """Incremental parser of one reply (see the module docstring)."""

    def __init__(self, fmt: ToolFormat = ToolFormat(), new_id: Callable[[], str] = new_call_id):
        self.fmt = fmt
        self._new_id = new_id
        self._trigger = fmt.trigger
        self._end = fmt.end.strip()
        self._state = "text"        # text | header | arguments | close
        self._buf = ""              # text not yet decided
        self._after_call = False    # whitespace that follows a call is not content
        self._json: _JsonEnd | None = None
        self.calls: list[ToolCall] = []
        self._pieces: list[str] = []  # the current call's argument text so far
        self.content = ""

    def feed(self, text: str) -> list[ToolEvent]:
        self._buf += text
        out: list[ToolEvent] = []
        while self._step(out, final=False):
            pass
        return out

    def finish(self) -> list[ToolEvent]:
        """Events for whatever is still held at the end of the reply."""
        out: list[ToolEvent] = []
        while self._step(out, final=True):
            pass
        if self._state == "header":
            self._fallback(self._buf, out)
        elif self._state == "arguments" and self._pieces:
            self._close_call()
        elif self._state == "text" and self._buf and not (self._after_call and not self._buf.strip()):
            self._content(self._buf, out)
        self._buf, self._state = "", "text"
        return out

    def result(self) -> ParsedReply:
        content = self.content if not self.calls or self.content.strip() else None
        return ParsedReply(content, list(self.calls))

    # ------------------------------------------------------------------------------------------------ states

    def _step(self, out: list[ToolEvent], final: bool) -> bool:
        """Advance one state transition; False when more text is needed."""
        return getattr(self, "_in_" + self._state)(out, final)

    def _in_text(self, out: list[ToolEvent], final: bool) -> bool:
        buf = self._buf
        if self._after_call:
            stripped = buf.lstrip()
            if not stripped:
                return False
            buf = self._buf = stripped
        at = buf.find(self._trigger)
        if at >= 0:
            if buf[:at].strip():
                self._content(buf[:at].rstrip(), out)
            self._buf, self._state = buf[at + len(self._trigger):], "header"
            return True
        if final:
            return False
        keep = _held(buf, self._trigger)
        if buf[:len(buf) - keep].strip():
            self._after_call = False
            self._content(buf[:len(buf) - keep], out)
            self._buf = buf[len(buf) - keep:]
        return False

    def _in_header(self, out: list[ToolEvent], final: bool) -> bool:
        m = _HEADER.match(self._buf)
        if m and m.end() < len(self._buf):
            index = len(self.calls)
            self.calls.append(ToolCall(self._new_id(), m.group(1), ""))
            out.append(CallStart(index, self.calls[-1].id, m.group(1)))
            self._buf, self._state, self._json, self._pieces = self._buf[m.end():], "arguments", _JsonEnd(), []
            return True
        end = self._buf.find(self._end) if self._end else -1
        if end >= 0:
            called = self._fallback(self._buf[:end], out, raw_end=self._end)
            self._buf, self._state, self._after_call = self._buf[end + len(self._end):], "text", called
            return True
        return False

    def _in_arguments(self, out: list[ToolEvent], final: bool) -> bool:
        if not self._buf:
            return False
        stop = self._json.scan(self._buf)
        piece = self._buf if stop < 0 else self._buf[:stop]
        if piece:
            self._pieces.append(piece)
            out.append(ArgumentsDelta(len(self.calls) - 1, piece))
        if stop < 0:
            self._buf = ""
            return False
        self._close_call()
        self._buf, self._state = self._buf[stop:], "close"
        return True

    def _in_close(self, out: list[ToolEvent], final: bool) -> bool:
        marker = self._end or "}"
        at = self._buf.find(marker)
        if at < 0:
            return False
        self._buf, self._state, self._after_call = self._buf[at + len(marker):], "text", True
        return True

    # ------------------------------------------------------------------------------------------------ helpers

    def _content(self, text: str, out: list[ToolEvent]) -> None:
        self.content += text
        out.append(ContentDelta(text))

    def _close_call(self) -> None:
        last = self.calls[-1]
        self.calls[-1] = ToolCall(last.id, last.name, "".join(self._pieces))
        self._pieces = []

    def _fallback(self, block: str, out: list[ToolEvent], raw_end: str = "") -> bool:
        """A call that is not in the exact shape: a JSON object with name and arguments (True), else content."""
        try:
            obj = json.loads(block)
        except ValueError:
            obj = None
        args = obj.get("arguments", obj.get("parameters")) if isinstance(obj, dict) else None
        if isinstance(obj, dict) and isinstance(obj.get("name"), str) and args is not None:
            text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
            index = len(self.calls)
            self.calls.append(ToolCall(self._new_id(), obj["name"], text))
            out += [CallStart(index, self.calls[-1].id, obj["name"]), ArgumentsDelta(index, text)]
            return True
        self._content(self._trigger + block + raw_end, out)
        return False


def _held(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``, plus the whitespace
    before it (held back: it is not content if a call follows)."""
    keep = 0
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            keep = n
            break
    rest = text[:len(text) - keep]
    return keep + len(rest) - len(rest.rstrip())


def parse_tool_calls(text: str, fmt: ToolFormat = ToolFormat(),
                     new_id: Callable[[], str] = new_call_id) -> ParsedReply:
    """A whole reply's content and calls (the streaming parser fed at once)."""
    stream = ToolCallStream(fmt, new_id)
    stream.feed(text)
    stream.finish()
    return stream.result()
