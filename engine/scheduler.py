"""Pure scheduling policy (no torch): admission order, slot accounting, and each step's token budget.

A group is one request: it prefills its prompt once in one slot, then decodes n sequences in n slots.
Every step decodes one token for every decoding sequence, and spends what is left of the step's token
budget on prompt chunks, oldest request first, so a long prompt never stalls the running streams for more
than one chunk.
"""
from __future__ import annotations

import enum
from collections import OrderedDict, deque
from dataclasses import dataclass, field


class Phase(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass
class GroupState:
    group_id: str
    n: int
    prompt_len: int
    position: int = 0                  # prompt tokens already in the state
    phase: Phase = Phase.WAITING
    live: int = 0                      # sequences still decoding
    stops: tuple[int, ...] = ()        # prompt positions where a chunk must end (a snapshot is taken there)

    @property
    def remaining(self) -> int:
        return self.prompt_len - self.position


@dataclass
class SchedulePlan:
    prefill: list[tuple[str, int]] = field(default_factory=list)   # (group id, tokens to prefill now)
    decode: list[str] = field(default_factory=list)                # groups whose live sequences decode one token

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    """Admission (FIFO, n slots per request), slot accounting and per-step budgeting."""

    def __init__(self, *, max_slots: int, prefill_chunk: int, step_token_budget: int, align: int = 0):
        self.max_slots = max_slots
        self.prefill_chunk = prefill_chunk
        self.step_token_budget = step_token_budget
        self.align = align                                   # chunks end on multiples of this (0: anywhere)
        self.waiting: deque[str] = deque()
        self.groups: OrderedDict[str, GroupState] = OrderedDict()
        self.slots_used = 0

    # -------------------------------------------------------------------------------------- admission
    @property
    def waiting_seqs(self) -> int:
        return sum(self.groups[g].n for g in self.waiting)

    @property
    def running_seqs(self) -> int:
        return sum(g.live if g.phase is Phase.DECODE else g.n
                   for g in self.groups.values() if g.phase is not Phase.WAITING)

    def add(self, group_id: str, prompt_len: int, n: int, stops: tuple[int, ...] = ()) -> None:
        """Queue a group. How many may wait is the engine's admission rule (engine/core.py), not the scheduler's;
        a group needing more than all slots could never run and is refused here."""
        if group_id in self.groups:
            raise ValueError(f"request id {group_id!r} is already in use")
        if n > self.max_slots:
            raise ValueError(f"{n} sequences can never fit in {self.max_slots} slots")
        self.groups[group_id] = GroupState(group_id, n, prompt_len, stops=tuple(sorted(stops)))
        self.waiting.append(group_id)

    def admit(self) -> list[str]:
        """Move waiting groups (oldest first, no overtaking) into PREFILL while their n slots are free."""
        admitted = []
        while self.waiting and self.groups[self.waiting[0]].n <= self.max_slots - self.slots_used:
            g = self.groups[self.waiting.popleft()]
            g.phase = Phase.PREFILL
            self.slots_used += g.n
            admitted.append(g.group_id)
        return admitted

    def skip_prompt(self, group_id: str, tokens: int) -> None:
        """Tokens already in the group's state (from the prefix cache)."""
        g = self.groups[group_id]
        g.position = min(g.prompt_len, g.position + tokens)

    # -------------------------------------------------------------------------------------- one step
    def plan(self) -> SchedulePlan:
        plan = SchedulePlan()
        budget = self.step_token_budget
        for g in self.groups.values():
            if g.phase is Phase.DECODE and g.live:
                plan.decode.append(g.group_id)
                budget -= g.live
        for g in self.groups.values():
            if budget <= 0:
                break
            if g.phase is Phase.PREFILL and g.remaining > 0:
                take = min(self.prefill_chunk, g.remaining, budget)
                stop = next((x for x in g.stops if g.position < x < g.position + take), None)
                if stop is not None:                   # a snapshot point comes first
                    take = stop - g.position
                elif self.align and take < g.remaining:
                    aligned_end = (g.position + take) // self.align * self.align
                    if aligned_end > g.position:       # end the chunk on a snapshot boundary when one is in reach
                        take = aligned_end - g.position
                plan.prefill.append((g.group_id, take))
                budget -= take
        return plan

    def prefilled(self, group_id: str, tokens: int) -> bool:
        """Record a prefilled chunk; True when the whole prompt is in the state (the group starts decoding)."""
        g = self.groups[group_id]
        g.position += tokens
        if g.position >= g.prompt_len:
            g.phase = Phase.DECODE
            g.live = g.n
            return True
        return False

    def finish_seq(self, group_id: str) -> bool:
        """One sequence of the group finished; True when the whole group is done (and removed)."""
        g = self.groups[group_id]
        g.live -= 1
        self.slots_used -= 1
        if g.live <= 0:
            del self.groups[group_id]
            return True
        return False

    def remove(self, group_id: str) -> None:
        """Drop a group wherever it is (abort or failure), returning its slots."""
        g = self.groups.pop(group_id, None)
        if g is None:
            return
        if g.phase is Phase.WAITING:
            self.waiting.remove(group_id)
        elif g.phase is Phase.PREFILL:
            self.slots_used -= g.n
        else:
            self.slots_used -= g.live
