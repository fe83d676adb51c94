"""Stored responses: what GET /v1/responses/{id} returns and what previous_response_id continues from, as JSON
records in the engine's StateStore (so they live in the same tiers, expire with the same TTL and are shared by the
same replicas as the conversation states they point to).

A record holds the response, this request's input items, the items of the turns before it (so a conversation can
be rebuilt as text when its state is gone or cannot apply), the instructions and tools it ran with, and the name of
its conversation state: the model identity, the initial state and the TokenPrefix the state covers.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from pydantic import TypeAdapter

from engine import StateKey, TokenPrefix
from server.responses_protocol import ResponseObject, StoredItem

RECORDS = "responses"
"""StateKey.model of response records: records are text, readable whatever model a replica serves (their states
are keyed by the model that made them and are never used by another)."""
_ITEMS = TypeAdapter(list[StoredItem])


@dataclass
class StoredResponse:
    response: ResponseObject
    input: list = field(default_factory=list)          # StoredItem: this request's input
    history: list = field(default_factory=list)        # StoredItem: the earlier turns' input and output
    instructions: str | None = None
    tools: list[dict] = field(default_factory=list)     # the tools offered (their dumps), part of the prompt
    identity: str = ""                                  # RWKV7.identity of the model that ran it
    initial: str = ""                                   # the initial state it started from
    state: TokenPrefix | None = None                    # the prefix its conversation state covers, if stored

    @property
    def id(self) -> str:
        return self.response.id

    @property
    def conversation(self) -> list:
        """Every item of the conversation through this response's output."""
        return [*self.history, *self.input, *self.response.output]

    def to_json(self) -> dict:
        return {"response": self.response.model_dump(mode="json", by_alias=True),
                "input": _ITEMS.dump_python(self.input, mode="json", by_alias=True),
                "history": _ITEMS.dump_python(self.history, mode="json", by_alias=True),
                "instructions": self.instructions, "tools": self.tools, "identity": self.identity,
                "initial": self.initial, "state": self.state.to_json() if self.state is not None else None}

    @classmethod
    def from_json(cls, data: dict) -> StoredResponse:
        state = data.get("state")
        return cls(response=ResponseObject.model_validate(data["response"]),
                   input=_ITEMS.validate_python(data["input"]), history=_ITEMS.validate_python(data["history"]),
                   instructions=data.get("instructions"), tools=list(data.get("tools") or []),
                   identity=data.get("identity", ""), initial=data.get("initial", ""),
                   state=TokenPrefix.from_json(state) if state else None)


class ResponseStore:
    """Records by response id, in the StateStore's tiers (None: nothing is stored). Each call runs in a worker
    thread: a tier may be a disk or a Redis server."""

    def __init__(self, store):
        self.store = store if store is not None and store.tiers else None

    @property
    def enabled(self) -> bool:
        return self.store is not None

    @staticmethod
    def _key(response_id: str) -> StateKey:
        return StateKey(RECORDS, "", response_id)

    async def get(self, response_id: str) -> StoredResponse | None:
        if self.store is None or not response_id:
            return None
        data = await asyncio.to_thread(self.store.get_record, self._key(response_id))
        if data is None:
            return None
        try:
            return StoredResponse.from_json(data)
        except (ValueError, KeyError, TypeError):           # written by another version: not this server's
            return None

    async def put(self, record: StoredResponse) -> None:
        if self.store is not None:
            await asyncio.to_thread(self.store.put_record, self._key(record.id), record.to_json())

    async def delete(self, response_id: str) -> None:
        if self.store is not None:
            await asyncio.to_thread(self.store.delete_record, self._key(response_id))
