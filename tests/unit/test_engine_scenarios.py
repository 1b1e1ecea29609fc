"""Engine + scheduler scenarios (issue #5), each run at strict level 2 with the reference
model in lockstep (`engine_util.Driver`): exact events, states and token counts, and every
scenario ends idle at the pool baseline (liveness + leak check)."""

from __future__ import annotations

import numpy as np
import pytest
from engine_util import Driver, config, of, state_key

from lorainv.errors import InvariantViolation, LorainvError, RequestError
from lorainv.events import (
    Aborted,
    AdapterUnregistered,
    BatchFormed,
    CacheEvicted,
    CacheInserted,
    DrainCleared,
    DrainMarked,
    Evicted,
    Finished,
    Idle,
    LoadCompleted,
    LoadStarted,
    Pinned,
    PrefixHit,
    ReservationEnded,
    Retracted,
    Scheduled,
    SessionClosed,
    SessionRestored,
    SessionSaved,
    SlotReserved,
)
from lorainv.ops import AddRequest

A, B, C = "gen:4:1", "gen:8:2", "gen:4:3"


def _ints(a: np.ndarray) -> set[int]:
    return {int(x) for x in np.asarray(a).tolist()}


def _loaded(d: Driver, *names: str) -> Driver:
    for n in names:
        d.load(n, {"a": A, "b": B, "c": C}[n])
    return d


# -- overlap loads: cancel every request of a loading adapter --------------------------------
def _overlap(**kw: object) -> Driver:
    cfg = config(network="dummy", enable_lora_overlap_loading=True, device="sim", max_loras_per_batch=2, **kw)
    return _loaded(Driver(cfg), "a", "b", "c")


def _cancel_all_loading(d: Driver) -> None:
    d.add("r0", [1, 2, 3], "a", 3)
    d.add("r1", [4, 5], "a", 3)
    d.add("r2", [6, 7], "b", 3)
    assert d.step() == [LoadStarted("a", 0, True), LoadStarted("b", 1, True)]
    assert d.step() == [Idle()]  # both loads in flight: nothing may run
    for rid in ("r0", "r1", "r2"):
        assert d.abort(rid) == [Aborted(rid, "waiting")]


def test_cancel_every_request_of_loading_adapters_then_reuse_the_slot() -> None:
    d = _overlap()
    _cancel_all_loading(d)
    assert [(ld.uid, ld.slot, ld.done) for ld in d.engine.snapshot().lora.loads] == [("a", 0, False), ("b", 1, False)]
    ev = d.complete()
    assert ev[0].kind == "TransfersCompleted" and ev[0].completed > 0
    assert ev[1:] == [LoadCompleted("a", 0), LoadCompleted("b", 1)]
    lora = d.engine.snapshot().lora
    assert lora.loads == () and lora.ready == {"a", "b"} and lora.uid_to_slot == (("a", 0), ("b", 1))

    d.add("r3", [7, 8, 9], "c", 3)
    # the reaped, now idle slot 0 (least recently used) is reused; no stale entry blocks it
    assert d.step() == [Evicted("a", 0), LoadStarted("c", 0, True)]
    assert d.step() == [Idle()]
    assert d.complete()[1:] == [LoadCompleted("c", 0)]
    ev = d.step()
    assert ev[:2] == [BatchFormed("prefill", ("r3",), ("c",), 1), Scheduled("r3", 3, True)]
    assert d.engine.snapshot().lora.last_batch_slots == (0,)
    d.finish()
    assert d.engine.request_stats("r3")["reason"] == "length" and len(d.engine.output("r3")) == 3
    assert [e for e in d.events if e.kind in ("LoadStarted", "LoadCompleted", "Evicted")] == [
        LoadStarted("a", 0, True),
        LoadStarted("b", 1, True),
        LoadCompleted("a", 0),
        LoadCompleted("b", 1),
        Evicted("a", 0),
        LoadStarted("c", 0, True),
        LoadCompleted("c", 0),
    ]


def test_unload_with_a_load_in_flight_is_refused_and_changes_nothing() -> None:
    d = _overlap()
    d.add("r0", [1, 2], "a", 2)
    d.step()
    d.abort("r0")
    before = state_key(d.engine.snapshot())
    with pytest.raises(RequestError, match="load in flight"):
        d.engine.unload_adapter("a")
    assert state_key(d.engine.snapshot()) == before
    d.complete()
    assert d.unload("a") == [Evicted("a", 0), AdapterUnregistered("a")]
    d.finish()


