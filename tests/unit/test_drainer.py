"""Fairness drainer on a SimClock: marking, tolerance boundary, clearing, resume bypass, faults."""

from __future__ import annotations

from lorainv.config import RuntimeConfig
from lorainv.events import DrainCleared, DrainMarked
from lorainv.impl.clock import SimClock
from lorainv.impl.drainer import Drainer, ReqInfo


def make(threshold: float = 5.0, **kw) -> tuple[Drainer, SimClock]:
    clock = SimClock()
    return Drainer(RuntimeConfig(lora_drain_wait_threshold=threshold, **kw), clock), clock


RUNNING = [ReqInfo("r1", "a", 0.0, 10), ReqInfo("r2", "a", 0.0, 3), ReqInfo("r3", "b", 0.0, 4)]
WAITING = [ReqInfo("w1", "c", 0.0, 8)]


def test_marks_running_adapter_with_fewest_remaining():
    d, clock = make()
    assert d.enabled
    clock.advance(6.0)
    assert d.update(WAITING, RUNNING, slots_full=True) == [DrainMarked(adapter="b", for_adapter="c")]
    assert d.marks == {"b": "c"}
    assert d.update(WAITING, RUNNING, slots_full=True) == []  # at most one drainer for c
    assert d.marks == {"b": "c"}


def test_no_mark_at_threshold_or_when_slots_free():
    d, clock = make()
    clock.advance(5.0)
    assert d.update(WAITING, RUNNING, slots_full=True) == []  # waited exactly 5.0: not > threshold
    clock.advance(1.0)
    assert d.update(WAITING, RUNNING, slots_full=False) == [] and d.marks == {}
    # a waiting adapter that also runs is not starving
    assert d.update([ReqInfo("w2", "a", 0.0, 8)], RUNNING, slots_full=True) == []


def test_tolerance_boundary_1_2():
    d, clock = make()
    clock.advance(6.0)
    running = [ReqInfo("r1", "a", 0.0, 10), ReqInfo("r3", "b", 0.0, 10), ReqInfo("r4", "b", 0.0, 7)]
    d.update(WAITING, running, slots_full=True)
    assert d.marks == {"a": "c"}  # tie on max remaining (10): deterministic, by name
    assert d.admits("a", 12) and not d.admits("a", 13)  # 1.2 x 10 = 12
    assert d.admits("b", 10_000)  # not draining


def test_clears_when_no_running_requests():
    d, clock = make()
    clock.advance(6.0)
    d.update(WAITING, RUNNING, slots_full=True)
    assert not d.admits("b", 100)
    still = [r for r in RUNNING if r.adapter != "b"]
    assert d.update(WAITING, still, slots_full=False) == [DrainCleared(adapter="b")]
    assert d.marks == {} and d.admits("b", 100)


def test_starving_adapter_can_get_a_new_drainer_after_clear():
    d, clock = make()
    clock.advance(6.0)
    d.update(WAITING, RUNNING, slots_full=True)
    still = [r for r in RUNNING if r.adapter != "b"]
    assert d.update(WAITING, still, slots_full=True) == [
        DrainCleared(adapter="b"),
        DrainMarked(adapter="a", for_adapter="c"),
    ]


def test_two_starving_adapters_get_distinct_drainers_longest_wait_first():
    d, clock = make()
    clock.advance(10.0)
    waiting = [ReqInfo("w1", "c", 4.0, 8), ReqInfo("w2", "e", 1.0, 8), ReqInfo("w3", None, 2.0, 1)]
    ev = d.update(waiting, RUNNING, slots_full=True)
    assert ev == [DrainMarked(adapter="b", for_adapter="e"), DrainMarked(adapter="a", for_adapter=None)]
    assert d.marks == {"b": "e", "a": None}
    assert d.stats()["c"] == {"waiting": 1, "max_wait": 6.0, "max_remaining": 0}
    assert d.stats()["a"] == {"waiting": 0, "max_wait": 0.0, "max_remaining": 10}


def test_resuming_chunk_bypasses_the_drain():
    d, clock = make()
    clock.advance(6.0)
    d.update(WAITING, RUNNING, slots_full=True)
    assert not d.admits("b", 1000)
    assert d.admits("b", 1000, resuming_chunk=True)


def test_off_when_threshold_zero():
    d, clock = make(threshold=0.0)
    assert not d.enabled
    clock.advance(1e6)
    assert d.update(WAITING, RUNNING, slots_full=True) == [] and d.marks == {}
    assert d.admits("b", 10**9)


def test_fault_drainer_never_clears_blocks_forever():
    d, clock = make(faults={"drainer_never_clears"})
    clock.advance(6.0)
    d.update(WAITING, RUNNING, slots_full=True)
    for _ in range(3):
        assert d.update([], [], slots_full=False) == []
    assert d.marks == {"b": "c"}
    assert not d.admits("b", 1)  # no running request left to bound it: blocked forever
