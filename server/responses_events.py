"""The Responses API's streaming events for one response, built from text deltas and a finish, in order.

    response.created, response.in_progress,
    response.output_item.added, response.content_part.added, response.output_text.delta ...,
    response.output_text.done, response.content_part.done, response.output_item.done,
    (function calls: response.output_item.added, response.function_call_arguments.delta ..., .done,
     response.output_item.done)
    response.completed | response.incomplete | response.failed

sequence_number counts from 0 across the whole stream. Pure: no I/O, no engine. Non-streaming responses are
the same fold: the final response is the terminal event's (``final``). Events are JSON-ready dicts; the SSE
writer sends each as ``event: <type>`` + ``data: <json>`` and no [DONE].
"""
from __future__ import annotations

import time
from collections.abc import Iterable

from server.responses_protocol import (FunctionCall, IncompleteDetails, OutputMessage, OutputText, ResponseError,
                                       ResponseObject, ResponseUsage, new_id)

TERMINAL = ("response.completed", "response.incomplete", "response.failed")


class ResponseEvents:
    """Turns one response's outputs into its events. Call start(), then text()/function_call() any number of
    times, then finish() or fail(); each returns the events to send, in order."""

    def __init__(self, response: ResponseObject):
        self.response = response.model_copy(deep=True)          # the skeleton: status in_progress, no output
        self._seq = 0
        self._message: OutputMessage | None = None               # the open message item
        self._call: FunctionCall | None = None                    # the open function call item
        self._done = False

    # ------------------------------------------------------------------------------------------ helpers
    def _event(self, type_: str, **fields) -> dict:
        event = {"type": type_, "sequence_number": self._seq, **fields}
        self._seq += 1
        return event

    def _snapshot(self) -> dict:
        return self.response.model_dump(mode="json", by_alias=True)

    @property
    def _index(self) -> int:
        return len(self.response.output) - 1

    def _check_open(self) -> None:
        if self._done:
            raise RuntimeError("the response has already finished")

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> list[dict]:
        return [self._event("response.created", response=self._snapshot()),
                self._event("response.in_progress", response=self._snapshot())]

    def text(self, delta: str) -> list[dict]:
        """A text delta; the first one opens the message item and its output_text part. Empty deltas send nothing."""
        self._check_open()
        events = self._close_call()
        if self._message is None:
            events += self._open_message()
        if delta:
            self._message.content[0].text += delta
            events.append(self._event("response.output_text.delta", item_id=self._message.id,
                                      output_index=self._index, content_index=0, delta=delta, logprobs=[]))
        return events

    def _open_message(self) -> list[dict]:
        self._message = OutputMessage(id=new_id("msg"), status="in_progress", content=[])
        self.response.output.append(self._message)
        added = self._event("response.output_item.added", output_index=self._index,
                            item=self._message.model_dump(mode="json"))
        self._message.content.append(OutputText(text=""))
        part = self._event("response.content_part.added", item_id=self._message.id, output_index=self._index,
                           content_index=0, part=self._message.content[0].model_dump(mode="json"))
        return [added, part]

    def _close_message(self, status: str) -> list[dict]:
        msg = self._message
        if msg is None:
            return []
        self._message = None
        part = msg.content[0]
        msg.status = status
        i = self.response.output.index(msg)
        return [self._event("response.output_text.done", item_id=msg.id, output_index=i, content_index=0,
                            text=part.text, logprobs=[]),
                self._event("response.content_part.done", item_id=msg.id, output_index=i, content_index=0,
                            part=part.model_dump(mode="json")),
                self._event("response.output_item.done", output_index=i, item=msg.model_dump(mode="json"))]

    def function_call(self, name: str, arguments: str = "", *, call_id: str | None = None) -> list[dict]:
        """Open a function call item (closing an open message), with ``arguments`` as its first delta."""
        self._check_open()
        events = self._close_message("completed") + self._close_call()
        self._call = FunctionCall(id=new_id("fc"), call_id=call_id or new_id("call"), name=name, arguments="",
                                  status="in_progress")
        self.response.output.append(self._call)
        events.append(self._event("response.output_item.added", output_index=self._index,
                                  item=self._call.model_dump(mode="json")))
        return events + self.arguments(arguments)

    def arguments(self, delta: str) -> list[dict]:
        """More argument text for the open function call."""
        self._check_open()
        if self._call is None:
            raise RuntimeError("no function call is open")
        if not delta:
            return []
        self._call.arguments += delta
        return [self._event("response.function_call_arguments.delta", item_id=self._call.id,
                            output_index=self._index, delta=delta)]

    def _close_call(self) -> list[dict]:
        call = self._call
        if call is None:
            return []
        self._call = None
        call.status = "completed"
        i = self.response.output.index(call)
        return [self._event("response.function_call_arguments.done", item_id=call.id, output_index=i,
                            arguments=call.arguments),
                self._event("response.output_item.done", output_index=i, item=call.model_dump(mode="json"))]

    def finish(self, finish_reason: str, usage: ResponseUsage) -> list[dict]:
        """Close the open item and end the response: "stop" -> completed; "length" -> incomplete
        (max_output_tokens), its message item incomplete too. A response with no output gets an empty message."""
        self._check_open()
        if finish_reason not in ("stop", "length"):
            raise ValueError(f"finish_reason must be 'stop' or 'length', got {finish_reason!r}")
        complete = finish_reason == "stop"
        events = [] if self.response.output else self.text("")
        events += self._close_message("completed" if complete else "incomplete") + self._close_call()
        self._done = True
        self.response.usage = usage
        if complete:
            self.response.status = "completed"
            self.response.completed_at = int(time.time())
            return events + [self._event("response.completed", response=self._snapshot())]
        self.response.status = "incomplete"
        self.response.incomplete_details = IncompleteDetails(reason="max_output_tokens")
        return events + [self._event("response.incomplete", response=self._snapshot())]

    def fail(self, message: str, code: str = "server_error") -> list[dict]:
        """End the response as failed (an engine error after the stream started); open items stay as they are."""
        self._check_open()
        self._done = True
        self._message = self._call = None
        self.response.status = "failed"
        self.response.error = ResponseError(code=code, message=message)
        return [self._event("response.failed", response=self._snapshot())]

    @property
    def final(self) -> ResponseObject:
        """The response as the terminal event carries it (a copy)."""
        return self.response.model_copy(deep=True)


def response_events(response: ResponseObject, deltas: Iterable[str], finish_reason: str,
                    usage: ResponseUsage) -> list[dict]:
    """Every event of a text-only response: a convenience over ResponseEvents (tests, non-streaming)."""
    ev = ResponseEvents(response)
    events = ev.start()
    for delta in deltas:
        events += ev.text(delta)
    return events + ev.finish(finish_reason, usage)