def test_cancelled_loads_are_caught_under_fault_stale_overlap_event() -> None:
    d = _overlap(faults=frozenset({"stale_overlap_event"}))
    _cancel_all_loading(d)
    with pytest.raises(InvariantViolation, match="completed but was never reaped"):
        d.engine.complete_transfers()


def test_pin_never_evicts_the_adapter_of_the_staged_chunk() -> None:
    cfg = config(network="dummy", max_loras_per_batch=2, chunked_prefill_size=2, lora_eviction_policy="fifo")
    d = _loaded(Driver(cfg), "a", "b", "c")
    d.add("ra", [1, 2, 3, 4, 5, 6, 7, 8], "a", 2)
    d.step()
    assert d.engine.snapshot().staged == "ra" and d.state("ra") == "prefilling"
    assert d.engine.pin_adapter("b")[-1] == Pinned("b")  # loads b into slot 1 now
    d.engine.unpin_adapter("b")
    # FIFO would pick `a` (loaded first), but the staged chunk still needs it
    ev = d.engine.pin_adapter("c")
    assert ev == [Evicted("b", 1), LoadStarted("c", 1, False), LoadCompleted("c", 1), Pinned("c")]
    d.finish()
    assert d.engine.status("ra") == "finished"
    assert of(d.events, Scheduled) == [Scheduled("ra", 2, False)] * 3 + [Scheduled("ra", 2, True)]


# -- the fairness drainer ----------------------------------------------------------------------
def _drain_setup(**kw: object) -> Driver:
    kw.setdefault("lora_drain_policy", "admission")
    d = _loaded(Driver(config(network="dummy", max_loras_per_batch=2, **kw)), "a", "b", "c")
    d.add("ra", [1, 2, 3], "a", 4)
    d.add("rb", [4, 5], "b", 12)
    d.step()
    d.add("rc", [6, 7], "c", 3)  # both slots busy with running a and b: c starves
    d.step()
    d.advance(1.5)
    d.add("ra2", [1, 2, 3], "a", 10)
    return d


def test_drainer_marks_then_clears_and_the_starving_adapter_runs() -> None:
    d = _drain_setup(lora_drain_wait_threshold=1.0)
    ev = d.step()
    assert ev[0] == DrainMarked("a", "c")  # a has the least remaining work
    assert of(ev, Scheduled) == []  # ra2 (long, on the draining adapter) is held back
    assert d.engine.snapshot().drainer.marks == (("a", "c"),)
    ev = d.step()
    assert [e for e in ev if e.kind in ("Finished", "DrainCleared", "SlotReserved")] == [
        Finished("ra", "length"),
        DrainCleared("a"),
        SlotReserved("c"),  # a's slot is c's now, whatever else queued before c
    ]
    assert d.engine.snapshot().drainer.marks == () and d.engine.snapshot().drainer.reserved == ("c",)
    ev = d.step()
    assert ev[:4] == [
        Evicted("a", 0),
        LoadStarted("c", 0, False),
        LoadCompleted("c", 0),
        ReservationEnded("c", "admitted"),
    ]
    assert ev[4] == BatchFormed("prefill", ("rc",), ("c",), 1)
    d.finish()
    order = [e.rid for e in d.events if isinstance(e, Scheduled)]
    assert order == ["ra", "rb", "rc", "ra2"]
    assert all(d.engine.status(r) == "finished" for r in ("ra", "rb", "rc", "ra2"))
    assert len(of(d.events, DrainMarked)) == 1 and len(of(d.events, DrainCleared)) == 1


def test_without_the_drainer_the_same_load_admits_the_newcomer_first() -> None:
    d = _drain_setup()  # lora_drain_wait_threshold=0: drainer off
    ev = d.step()
    assert of(ev, DrainMarked) == [] and [e.rid for e in of(ev, Scheduled)] == ["ra2"]
    d.finish()
    assert [e.rid for e in d.events if isinstance(e, Scheduled)][-1] == "rc"


def test_a_mark_that_never_clears_is_caught() -> None:
    d = _drain_setup(lora_drain_wait_threshold=1.0, faults=frozenset({"drainer_never_clears"}))
    assert d.step()[0] == DrainMarked("a", "c")
    with pytest.raises(InvariantViolation, match="still drains for 'c' with no running requests"):
        d.engine.step()


