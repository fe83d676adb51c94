"""Scheduler policy alone (no torch): admission, budgets, interleaving, alignment, removal."""

import pytest

from engine.scheduler import Phase, Scheduler


def make(**kw):
    args = dict(max_slots=4, prefill_chunk=64, step_token_budget=100)
    args.update(kw)
    return Scheduler(**args)


def test_scheduler_imports_no_torch():
    import engine.scheduler as mod
    assert "torch" not in mod.__dict__
    src = open(mod.__file__).read()
    assert "import torch" not in src


def test_fifo_admission_by_slots():
    s = make()
    s.add("a", 10, n=2)
    s.add("b", 10, n=3)
    s.add("c", 10, n=1)
    assert s.admit() == ["a"]            # b needs 3 slots, only 2 free: it waits, and c does not overtake it
    assert s.waiting_seqs == 4 and s.slots_used == 2
    s.remove("a")
    assert s.admit() == ["b", "c"]
    assert s.slots_used == 4


def test_duplicates_and_impossible_groups():
    """How many may wait is the engine's admission rule (tests/test_engine.py), not the scheduler's."""
    s = make()
    s.add("a", 5, n=2)
    assert s.waiting_seqs == 2
    with pytest.raises(ValueError, match="already in use"):
        s.add("a", 5, n=1)
    with pytest.raises(ValueError, match="never fit"):
        s.add("b", 5, n=5)               # more than all slots can never be admitted
    s.admit()
    assert s.waiting_seqs == 0 and s.groups["a"].phase is Phase.PREFILL


def test_decode_first_then_prefill_under_budget():
    s = make(max_slots=8, step_token_budget=100, prefill_chunk=64)
    s.add("run", 3, n=3)
    s.admit()
    assert s.plan().prefill == [("run", 3)]
    assert s.prefilled("run", 3) is True and s.groups["run"].phase is Phase.DECODE
    s.add("long", 1000, n=1)
    s.add("short", 50, n=1)
    s.admit()
    plan = s.plan()
    assert plan.decode == ["run"]
    assert plan.prefill == [("long", 64), ("short", 33)]    # 100 - 3 decode tokens, oldest first
    # every step of the long prompt still decodes the running group
    steps = 0
    while s.groups["long"].phase is Phase.PREFILL:
        plan = s.plan()
        assert "run" in plan.decode
        for gid, n in plan.prefill:
            s.prefilled(gid, n)
        steps += 1
    assert steps == 16                                         # ceil(1000 / 64)


def chunk_ends(stops=()) -> list[int]:
    """Where the chunks of one 300-token prompt end (chunks of 100, aligned to 64)."""
    s = make(prefill_chunk=100, step_token_budget=1000, align=64)
    s.add("a", 300, n=1, stops=stops)
    s.admit()
    ends = []
    while s.groups["a"].phase is Phase.PREFILL:
        (gid, n), = s.plan().prefill
        s.prefilled(gid, n)
        ends.append(s.groups["a"].position)
    return ends


def test_chunks_end_on_alignment_boundaries():
    assert chunk_ends() == [64, 128, 192, 256, 300]


def test_chunks_end_at_snapshot_points_before_alignment():
    assert chunk_ends(stops=(30, 150)) == [30, 128, 150, 192, 256, 300]


def test_finish_and_remove_return_slots():
    s = make()
    s.add("a", 4, n=2)
    s.admit()
    s.prefilled("a", 4)
    assert s.running_seqs == 2
    assert s.finish_seq("a") is False
    assert s.finish_seq("a") is True
    assert s.slots_used == 0 and not s.groups
    s.add("b", 4, n=1)
    s.remove("b")                                              # removal while waiting
    assert not s.waiting and s.slots_used == 0


def test_skip_prompt_from_cache():
    s = make()
    s.add("a", 300, n=1)
    s.admit()
    s.skip_prompt("a", 256)
    assert s.plan().prefill == [("a", 44)]
