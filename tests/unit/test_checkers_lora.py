"""The LoRA-side checkers (lora L1–L6, overlap L8, drainer L10), the refinement checker and
the liveness check ``drain_to_idle``.

As in ``test_checkers.py``: a real engine in a busy state (see `checker_states.busy`:
pinned ``p``, resident ``a``/``b``, ``c`` loading; requests running on each), every checker
clean, then one corruption at a time with the exact violation asserted. Each invariant is
also broken once on a live engine, through the fault that re-creates its historic bug or a
direct edit of the engine's pool.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
from checker_states import (
    Driver,
    brief,
    busy,
    draining,
    dummy_config,
    evicting,
    req,
    with_lora,
    with_req,
)

from lorainv.checkers import run_checks
from lorainv.checkers.drainer import DrainerChecker
from lorainv.checkers.liveness import drain_to_idle
from lorainv.checkers.lora import LoraChecker
from lorainv.checkers.overlap import OverlapChecker
from lorainv.checkers.refinement import RefinementChecker
from lorainv.errors import InvariantViolation
from lorainv.events import Retracted
from lorainv.impl.lora_pool import EMPTY
from lorainv.ops import (
    Abort,
    AddRequest,
    AdvanceClock,
    CompleteTransfers,
    FailTransfers,
    LoadAdapter,
    Op,
    PinAdapter,
    Step,
    UnpinAdapter,
)
from lorainv.snapshot import EMPTY_NAME, LoadSnap, SegmentsSnap, Snapshot


@pytest.fixture(scope="module")
def drv() -> Driver:
    return busy(page_size=2)


@pytest.fixture(scope="module")
def s(drv: Driver) -> Snapshot:
    return drv.snap()


def test_busy_lora_state(s: Snapshot) -> None:
    lo = s.lora
    assert lo.slot_to_uid == ("p", "a", "b", "c") and lo.pinned == {"p"}
    assert lo.loads == (LoadSnap("c", 3, False, False),) and lo.ready == {"p", "a", "b"}
    assert (lo.last_batch, lo.last_batch_slots) == (("a",), (1,))
    for c in (LoraChecker(), OverlapChecker(), DrainerChecker()):
        assert c.check(s) == []


def faulty(fault: str, ops: list[Op], **cfg: object) -> Driver:
    """A driver with ``fault`` on; the ops run without checks (the test checks after)."""
    d = Driver(dummy_config(faults=frozenset({fault}), **cfg), check=False)
    for op in ops:
        ev = d.engine.apply(op)
        d.log.append((op, ev))
        d.model.observe(op, ev)
    return d


# -- L1: maps -----------------------------------------------------------------------------------


def test_l1_two_uids_on_one_slot(s: Snapshot) -> None:
    out = LoraChecker().check(with_lora(s, uid_to_slot=(("p", 0), ("a", 2), ("b", 2), ("c", 3))))
    assert brief(out) == [("lora", "L1", ("a",)), ("lora", "L1", (1,)), ("lora", "L3", ("a",)), ("lora", "L6", (2,))]
    assert out[0].message == "uid_to_slot['a'] = 2 but slot 2 holds 'b'"
    assert out[1].message == "slot 1 maps to 'a' but uid_to_slot = 2"


def test_l1_slot_emptied_under_a_mapped_uid(s: Snapshot) -> None:
    out = LoraChecker().check(with_lora(s, slot_to_uid=("p", "a", "b", EMPTY_NAME)))
    assert brief(out) == [("lora", "L1", ("c",)), ("lora", "L1", ())]
    assert out[0].message == "uid_to_slot['c'] = 3 but slot 3 holds '<EMPTY>'"
    assert out[1].message == "occupied 3 != mapped 4 (P=4)"


def test_l1_slot_out_of_range_is_reported_not_crashed_on(s: Snapshot) -> None:
    out = LoraChecker().check(with_lora(s, uid_to_slot=(("p", 0), ("a", 7), ("b", 2), ("c", 3))))
    assert brief(out) == [("lora", "L1", ("a",)), ("lora", "L1", (1,)), ("lora", "L3", ("a",))]
    assert out[0].message == "uid_to_slot['a'] = 7 but slot 7 holds 'out of range'"


def test_l1_slot_count_is_p(s: Snapshot) -> None:
    out = LoraChecker().check(with_lora(s, num_slots=5))
    assert brief(out) == [("lora", "L1", ())]
    assert out[0].message == "occupied 4 != mapped 4 (P=5)"


def test_l1_on_a_live_pool() -> None:
    d = busy(page_size=1)
    d.engine.pool.slot_to_uid[2] = EMPTY  # test-only corruption: b's slot forgets its tenant
    out = LoraChecker().check(d.snap())
    assert brief(out)[:2] == [("lora", "L1", ("b",)), ("lora", "L1", ())]
    d = busy(page_size=1)
    d.engine.pool.uid_to_slot["b"] = 1  # b now claims a's slot
    out = [v for v in LoraChecker().check(d.snap()) if v.invariant == "L1"]
    assert brief(out) == [("lora", "L1", ("b",)), ("lora", "L1", (2,))]
    assert out[0].message == "uid_to_slot['b'] = 1 but slot 1 holds 'a'"


# -- L2: admission bound ------------------------------------------------------------------------


def test_l2_running_staged_and_loading_within_p(s: Snapshot) -> None:
    out = LoraChecker().check(dataclasses.replace(s, max_loras_per_batch=3))
    assert brief(out) == [("lora", "L2", ("a", "b", "c", "p"))]
    assert out[0].message == "4 distinct adapters among running, staged and loading > max_loras_per_batch=3"


def test_l2_batch_bound_names_the_adapters_in_a_stable_order(s: Snapshot) -> None:
    batch = with_lora(s, last_batch=("p", "zz", "a", "c", "b", None), last_batch_slots=(0,), segments=None)
    out = LoraChecker().check(batch)
    assert brief(out) == [("lora", "L2", ("a", "b", "c", "p", "zz", None))]  # sorted by repr, as L2 above
    assert out[0].message == "a batch used more adapters than slots"


# -- L9: segment metadata ------------------------------------------------------------------------
def test_l9_busy_batch_has_one_segment_per_run(s: Snapshot) -> None:
    lo = s.lora
    n = lo.last_batch_lens[0]
    assert lo.segments == SegmentsSnap((n,), (0, n), (1,))


def test_l9_segments_are_the_runs_of_one_slot(s: Snapshot) -> None:
    # requests on slots 1, 1, 2 with 3, 2 and 4 new tokens: two segments, of 5 and 4 tokens
    mixed = with_lora(s, last_batch=("a", "a", "b"), last_batch_slots=(1, 1, 2), last_batch_lens=(3, 2, 4))
    good = with_lora(mixed, segments=SegmentsSnap((5, 4), (0, 5, 9), (1, 2)))
    assert LoraChecker().check(good) == []
    per_request = with_lora(mixed, segments=SegmentsSnap((3, 2, 4), (0, 3, 5, 9), (1, 1, 2)))  # batch size
    shifted = with_lora(mixed, segments=SegmentsSnap((5, 4), (-1, 4, 8), (1, 2)))
    swapped = with_lora(mixed, segments=SegmentsSnap((5, 4), (0, 5, 9), (2, 1)))
    for bad, field in ((per_request, "weight_indices"), (shifted, "seg_indptr"), (swapped, "weight_indices")):
        out = LoraChecker().check(bad)
        assert brief(out) == [("lora", "L9", (2,))], out
        assert field in out[0].message


def test_l9_is_found_on_a_live_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """A planted off-by-one in the offsets the Triton kernels read (the torch backend does not
    read them, so no token changes): strict level 2 stops the step that formed the batch."""
    import lorainv.impl.engine as engine_mod

    real = engine_mod.build_lora_batch_info

    def shifted(*args: object, **kw: object) -> object:
        info = real(*args, **kw)  # type: ignore[arg-type]
        return dataclasses.replace(info, seg_indptr=info.seg_indptr - 1)

    monkeypatch.setattr(engine_mod, "build_lora_batch_info", shifted)
    d = Driver(dummy_config(strict_mem_check=2), check=False)
    d.engine.apply(LoadAdapter("a", "gen:4:1"))
    d.engine.apply(AddRequest("r1", (1, 2, 3), "a", 2))
    with pytest.raises(InvariantViolation) as e:
        for _ in range(4):
            d.engine.apply(Step())
    assert ("lora", "L9") in {(v.pool, v.invariant) for v in e.value.violations}


# -- L3: readiness ------------------------------------------------------------------------------


def test_l3_running_adapter_not_resident_or_not_ready(s: Snapshot) -> None:
    out = LoraChecker().check(with_req(s, "r2", adapter="zz"))
    assert brief(out) == [("lora", "L3", ("r2",))]
    assert out[0].message == "r2 runs on adapter 'zz' that is not resident"
    out = LoraChecker().check(with_lora(s, ready=frozenset({"a", "p"})))
    assert brief(out) == [("lora", "L3", ("u2",))]
    assert out[0].message == "u2 runs on adapter 'b' that is not loaded/waited"


def test_l3_batch_read_the_wrong_slot(s: Snapshot) -> None:
    n = s.lora.last_batch_lens[0]
    out = LoraChecker().check(with_lora(s, last_batch_slots=(2,), segments=SegmentsSnap((n,), (0, n), (2,))))
    assert brief(out) == [("lora", "L3", ("a",))]
    assert out[0].message == "batch read slot 2 for 'a', which maps to 1"


def test_l3_live_adapter_evicted_under_running_requests() -> None:
    """A test-only eviction straight from the live pool, under the staged chunk of r3 and
    the decoding r1 (adapter a), which the last batch also read."""
    d = busy(page_size=1)
    d.engine.pool.evict("a")
    out = LoraChecker().check(d.snap())
    assert brief(out) == [("lora", "L3", ("r1",)), ("lora", "L3", ("r3",)), ("lora", "L3", ("a",))]
    assert [v.message for v in out] == [
        "r1 runs on adapter 'a' that is not resident",
        "r3 runs on adapter 'a' that is not resident",
        "batch read slot 1 for 'a', which maps to None",
    ]


# -- L4: pins -----------------------------------------------------------------------------------


def test_l4_pins_resident_and_at_most_p_minus_1(s: Snapshot) -> None:
    out = LoraChecker().check(with_lora(s, pinned=frozenset({"p", "ghost"})))
    assert brief(out) == [("lora", "L4", ("ghost",))]
    assert out[0].message == "pinned adapter 'ghost' is not resident"
    out = LoraChecker().check(with_lora(s, pinned=frozenset({"p", "a", "b", "c"})))
    assert brief(out) == [("lora", "L4", ("a", "b", "c", "p"))]
    assert out[0].message == "4 pinned > P-1"


# -- L5: victims --------------------------------------------------------------------------------


def test_l5_victim_in_batch_or_pinned(s: Snapshot) -> None:
    ev = evicting().snap()
    assert ev.lora.evictions == (("b", 1, frozenset({"a", "c"})),)
    assert LoraChecker().check(ev) == []
    out = LoraChecker().check(with_lora(ev, evictions=(("b", 1, frozenset({"a", "b", "c"})),)))
    assert brief(out) == [("lora", "L5", ("b",))]
    assert out[0].message == "evicted 'b' from slot 1 while in the current batch"
    out = LoraChecker().check(with_lora(s, evictions=(("p", 0, frozenset({"a"})),)))
    assert brief(out) == [("lora", "L5", ("p",))]
    assert out[0].message == "evicted 'p' from slot 0 while pinned"


def _evict_in_batch(pinned_victim: bool) -> Driver:
    """A slot loaded more recently than the running adapter's last use makes that adapter the
    LRU choice; with ``evict_in_batch_adapter`` nothing protects it (nor a pinned one)."""
    ops: list[Op] = [LoadAdapter(n, f"gen:4:{i}") for i, n in enumerate("abc")]
    if pinned_victim:
        ops = [LoadAdapter("p", "gen:2:9", pinned=True), *ops]
    ops += [AddRequest("ra", (1, 2, 3), "a", 8), Step()]
    if not pinned_victim:
        ops += [PinAdapter("b"), UnpinAdapter("b")]
    ops += [AddRequest("rc", (4, 5, 6), "c", 2), Step()]
    return faulty("evict_in_batch_adapter", ops, max_loras_per_batch=2)


def test_l5_live_eviction_of_the_running_adapter() -> None:
    d = _evict_in_batch(pinned_victim=False)
    snap = d.snap()
    assert [(v, slot) for v, slot, _ in snap.lora.evictions] == [("a", 0)]
    out = LoraChecker().check(snap)
    assert ("lora", "L5", ("a",)) in brief(out)
    assert "evicted 'a' from slot 0 while in the current batch" in [v.message for v in out]
    assert ("lora", "L3", ("ra",)) in brief(out)


def test_l5_live_eviction_of_a_pinned_adapter() -> None:
    d = _evict_in_batch(pinned_victim=True)
    out = LoraChecker().check(d.snap())
    assert brief(out) == [("lora", "L4", ("p",)), ("lora", "L5", ("p",))]
    assert out[1].message == "evicted 'p' from slot 0 while pinned"


# -- L6: hygiene --------------------------------------------------------------------------------


def test_l6_slot_contents_and_rank(s: Snapshot) -> None:
    # the busy state's readable slots: p, a, b (c is still loading, so it is not judged)
    assert {c.uid for c in s.lora.contents} == {"p", "a", "b"}
    a = next(c for c in s.lora.contents if c.uid == "a")
    held = tuple((r, "0" * 32 if r == "layer 0 qkv.A" else d) for r, d in a.held)
    bad = tuple(dataclasses.replace(c, held=held) if c.uid == "a" else c for c in s.lora.contents)
    out = LoraChecker().check(with_lora(s, contents=bad))
    assert brief(out) == [("lora", "L6", ("a", 1))]
    assert out[0].message == "slot 1 of 'a' differs from its registered weights in 1 region(s): layer 0 qkv.A"
    out = LoraChecker().check(with_lora(s, ranks=(2, 8, 8, 2)))
    assert brief(out) == [("lora", "L6", (1,))]
    assert out[0].message == "slot 1 rank 8 != 'a' rank 4"
    # a slot whose load is still in flight is not judged yet
    assert LoraChecker().check(with_lora(s, ranks=(2, 4, 8, 9))) == []


def test_l6_live_stale_slot_tail() -> None:
    d = faulty(
        "stale_slot_tail",
        [
            LoadAdapter("a", "gen:8:1"),
            LoadAdapter("c", "gen:2:3"),
            AddRequest("ra", (1, 2, 3), "a", 2),
            Step(),
            Step(),
            AddRequest("rc", (7, 8, 9), "c", 2),
            Step(),  # c takes a's slot 0 and keeps a's rank tail
        ],
        max_loras_per_batch=1,
    )
    out = LoraChecker().check(d.snap())
    assert out and all(v.invariant == "L6" and v.offenders == ("c", 0) for v in out)
    assert out[0].message.startswith("slot 0 of 'c' differs from its registered weights in")
    # a's rank-8 tail past c's rank 2 is left in A and B of all 4 groups of the one layer
    assert "in 8 region(s)" in out[0].message
    # the same ops without the fault leave a clean slot
    clean = Driver(dummy_config(max_loras_per_batch=1))
    clean.run([op for op, _ in d.log])
    assert LoraChecker().check(clean.snap()) == []


# -- L8: overlap loads --------------------------------------------------------------------------


def test_l8_loads_are_mapped_reaped_and_ready_iff_not_in_flight(s: Snapshot) -> None:
    out = OverlapChecker().check(with_lora(s, loads=(LoadSnap("c", 2, False, False),)))
    assert brief(out) == [("overlap", "L8", ("c",))]
    assert out[0].message == "load of 'c' into slot 2 is not mapped there"
    out = OverlapChecker().check(with_lora(s, loads=(LoadSnap("c", 3, True, False),)))
    assert brief(out) == [("overlap", "L8", ("c", 3))]
    assert out[0].message == "load of 'c' into slot 3 completed but was never reaped"
    out = OverlapChecker().check(with_lora(s, ready=s.lora.ready | {"c"}))
    assert brief(out) == [("overlap", "L8", ("c",))]
    assert out[0].message == "adapter 'c' is ready while in flight"
    out = OverlapChecker().check(with_lora(s, ready=s.lora.ready - {"a"}))
    assert brief(out) == [("overlap", "L8", ("a",))]
    assert out[0].message == "adapter 'a' is mapped, not in flight, yet not ready"
    out = OverlapChecker().check(with_lora(s, ready=s.lora.ready | {"ghost", "zz"}))
    assert brief(out) == [("overlap", "L8", ("ghost", "zz"))]
    assert out[0].message == "adapters ready but not mapped"


STALE_OPS: list[Op] = [
    LoadAdapter("a", "gen:8:1"),
    LoadAdapter("c", "gen:2:3"),
    AddRequest("rc", (7, 8, 9), "c", 2),
    Step(),  # c's load starts on the side stream
    Abort("rc"),  # every request of c is cancelled before it is scheduled
    CompleteTransfers(None),
]


def test_l8_live_unreaped_load_after_its_requests_were_cancelled() -> None:
    d = faulty("stale_overlap_event", STALE_OPS, max_loras_per_batch=1, enable_lora_overlap_loading=True)
    out = OverlapChecker().check(d.snap())
    assert brief(out) == [("overlap", "L8", ("c", 0)), ("overlap", "L8", ("c",))]
    assert out[0].message == "load of 'c' into slot 0 completed but was never reaped"
    # without the fault the load is reaped at once, though no request of c ever ran
    ok = Driver(dummy_config(max_loras_per_batch=1, enable_lora_overlap_loading=True))
    ok.run(STALE_OPS)
    assert ok.snap().lora.loads == () and ok.snap().lora.ready == {"c"}


def test_l8_live_use_before_transfer() -> None:
    d = faulty(
        "use_before_transfer",
        [LoadAdapter("c", "gen:2:3"), AddRequest("rc", (7, 8, 9), "c", 2), Step()],
        max_loras_per_batch=2,
        enable_lora_overlap_loading=True,
    )
    out = OverlapChecker().check(d.snap())
    assert brief(out) == [("overlap", "L8", ("c",))]
    assert out[0].message == "adapter 'c' is ready while in flight"
    assert any("not loaded and waited on" in v.message for v in d.model.violations)


# -- L10: drainer -------------------------------------------------------------------------------


def test_l10_drain_marks() -> None:
    snap = draining().snap()
    assert snap.drainer.marks == (("b", "c"),) and DrainerChecker().check(snap) == []
    off = dataclasses.replace(snap, drainer=dataclasses.replace(snap.drainer, enabled=False))
    out = DrainerChecker().check(off)
    assert brief(out) == [("drainer", "L10", ("b",))]
    assert out[0].message == "drain marks while the drainer is off"

    def marks(*m: tuple[str, str]) -> Snapshot:
        return dataclasses.replace(snap, drainer=dataclasses.replace(snap.drainer, marks=m))

    out = DrainerChecker().check(marks(("b", "c"), ("zz", "d")))
    assert brief(out) == [("drainer", "L10", ("zz",))]
    assert out[0].message == "adapter 'zz' still drains for 'd' with no running requests"
    out = DrainerChecker().check(marks(("a", "c"), ("b", "c")))
    assert brief(out) == [("drainer", "L10", ("c",))]
    assert out[0].message == "several adapters drain for one starving adapter"
    # a waiting request does not count as running
    out = DrainerChecker().check(with_req(marks(("b", "c")), "rb", state="waiting"))
    assert brief(out) == [("drainer", "L10", ("b",))]
    out = DrainerChecker().check(marks(("b", "a")))  # a runs: it does not starve
    assert brief(out) == [("drainer", "L10", ("b",))]
    assert out[0].message == "'b' drains for 'a', which does not starve"


def test_l11_slot_reservations() -> None:
    snap = draining().snap()  # P=2: a and b run, c waits

    def reserved(*r: str, marks: tuple[tuple[str, str], ...] = ()) -> Snapshot:
        return dataclasses.replace(snap, drainer=dataclasses.replace(snap.drainer, marks=marks, reserved=r))

    out = DrainerChecker().check(reserved("c"))  # a, b active + c reserved: 3 > 2 slots
    assert brief(out) == [("drainer", "L11", ("a", "b", "c"))]
    assert out[0].message == "3 adapters active or reserved > 2 slots"
    freed = with_req(reserved("c"), "rb", state="finished")  # b's drain ended: its slot is c's
    assert DrainerChecker().check(freed) == []
    out = DrainerChecker().check(with_req(freed, "rc", state="aborted"))
    assert brief(out) == [("drainer", "L11", ("c",))]
    assert out[0].message == "a slot stays reserved for 'c', which does not starve"


def test_l10_live_stale_drain_mark() -> None:
    ops: list[Op] = [
        LoadAdapter("a", "gen:4:1"),
        LoadAdapter("b", "gen:4:2"),
        LoadAdapter("c", "gen:4:3"),
        AddRequest("ra", (1, 2, 3), "a", 12),
        AddRequest("rb", (4, 5, 6), "b", 4),
        Step(),
        AddRequest("rc", (7, 8), "c", 3),
        AdvanceClock(2.0),
        Step(),  # b drains for c
        Step(),
        Step(),  # rb finishes: b has no running request left
    ]
    d = faulty(
        "drainer_never_clears", ops, max_loras_per_batch=2, lora_drain_wait_threshold=1.0, lora_drain_policy="admission"
    )
    assert d.engine.status("rb") == "finished"
    out = DrainerChecker().check(d.snap())
    assert brief(out) == [("drainer", "L10", ("b",))]
    assert out[0].message == "adapter 'b' still drains for 'c' with no running requests"


# -- refinement ---------------------------------------------------------------------------------


def test_refinement_clean_then_each_disagreement(drv: Driver, s: Snapshot) -> None:
    chk = RefinementChecker(drv.model)
    assert chk.check(s) == []
    out = chk.check(with_req(s, "r4", state="aborted"))
    assert brief(out) == [("refinement", "live", ("r4",)), ("refinement", "state", ("r4",))]
    assert out[1].message == "r4 is aborted, model says waiting"
    ghost = dataclasses.replace(req(s, "r0"), rid="ghost")
    out = chk.check(dataclasses.replace(s, requests=(*s.requests, ghost)))
    assert brief(out) == [("refinement", "requests", ("ghost",))]
    r2 = req(s, "r2")
    out = chk.check(with_req(s, "r2", indices=np.concatenate([r2.indices, s.free_indices[:2]])))
    assert brief(out) == [("refinement", "held", ("r2",))]
    assert out[0].message == "r2 holds 6 tokens, model predicts 4"
    out = chk.check(dataclasses.replace(s, available=s.available - 2))
    assert brief(out) == [("refinement", "free", (-2,))]
    out = chk.check(with_lora(s, uid_to_slot=s.lora.uid_to_slot[:3]))
    assert brief(out) == [("refinement", "resident", ("c",))]
    out = chk.check(with_lora(s, loads=()))
    assert brief(out) == [("refinement", "loading", ())]
    out = chk.check(with_lora(s, pinned=frozenset()))
    assert brief(out) == [("refinement", "pinned", ())]
    out = chk.check(dataclasses.replace(s, drainer=dataclasses.replace(s.drainer, marks=(("a", "c"),))))
    assert brief(out) == [("refinement", "drain", ())]
    out = chk.check(dataclasses.replace(s, drainer=dataclasses.replace(s.drainer, reserved=("c",))))
    assert brief(out) == [("refinement", "drain", ())]
    assert out[0].message == "reserved slots ('c',) != model set()"


def test_refinement_when_the_model_disagrees(drv: Driver, s: Snapshot) -> None:
    model = copy.deepcopy(drv.model)
    model.s.cache_tokens += 2  # the model believes the cache kept two more tokens
    out = RefinementChecker(model).check(s)
    assert brief(out) == [("refinement", "free", (2,))]
    assert "model predicts" in out[0].message and "(cache 22, sessions 6)" in out[0].message


def test_refinement_catches_a_retraction_leak() -> None:
    """retract_leaks_tail: r1 is retracted with an odd KV length and keeps its partial page;
    the model knows a retracted request holds nothing, so the free count disagrees."""
    d = faulty(
        "retract_leaks_tail",
        [AddRequest("r0", (1, 2, 3), None, 8), AddRequest("r1", (4, 5, 6, 7), None, 8), *[Step()] * 5],
        page_size=2,
        max_total_tokens=14,
    )
    assert d.log[-1][1][0] == Retracted("r1", 4)
    out = RefinementChecker(d.model).check(d.snap())
    assert brief(out) == [("refinement", "free", (-2,))]
    assert out[0].message == "4 free tokens, model predicts 6 (cache 0, sessions 0)"


# -- liveness -----------------------------------------------------------------------------------


def test_drain_to_idle_finishes_a_busy_engine() -> None:
    d = busy(page_size=2)
    assert drain_to_idle(d.engine, 200) == []
    assert d.engine.is_idle() and run_checks(d.snap()) == []


def test_drain_to_idle_reports_a_stall() -> None:
    """stale_overlap_event: c's finished load is never reaped, its slot stays busy, and a
    request of adapter a waits forever for the only slot."""
    d = faulty(
        "stale_overlap_event",
        [*STALE_OPS, AddRequest("ra", (1, 2, 3), "a", 2)],
        max_loras_per_batch=1,
        enable_lora_overlap_loading=True,
    )
    out = drain_to_idle(d.engine, 30)
    assert brief(out) == [("requests", "liveness", ("ra",))]
    assert out[0].message == "not idle after 30 steps: 1 live request(s) stalled"
    with pytest.raises(InvariantViolation) as info:
        drain_to_idle(d.engine, 5, raise_on_stall=True)
    assert brief(info.value.violations) == [("requests", "liveness", ("ra",))]


def test_l6_every_tp_rank_holds_each_readable_slot() -> None:
    d = Driver(dummy_config(tp_size=2))
    d.run([LoadAdapter("a", "gen:4:1"), AddRequest("r1", (1, 2, 3), "a", 2), CompleteTransfers(None), Step()])
    snap = d.snap()
    assert {c.tp_rank for c in snap.lora.contents} == {0, 1}
    assert LoraChecker().check(snap) == []
    one_rank = with_lora(snap, contents=tuple(c for c in snap.lora.contents if c.tp_rank == 0))
    out = LoraChecker().check(one_rank)
    assert {(v.pool, v.invariant) for v in out} == {("lora", "L6")}
    assert any("tp ranks [0], not on each of [0, 1]" in v.message for v in out)


def test_injected_failures_add_up_to_the_fail_transfers_ops() -> None:
    d = Driver(dummy_config(enable_lora_overlap_loading=True))
    d.run(
        [
            FailTransfers(2),
            LoadAdapter("a", "gen:4:1"),
            AddRequest("r1", (1, 2), "a", 2),
            Step(),
            CompleteTransfers(None),
        ]
    )
    snap = d.snap()
    failed, armed = snap.injected_failures or (0, 0)
    assert failed + armed == 2 and failed >= 1  # the load's first copies failed
    refine = RefinementChecker(d.model)
    assert refine.check(snap) == []
    off_by_one = dataclasses.replace(snap, injected_failures=(failed, armed - 1))
    out = refine.check(off_by_one)
    assert brief(out) == [("refinement", "injected-failures", (failed, armed - 1))]