# -- preemptive drain (the default policy) --------------------------------------------------------
def _preempt_setup(**kw: object) -> Driver:
    """a and b run long requests in both slots since t=0; c has waited 1.5 s > threshold 1 s."""
    kw.setdefault("lora_drain_wait_threshold", 1.0)
    cfg = config(network="dummy", max_loras_per_batch=2, **kw)
    d = _loaded(Driver(cfg), "a", "b", "c")
    d.add("ra", [1, 2, 3], "a", 20)
    d.add("rb", [4, 5], "b", 30)
    d.step()  # prefill: one token each
    d.add("rc", [6, 7], "c", 3)
    d.step()  # decode: a and b start counting their quantum (1 s, the threshold)
    d.advance(1.5)
    return d


def test_preempt_retracts_the_victim_and_its_slot_goes_to_the_starving_adapter() -> None:
    d = _preempt_setup()
    ev = d.step()
    # equal demand (one request each): a, with less work left, gives way; ra is retracted with
    # its 2 outputs, and its older place in the queue does not get a's slot back: c's does
    assert ev[:9] == [
        DrainMarked("a", "c"),
        Retracted("ra", 2, "drain"),
        DrainCleared("a"),
        SlotReserved("c"),
        Evicted("a", 0),
        LoadStarted("c", 0, False),
        LoadCompleted("c", 0),
        ReservationEnded("c", "admitted"),
        BatchFormed("prefill", ("rc",), ("c",), 1),
    ]
    assert d.state("ra") == "waiting" and d.engine.requests["ra"].drain_retractions == 1
    d.finish()
    assert all(d.engine.status(r) == "finished" for r in ("ra", "rb", "rc"))
    off = _preempt_setup(lora_drain_wait_threshold=0.0)
    off.finish()
    assert [d.engine.output(r) for r in ("ra", "rb", "rc")] == [off.engine.output(r) for r in ("ra", "rb", "rc")]
    assert of(off.events, Retracted) == []


def test_preempt_spends_each_requests_budget_then_drains_softly() -> None:
    d = _preempt_setup(lora_drain_max_preemptions=0)
    ev = d.step()
    assert ev[0] == DrainMarked("a", "c") and of(ev, Retracted) == []  # ra may not be preempted
    assert of(ev, Scheduled) == []  # nothing new for a; c waits for a to finish
    d.finish()
    assert of(d.events, Retracted) == [] and d.engine.status("rc") == "finished"


def test_a_drain_for_an_adapter_that_gave_up_clears_without_a_reservation() -> None:
    d = _preempt_setup(lora_drain_quantum=5.0)
    assert d.step()[0] == DrainMarked("a", "c")  # marked, but a's quantum (5 s) is not over
    assert d.abort("rc") == [Aborted("rc", "waiting"), DrainCleared("a")]
    snap = d.engine.snapshot().drainer
    assert (snap.marks, snap.reserved) == ((), ())
    d.finish()
    assert of(d.events, Retracted) == []


def test_aborting_every_request_of_a_reserved_adapter_ends_the_reservation() -> None:
    d = _drain_setup(lora_drain_wait_threshold=1.0)  # admission policy: the slot frees when ra ends
    d.step()
    assert SlotReserved("c") in d.step()
    assert d.abort("rc") == [Aborted("rc", "waiting"), ReservationEnded("c", "gone")]  # no slot leaks to c
    assert d.engine.snapshot().drainer.reserved == ()
    ev = d.step()
    assert [e.rid for e in of(ev, Scheduled)] == ["ra2"]  # a's slot is free for anyone again
    d.finish()


def test_overlap_load_of_the_reserved_adapter_ends_its_reservation() -> None:
    cfg = config(
        network="dummy",
        max_loras_per_batch=2,
        lora_drain_wait_threshold=1.0,
        enable_lora_overlap_loading=True,
        device="sim",
    )
    d = _loaded(Driver(cfg), "a", "b", "c")
    d.add("ra", [1, 2, 3], "a", 20)
    d.add("rb", [4, 5], "b", 30)
    for _ in range(3):  # start both loads, land them, prefill
        d.complete()
        d.step()
    assert d.state("ra") == d.state("rb") == "decoding"
    d.add("rc", [6, 7], "c", 3)
    d.advance(1.5)
    ev = d.step()
    assert ev[:7] == [
        DrainMarked("a", "c"),
        Retracted("ra", 2, "drain"),
        DrainCleared("a"),
        SlotReserved("c"),
        Evicted("a", 0),
        LoadStarted("c", 0, True),
        ReservationEnded("c", "admitted"),  # c is active once its load is in flight
    ]
    d.finish()
    assert d.engine.status("rc") == "finished"


