"""Fairness drainer on a SimClock, both policies: who is marked, when marks clear, slot
reservations, the preemption quantum, one drain at a time, faults."""

from __future__ import annotations

from lorainv.config import RuntimeConfig
from lorainv.events import DrainCleared, DrainMarked, ReservationEnded, SlotReserved
from lorainv.impl.clock import SimClock
from lorainv.impl.drainer import Drainer, ReqInfo


def make(threshold: float = 5.0, **kw) -> tuple[Drainer, SimClock]:
    clock = SimClock()
    return Drainer(RuntimeConfig(lora_drain_wait_threshold=threshold, **kw), clock), clock


def admission(threshold: float = 5.0, **kw) -> tuple[Drainer, SimClock]:
    return make(threshold, lora_drain_policy="admission", **kw)


# a runs two requests (10 and 3 tokens left), b one (4 left); c waits since t=0
RUNNING = [ReqInfo("r1", "a", 0.0, 10, True), ReqInfo("r2", "a", 0.0, 3, True), ReqInfo("r3", "b", 0.0, 4, True)]
WAITING = [ReqInfo("w1", "c", 0.0, 8)]


def without(adapter: str, reqs: list[ReqInfo]) -> list[ReqInfo]:
    return [r for r in reqs if r.adapter != adapter]


# -- admission policy -------------------------------------------------------------------------
def test_admission_marks_running_adapter_with_fewest_remaining():
    d, clock = admission()
    assert d.enabled and not d.preempt
    clock.advance(6.0)
    assert d.update(WAITING, RUNNING, slots_full=True) == [DrainMarked(adapter="b", for_adapter="c")]
    assert d.marks == {"b": "c"}
    assert d.update(WAITING, RUNNING, slots_full=True) == []  # at most one drainer for c
    assert d.marks == {"b": "c"} and d.preempt_due() == []  # this policy never preempts


def test_no_mark_at_threshold_or_when_slots_free():
    for d, clock in (admission(), make()):
        clock.advance(5.0)
        assert d.update(WAITING, RUNNING, slots_full=True) == []  # waited exactly 5.0: not > threshold
        clock.advance(1.0)
        assert d.update(WAITING, RUNNING, slots_full=False) == [] and d.marks == {}
        # a waiting adapter that also runs, or whose load is in flight, is not starving
        assert d.update([ReqInfo("w2", "a", 0.0, 8)], RUNNING, slots_full=True) == []
        assert d.update(WAITING, RUNNING, slots_full=True, loading={"c"}) == []


def test_wait_counts_from_the_last_time_a_request_entered_the_queue():
    d, clock = make()
    clock.advance(6.0)
    retracted = [ReqInfo("w1", "c", 2.0, 8)]  # arrived at 0, retracted at 2: has waited 4 s
    assert d.update(retracted, RUNNING, slots_full=True) == []


def test_tolerance_boundary_1_2():
    d, clock = admission()
    clock.advance(6.0)
    running = [ReqInfo("r1", "a", 0.0, 10), ReqInfo("r3", "b", 0.0, 10), ReqInfo("r4", "b", 0.0, 7)]
    d.update(WAITING, running, slots_full=True)
    assert d.marks == {"a": "c"}  # tie on max remaining (10): deterministic, by name
    assert d.admits("a", 12) and not d.admits("a", 13)  # 1.2 x 10 = 12
    assert d.admits("b", 10_000)  # not draining


def test_clear_reserves_the_freed_slot_until_the_starving_adapter_is_admitted():
    d, clock = admission()
    clock.advance(6.0)
    d.update(WAITING, RUNNING, slots_full=True)
    assert not d.admits("b", 100)
    still = without("b", RUNNING)
    assert d.update(WAITING, still, slots_full=False) == [DrainCleared(adapter="b"), SlotReserved(adapter="c")]
    assert d.marks == {} and d.reserved == {"c"} and d.admits("b", 100)
    assert d.update(WAITING, still, slots_full=True) == []  # c holds a reservation: no new drain for it
    assert d.end_reservation("c", "admitted") == [ReservationEnded(adapter="c", reason="admitted")]
    assert d.reserved == set() and d.end_reservation("c", "admitted") == []


def test_reservation_ends_when_nothing_of_the_adapter_waits_any_more():
    d, clock = admission()
    clock.advance(6.0)
    d.update(WAITING, RUNNING, slots_full=True)
    d.update(WAITING, without("b", RUNNING), slots_full=False)
    assert d.update([], without("b", RUNNING), slots_full=False) == [ReservationEnded(adapter="c", reason="gone")]
    assert d.reserved == set()


