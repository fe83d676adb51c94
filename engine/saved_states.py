"""What a request may start from besides zeros: named initial states (state-tuning files) and conversation states
saved in the StateStore (engine/states/), always keyed by the model's identity and the initial state's content.

Lookups that may touch disk or Redis (load, find_boundary) block: call them in a worker thread, never on the event
loop or the step thread. save() costs its caller one copy of the state; a writer thread does the rest.
"""
from __future__ import annotations

import logging
import re

from engine.errors import InvalidRequest
from engine.formats.state_file import state_digest
from engine.model.state import RNNState
from engine.prefix_cache import Hit, PrefixCache
from engine.prefix_hash import ConvState, PrefixHashes, TokenPrefix
from engine.request import GenerateRequest
from engine.states import StateKey, StateStore

log = logging.getLogger("goose.states")
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def fits(state: RNNState, config) -> bool:
    """A batch of one shaped for a model of ``config``."""
    if state.n_layer != config.n_layer or state.batch_size != 1:
        return False
    want_wkv = (1, config.n_head, config.head_size, config.head_size)
    return (all(tuple(t.shape) == want_wkv for t in state.wkv)
            and all(tuple(t.shape) == (1, config.n_embd) for t in state.att_x + state.ffn_x))


class SavedStates:
    def __init__(self, model, initials: dict[str, tuple[str, RNNState | None]], cache: PrefixCache,
                 store: StateStore | None):
        self.identity = model.identity
        self.config = model.config
        self.initials = initials           # shared with the step thread's runner: name -> (key, state)
        self.cache = cache
        self.store = store

    # ------------------------------------------------------------------------------------------ initial states
    def add_initial(self, name: str, state: RNNState) -> str:
        """Register an initial state under ``name`` (before the engine starts); returns its key in stored states,
        ``name:<16 hex of its content>``, so editing the file never reuses conversations made from the old one."""
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ValueError(f"initial state name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        if name in self.initials:
            raise ValueError(f"initial state {name!r} is already registered")
        if not fits(state, self.config):
            raise ValueError(f"initial state {name!r} does not fit the model ({self.config.n_layer} layers, "
                             f"{self.config.n_head} heads of {self.config.head_size})")
        key = f"{name}:{state_digest(state)[:16]}"
        self.initials[name] = (key, state.to("cpu").clone())
        return key

    @property
    def names(self) -> list[str]:
        """The registered initial states, in the order they were added."""
        return [n for n in self.initials if n]

    def check_request(self, request: GenerateRequest) -> None:
        if request.initial not in self.initials:
            raise InvalidRequest(f"no initial state named {request.initial[:64]!r}; this server has "
                                 f"{self.names or 'none'}", param="model")
        if request.start is not None and not fits(request.start.state, self.config):
            raise InvalidRequest("the start state does not fit this model", param="start")

    # ------------------------------------------------------------------------------------------ stored states
    @property
    def shared(self) -> bool:
        """True when there is a store with at least one tier to look in."""
        return self.store is not None and bool(self.store.tiers)

    @property
    def persistent(self) -> bool:
        """True when the store has a tier beyond this process's memory (a directory or Redis)."""
        return self.store is not None and (self.store.disk is not None or self.store.redis is not None)

    def key(self, initial: str, prefix: TokenPrefix) -> StateKey:
        return StateKey(self.identity, self.initials[initial][0], prefix.digest)

    def save(self, conv: ConvState) -> None:
        """Store a conversation state in every tier (in the background) and in the engine's prefix cache."""
        if conv.initial not in self.initials:
            raise ValueError(f"no initial state named {conv.initial!r}")
        self.cache.insert(self.initials[conv.initial][0], conv.prefix.digest, conv.prefix.length, conv.state)
        if self.shared:
            self.store.put_state(self.key(conv.initial, conv.prefix), conv.state, background=True)

    def load(self, initial: str, prefix: TokenPrefix) -> ConvState | None:
        """The state after ``prefix`` from ``initial``: the prefix cache, else the store's tiers; None when neither
        has it (or the stored copy is damaged, expired or another model's). Blocking."""
        if initial not in self.initials or prefix.length == 0:
            return None
        state = self.cache.get(self.initials[initial][0], prefix.digest)
        if state is None and self.shared:
            state = self.store.get_state(self.key(initial, prefix), self.config)
        return ConvState(state, prefix, initial) if state is not None else None

    def delete(self, initial: str, prefix: TokenPrefix) -> None:
        if initial not in self.initials:
            return
        self.cache.remove(self.initials[initial][0], prefix.digest)
        if self.shared:
            self.store.delete_state(self.key(initial, prefix))

    def find_boundary(self, initial: str, hashes: PrefixHashes, boundaries: tuple[int, ...]) -> Hit | None:
        """The longest message boundary of a prompt whose state is stored, unless the prefix cache already holds
        that boundary (the step thread finds it there). Blocking."""
        ikey = self.initials[initial][0]
        for b in reversed(boundaries):
            digest = hashes.digest(b)
            if self.cache.has(ikey, digest):
                return None
            state = self.store.get_state(StateKey(self.identity, ikey, digest), self.config)
            if state is not None:
                return Hit(b, state)
        return None

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