# -- retiring ended requests ---------------------------------------------------------------------
def test_max_finished_requests_retires_the_oldest_ended_requests() -> None:
    d = _loaded(Driver(config(network="dummy", max_finished_requests=2)), "a")
    for i in range(3):
        d.add(f"q{i}", [1, 2, i], "a", 2)
    d.abort("q1")  # ends first: aborted while waiting
    d.add("q3", [4, 5], None, 3)
    d.finish()  # the model retires the same requests (refinement is checked after every op)
    ended = [e.rid for _, ev in d.log for e in ev if isinstance(e, (Finished, Aborted))]
    assert ended == ["q1", "q0", "q2", "q3"]
    assert set(d.engine.requests) == {"q2", "q3"} and set(d.model.s.reqs) == {"q2", "q3"}
    assert d.engine.status("q3") == "finished" and len(d.engine.output("q3")) == 3
    with pytest.raises(RequestError, match=r"request 'q0' ended and was retired \(max_finished_requests=2\)"):
        d.engine.output("q0")
    before = d.engine.snapshot()
    ev = d.engine.apply(AddRequest("q1", (1,), None, 1))  # a retired id stays used
    assert [e.kind for e in ev] == ["Rejected"] and "already used" in ev[0].message
    assert state_key(d.engine.snapshot()) == state_key(before)
    with pytest.raises(RequestError, match="max_finished_requests=2: outputs would be retired unread"):
        d.engine.generate([[1], [2], [3]])


# -- sessions ------------------------------------------------------------------------------------
def test_session_turn_aborted_mid_chunk_keeps_the_previous_kv() -> None:
    d = _loaded(Driver(config(max_total_tokens=64, page_size=2, chunked_prefill_size=3)), "a")
    d.open("s")
    d.add("t1", [1, 2, 3, 4], "a", 2, "s")
    ev = d.run_to_idle()
    assert SessionSaved("s", "t1", 5) in ev  # 4 prompt + 2 output, the last output has no KV yet
    s1 = d.engine.snapshot()
    (slot,) = s1.sessions
    kept, row = _ints(slot.indices), slot.row
    assert len(kept) == 6 and slot.kv_len == 5 and not slot.is_active
    assert s1.available == 64 - 6 and row not in s1.free_rows

    d.add("t2", [5, 6, 7, 8, 9, 10, 11], "a", 3, "s")
    ev = d.step()
    assert ev[0] == SessionRestored("s", "t2", 5)
    assert Scheduled("t2", 3, False) in ev and d.state("t2") == "prefilling"
    t2 = d.req("t2")
    assert t2.row == row and t2.session_alloc == 6 and _ints(t2.indices[:6]) == kept and len(t2.indices) == 8
    assert d.abort("t2") == [Aborted("t2", "prefilling")]

    s2 = d.engine.snapshot()
    (slot,) = s2.sessions
    assert (_ints(slot.indices), slot.row, slot.kv_len, slot.is_active) == (kept, row, 5, False)
    assert s2.available == s1.available and _ints(s2.free_indices) == _ints(s1.free_indices)
    assert s2.free_rows == s1.free_rows

    d.add("t3", [12, 13], "a", 3, "s")
    ev = d.run_to_idle()
    assert SessionRestored("s", "t3", 5) in ev and SessionSaved("s", "t3", 10) in ev
    history = [1, 2, 3, 4, *d.engine.output("t1")]
    assert d.engine.output("t3") == d.isolated([*history, 12, 13], "a", 3)
    (slot,) = d.engine.snapshot().sessions
    held = _ints(slot.indices)
    assert kept < held and len(held) == 10
    before = d.engine.snapshot()
    assert d.close("s") == [SessionClosed("s", 10)]
    after = d.engine.snapshot()
    assert _ints(after.free_indices) == _ints(before.free_indices) | held
    assert set(after.free_rows) == {*before.free_rows, row}
    d.finish()


def test_close_session_aborts_its_live_turn_first() -> None:
    d = _loaded(Driver(config(network="dummy", chunked_prefill_size=2)), "a")
    d.open("s")
    d.add("t1", [1, 2, 3, 4, 5], "a", 2, "s")
    d.step()
    assert d.state("t1") == "prefilling"
    assert d.close("s") == [Aborted("t1", "prefilling"), SessionClosed("s", 0)]
    d.finish()