def test_mark_clears_without_reservation_when_the_starving_adapter_gives_up():
    d, clock = admission()
    clock.advance(6.0)
    d.update(WAITING, RUNNING, slots_full=True)
    assert d.update([], RUNNING, slots_full=False) == [DrainCleared(adapter="b")]  # c's requests were aborted
    assert d.marks == {} and d.reserved == set()


def test_admission_two_starving_adapters_get_distinct_drainers_longest_wait_first():
    d, clock = admission()
    clock.advance(10.0)
    waiting = [ReqInfo("w1", "c", 4.0, 8), ReqInfo("w2", "e", 1.0, 8), ReqInfo("w3", None, 2.0, 1)]
    ev = d.update(waiting, RUNNING, slots_full=True)
    assert ev == [DrainMarked(adapter="b", for_adapter="e"), DrainMarked(adapter="a", for_adapter=None)]
    assert d.marks == {"b": "e", "a": None}


def test_off_when_threshold_zero():
    d, clock = make(threshold=0.0)
    assert not d.enabled
    clock.advance(1e6)
    assert d.update(WAITING, RUNNING, slots_full=True) == [] and d.marks == {}
    assert d.admits("b", 10**9)


def test_fault_drainer_never_clears_blocks_forever():
    d, clock = admission(faults={"drainer_never_clears"})
    clock.advance(6.0)
    d.update(WAITING, RUNNING, slots_full=True)
    for _ in range(3):
        assert d.update([], [], slots_full=False) == []
    assert d.marks == {"b": "c"}
    assert not d.admits("b", 1)  # no running request left to bound it: blocked forever


# -- preempt policy (the default) ---------------------------------------------------------------
def test_preempt_marks_the_adapter_with_least_demand_not_least_work():
    d, clock = make()
    assert d.preempt and d.quantum == 5.0  # the quantum defaults to the wait threshold
    clock.advance(6.0)
    running = [ReqInfo("r1", "a", 0.0, 2, True), ReqInfo("r2", "a", 0.0, 3, True), ReqInfo("r3", "b", 0.0, 40, True)]
    # a has less work left, but two requests (and one more waiting): b, with one, gives way
    waiting = [*WAITING, ReqInfo("w2", "a", 5.5, 8)]
    assert d.update(waiting, running, slots_full=True) == [DrainMarked(adapter="b", for_adapter="c")]
    assert not d.admits("b", 1)  # a draining adapter admits nothing under preempt
    assert d.admits("a", 10**6)


def test_preempt_waits_for_the_quantum_since_the_victims_oldest_admission():
    d, clock = make(threshold=1.0, lora_drain_quantum=3.0)
    clock.advance(2.0)
    assert d.update(WAITING, RUNNING, slots_full=True) == [DrainMarked(adapter="b", for_adapter="c")]
    assert d.preempt_due() == []  # b's request was admitted at 0: 2 s < 3 s
    clock.advance(1.0)
    d.update(WAITING, RUNNING, slots_full=True)
    assert d.preempt_due() == ["b"]


def test_preempt_prefers_a_victim_whose_quantum_is_over():
    d, clock = make(threshold=1.0, lora_drain_quantum=3.0)
    clock.advance(3.5)
    # one request each (equal demand); b has less work left but was admitted only 1 s ago
    running = [ReqInfo("r1", "a", 0.0, 10, True), ReqInfo("r3", "b", 2.5, 4, True)]
    assert d.update(WAITING, running, slots_full=True) == [DrainMarked(adapter="a", for_adapter="c")]
    assert d.preempt_due() == ["a"]


def test_preempt_runs_one_drain_at_a_time():
    d, clock = make()
    clock.advance(10.0)
    waiting = [ReqInfo("w1", "c", 4.0, 8), ReqInfo("w2", "e", 1.0, 8)]
    assert d.update(waiting, RUNNING, slots_full=True) == [DrainMarked(adapter="b", for_adapter="e")]
    still = without("b", RUNNING)
    # b stopped: its slot is e's; c waits for the next drain until e got in
    assert d.update(waiting, still, slots_full=True) == [DrainCleared(adapter="b"), SlotReserved(adapter="e")]
    assert d.update(waiting, still, slots_full=True) == []
    d.end_reservation("e", "admitted")
    running = [*still, ReqInfo("r9", "e", 0.0, 5, False)]
    assert d.update(waiting[:1], running, slots_full=True) == [DrainMarked(adapter="e", for_adapter="c")]


def test_preempt_with_no_preemptible_request_still_drains_softly():
    d, clock = make(threshold=1.0)
    stuck = [ReqInfo("r1", "a", 0.0, 9, False)]
    clock.advance(2.0)
    assert d.update(WAITING, stuck, slots_full=True) == [DrainMarked(adapter="a", for_adapter="c")]
    assert d.preempt_due() == ["a"] and not d.admits("a", 1)  # the scheduler finds nothing to retract