# -- aborts in every state ---------------------------------------------------------------------------
def _abort_frees_exactly(d: Driver, rid: str, state: str) -> None:
    before = d.engine.snapshot()
    r = d.req(rid)
    assert r.state == ("waiting" if state == "loading" else state.split("/")[0])
    own = _ints(r.indices[max(r.cache_len, r.session_alloc) :])
    row = {r.row} if r.own_row else set()
    assert d.abort(rid) == [Aborted(rid, r.state)]
    after = d.engine.snapshot()
    assert _ints(after.free_indices) == _ints(before.free_indices) | own
    assert not own & _ints(before.free_indices)
    assert after.available == before.available + len(own)
    assert set(after.free_rows) == set(before.free_rows) | row
    assert after.evictable + after.protected == before.evictable + before.protected
    gone = d.req(rid)
    assert (gone.state, gone.row, len(gone.indices)) == ("aborted", None, 0)
    with pytest.raises(RequestError, match="already ended"):
        d.engine.abort(rid)


@pytest.mark.parametrize("state", ["waiting", "loading", "prefilling", "decoding", "decoding/last", "decoding/hit"])
def test_abort_in_each_state_frees_exactly_what_it_held(state: str) -> None:
    d = _overlap(page_size=2, chunked_prefill_size=3, max_total_tokens=64)
    if state != "loading":
        d.add("warm", [9, 9, 9, 9, 9, 9], "a", 2)  # makes `a` resident and fills the prefix cache
        d.run_to_idle()
        assert d.engine.snapshot().evictable == 6
    prompt = [9, 9, 9, 9, 9, 9] if state == "decoding/hit" else [1, 2, 3, 4, 5, 6, 7, 8]
    d.add("x", prompt, "a", 4)
    if state == "loading":
        assert d.step() == [LoadStarted("a", 0, True)]
    elif state == "prefilling":
        assert d.step()[1] == Scheduled("x", 3, False)
    elif state.startswith("decoding"):
        need = 3 if state == "decoding/last" else 1
        d.step_until(lambda: d.req("x").output_len == need)
        if state == "decoding/hit":
            assert of(d.events, PrefixHit) == [PrefixHit("x", 4, "cache")] and d.req("x").cache_len == 4
    # page_size 2: a chunk of 3 holds 4; 8 prompt tokens hold 8; 10 committed tokens hold 10;
    # a 4-token cache hit plus 2 computed tokens holds 2 of its own
    held = len(d.req("x").indices) - d.req("x").cache_len
    want = {"waiting": 0, "loading": 0, "prefilling": 4, "decoding": 8, "decoding/last": 10, "decoding/hit": 2}
    assert held == want[state]
    _abort_frees_exactly(d, "x", state)
    if state == "decoding/hit":
        assert d.engine.snapshot().protected == 0  # the borrowed prefix is unlocked, not freed
    if state == "loading":
        assert [ld.uid for ld in d.engine.snapshot().lora.loads] == ["a"]  # the load itself goes on
        assert d.complete()[1:] == [LoadCompleted("a", 0)]
    d.finish()
    assert d.engine.request_stats("x")["reason"] == "abort"


def test_abort_unknown_and_ended_requests_is_a_request_error() -> None:
    d = Driver(config(network="dummy"))
    d.add("r0", [1, 2], None, 1)
    d.finish()
    for rid in ("nope", "r0"):
        with pytest.raises(RequestError):
            d.engine.abort(rid)
    d.abort("r0")  # through apply: a Rejected event, the model agrees nothing changed
    assert d.log[-1][1][0].kind == "Rejected" and d.log[-1][1][0].error == "RequestError"


# -- LoRA segments -------------------------------------------------------------------------------
def _segments(faults: frozenset[str] = frozenset()) -> Driver:
    d = _loaded(Driver(config(network="dummy", faults=faults)), "a", "b")
    d.add("r0", [1, 2], "a")
    d.add("r1", [3, 4, 5], "a")
    d.add("r2", [6], "b")
    return d


def test_consecutive_requests_on_one_adapter_share_a_segment() -> None:
    d = _segments()
    ev = d.step()
    assert of(ev, BatchFormed) == [BatchFormed("prefill", ("r0", "r1", "r2"), ("a", "a", "b"), 2)]
    assert of(d.step(), BatchFormed) == [BatchFormed("decode", ("r0", "r1", "r2"), ("a", "a", "b"), 2)]
    d.add("r3", [7], "b")
    d.finish()
    assert all(len(d.engine.output(r)) == 4 for r in ("r0", "r1", "r2", "r3"))


def test_segments_from_batch_size_crashes_on_the_same_batch() -> None:
    d = _segments(frozenset({"segments_from_batch_size"}))
    with pytest.raises(RuntimeError, match="exceeds dimension size") as info:
        d.engine.step()
    assert type(info.value) is RuntimeError and not isinstance(info.value, LorainvError)
    assert str(info.traceback[-1].path).endswith("batch.py")


def test_segments_fault_is_harmless_without_consecutive_repeats() -> None:
    d = _loaded(Driver(config(network="dummy", faults=frozenset({"segments_from_batch_size"}))), "a", "b")
    d.add("r0", [1, 2], "a", 2)
    d.add("r1", [3], "b", 2)
    assert of(d.step(), BatchFormed)[0].num_segments == 2
    d.finish()


# -- prefix cache -------------------------------------------------------------------------------
def test_prefix_hit_only_on_the_same_adapter() -> None:
    d = _loaded(Driver(config(max_total_tokens=128)), "a", "b")
    p = [3, 1, 4, 1, 5, 9, 2, 6]
    d.add("r0", p, "a", 3)
    ev = d.run_to_idle()
    assert CacheInserted("r0", 10) in ev  # 8 prompt + 2 outputs have KV
    d.add("r1", p, "a", 3)
    ev = d.run_to_idle()
    assert PrefixHit("r1", 7, "cache") in ev and Scheduled("r1", 1, True) in ev
    assert not of(ev, CacheInserted)  # everything it could insert is cached already
    d.add("r2", p, "b", 3)
    ev = d.run_to_idle()
    assert of(ev, PrefixHit) == [] and Scheduled("r2", 8, True) in ev
    assert d.engine.output("r1") == d.engine.output("r0") == d.isolated(p, "a", 3)
    assert d.engine.output("r2") == d.isolated(p, "b", 3)
    d.finish()
    assert d.engine.snapshot().evictable == 20


# -- a request that can never fit ---------------------------------------------------------------
def test_request_that_never_fits_alone_is_ended_not_crashed() -> None:
    d = Driver(config(network="dummy", max_total_tokens=16))
    d.add("big", list(range(1, 11)), None, 10)  # 10 + 10 - 1 = 19 tokens of KV > 16
    d.add("ok", [1, 2], None, 2)
    ev = d.step()
    assert ev[0] == Finished("big", "abort", "does not fit: needs more KV than max_total_tokens")
    assert "does not fit" in d.engine.request_stats("big")["detail"]
    d.finish()
    assert d.engine.status("ok") == "finished" and len(d.engine.output("ok")) == 2


def test_request_blocked_by_session_memory_is_ended_with_does_not_fit() -> None:
    d = Driver(config(network="dummy", max_total_tokens=16))
    d.open("s")
    d.add("t1", list(range(1, 11)), None, 1, "s")
    d.run_to_idle()
    assert d.engine.snapshot().session_held == 10
    d.add("r", list(range(1, 9)), None, 2)  # fits an empty pool (9 tokens) but not the 6 left
    ev = d.step()
    (fin,) = of(ev, Finished)
    assert (fin.rid, fin.reason) == ("r", "abort")
    assert "does not fit" in fin.detail and "sessions hold 10" in fin.detail
    d.finish()
    assert d.engine.snapshot().session_held == 10


def test_retraction_storm_on_a_tiny_pool_fast() -> None:
    d = Driver(config(network="dummy", max_total_tokens=24, page_size=2))
    prompts = {f"r{i}": [i + 1] * (3 + i % 2) for i in range(6)}
    for rid, p in prompts.items():
        d.add(rid, p, None, 7)
    retracted: list[str] = []
    for _ in range(300):
        if d.engine.is_idle():
            break
        for e in of(d.step(), Retracted):
            r = d.req(e.rid)
            assert (r.state, r.row, len(r.indices), r.output_len) == ("waiting", None, 0, e.output_len)
            retracted.append(e.rid)
    assert retracted, "a 24-token pool must retract some of six 10-token requests"
    d.finish()
    assert all(d.engine.status(r) == "finished" and len(d.engine.output(r)) == 7 for r in prompts)
    assert of(d.events, CacheEvicted), "the prefix cache gave memory back under pressure"
