"""Host-to-device load faults: an I/O error in the middle of an adapter transfer.

With overlap loading, an adapter's copies run on a side stream of the `SimDevice`; the
``FailTransfers(n)`` op (``SimDevice.fail_next``) makes the next ``n`` copies to complete fail.
A failed load must leave the adapter not resident and its slot free (L1/L8 clean), its
waiting requests must retry on a later step while ``max_load_retries`` allows, and then end
with ``reason="abort"`` and a detail that says the retries are exhausted. Nothing may stall.
Every scenario runs through `Driver` (engine and reference model in lockstep, strict level 2).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, ClassVar

import pytest
from engine_util import Driver, config, of
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from lorainv.checkers import run_checks, select
from lorainv.checkers.liveness import drain_to_idle
from lorainv.events import Finished, LoadCompleted, LoadFailed, LoadStarted, TransfersCompleted
from lorainv.impl.lora_pool import EMPTY
from lorainv.ops import FailTransfers
from lorainv.testing.machine import make_machine


def overlap_driver(**kw: Any) -> Driver:
    kw.setdefault("max_loras_per_batch", 2)
    return Driver(config(network="dummy", dtype="float32", enable_lora_overlap_loading=True, **kw))


def lora_clean(d: Driver) -> None:
    snap = d.engine.snapshot()
    assert run_checks(snap, select("lora", "overlap")) == []  # L1..L6, L8
    assert snap.lora.loads == ()
    assert d.engine.check() == []


def warm_base(d: Driver) -> None:
    """Serve one base-model request first, so the base model is resident and no base load
    shares the side stream with the adapter's copies (its load event would cover them)."""
    d.add("r0", [7, 8], None, 2)
    d.run_to_idle()
    assert None in d.engine.pool.uid_to_slot


def fail_mid_transfer(d: Driver, adapter: str) -> tuple[int, list[Any]]:
    """Start ``adapter``'s load with a step, land two of its copies, fail the third, land the rest."""
    eng = d.engine
    started = [e for e in d.step() if isinstance(e, LoadStarted) and e.adapter == adapter]
    assert len(started) == 1 and started[0].overlap
    slot = started[0].slot
    pending = eng.device.pending()
    assert pending >= 4, pending
    assert of(d.complete(2), TransfersCompleted) == [TransfersCompleted(2, 0)]
    assert eng.loader is not None and adapter in eng.loader.in_flight()  # half copied: still loading
    assert d.apply(FailTransfers(1)) == []
    events = d.complete(None)
    assert of(events, TransfersCompleted) == [TransfersCompleted(pending - 3, 1)]
    assert of(events, LoadFailed) == [LoadFailed(adapter, slot, "host-to-device copy failed")]
    # not resident, slot free (and zeroed, no poison left), no load tracked
    assert adapter not in eng.pool.uid_to_slot
    assert eng.pool.slot_to_uid[slot] is EMPTY
    assert int(eng.pool.buffers.ranks[slot]) == 0
    assert adapter not in eng.loader.in_flight()
    lora_clean(d)
    return slot, events


@pytest.mark.parametrize(
    ("retries", "failures"),
    [(0, 1), (1, 1), (1, 2), (2, 2), (3, 1), (2, 3)],
    ids=lambda v: str(v),
)
def test_failed_transfer_frees_slot_then_retries_or_aborts(retries: int, failures: int) -> None:
    d = overlap_driver(max_load_retries=retries)
    eng = d.engine
    warm_base(d)
    d.load("a", "gen:4:1")
    d.add("r1", [1, 2, 3], "a", 3)
    d.add("r2", [4, 5], "a", 2)
    exhausted = failures > retries
    for k in range(1, min(failures, retries + 1) + 1):
        _, events = fail_mid_transfer(d, "a")
        finished = of(events, Finished)
        if k > retries:  # retries exhausted on this failure: both waiting requests end
            assert {f.rid for f in finished} == {"r1", "r2"}
            for f in finished:
                assert f.reason == "abort"
                assert f"adapter load failed {k} time(s)" in f.detail
                assert f"retries exhausted (max_load_retries={retries})" in f.detail
                assert "host-to-device copy failed" in f.detail
                assert eng.request_stats(f.rid)["reason"] == "abort"
        else:  # still within budget: the requests wait for a retry on a later step
            assert finished == []
            assert eng.status("r1") == eng.status("r2") == "waiting"
    if exhausted:
        assert d.engine.is_idle()
        assert eng.output("r1") == eng.output("r2") == []
    else:  # the retry (started by the next step) succeeds
        events = d.run_to_idle()
        assert any(isinstance(e, LoadCompleted) and e.adapter == "a" for e in events)
        assert eng.request_stats("r1")["reason"] == eng.request_stats("r2")["reason"] == "length"
        assert len(eng.output("r1")) == 3 and len(eng.output("r2")) == 2
        assert "a" in eng.pool.uid_to_slot
    assert eng.device.failed == min(failures, retries + 1)
    assert drain_to_idle(eng, 100) == []
    d.finish()  # liveness, idle leak check, baseline, model agreement
    lora_clean(d)


def test_new_request_after_abort_retries_afresh() -> None:
    """After the retries ran out, the failure count restarts: a later request gets a full budget."""
    d = overlap_driver(max_load_retries=0)
    warm_base(d)
    d.load("a", "gen:4:1")
    d.add("r1", [1, 2], "a", 2)
    _, events = fail_mid_transfer(d, "a")
    assert [f.rid for f in of(events, Finished)] == ["r1"]
    d.add("r2", [1, 2], "a", 2)
    d.run_to_idle()
    assert d.engine.request_stats("r2")["reason"] == "length"
    d.finish()


def test_failure_fails_every_load_queued_behind_it_on_the_stream() -> None:
    """Two loads in flight on the one side stream; the failed copy is the oldest (``a``'s).
    A load's event covers every copy issued before it on its stream (stream order, as on a
    GPU), so ``b``'s load reports failed too although its own copies landed: both slots are
    freed, both adapters count one failure, and with a retry left both load on the next step."""
    d = overlap_driver(max_loras_per_batch=3, max_load_retries=1)
    eng = d.engine
    warm_base(d)
    d.load("a", "gen:4:1")
    d.load("b", "gen:2:2")
    d.add("ra", [1, 2], "a", 2)
    d.add("rb", [3, 4], "b", 2)
    started = of(d.step(), LoadStarted)
    assert [s.adapter for s in started] == ["a", "b"]
    d.apply(FailTransfers(1))
    events = d.complete(None)
    assert of(events, TransfersCompleted)[0].failed == 1
    assert [e.adapter for e in of(events, LoadFailed)] == ["a", "b"]
    assert "a" not in eng.pool.uid_to_slot and "b" not in eng.pool.uid_to_slot
    assert eng.status("ra") == eng.status("rb") == "waiting"
    lora_clean(d)
    events = d.run_to_idle()
    assert sorted(e.adapter for e in of(events, LoadCompleted)) == ["a", "b"]
    assert eng.request_stats("ra")["reason"] == eng.request_stats("rb")["reason"] == "length"
    d.finish()


def test_load_started_after_a_reaped_failure_is_unaffected() -> None:
    """Once the failed load is reaped, a later load on the same stream starts clean."""
    d = overlap_driver(max_loras_per_batch=3, max_load_retries=0)
    eng = d.engine
    warm_base(d)
    d.load("a", "gen:4:1")
    d.load("b", "gen:2:2")
    d.add("ra", [1, 2], "a", 2)
    fail_mid_transfer(d, "a")
    assert eng.request_stats("ra")["reason"] == "abort"
    d.add("rb", [3, 4], "b", 2)
    events = d.run_to_idle()
    assert [e.adapter for e in of(events, LoadCompleted)] == ["b"] and of(events, LoadFailed) == []
    assert eng.request_stats("rb")["reason"] == "length"
    d.finish()


def test_failed_load_of_an_adapter_with_no_requests_left_is_reaped() -> None:
    """Every request of the loading adapter is aborted before the copy fails: the failed load
    is still reaped (no stale entry keeping the slot busy) and nothing stalls."""
    d = overlap_driver(max_load_retries=0)
    eng = d.engine
    warm_base(d)
    d.load("a", "gen:4:1")
    d.add("r1", [1, 2], "a", 2)
    d.step()
    assert eng.loader is not None and eng.loader.in_flight() == {"a"}
    d.abort("r1")
    d.apply(FailTransfers(1))
    events = d.complete(None)
    assert len(of(events, LoadFailed)) == 1 and of(events, Finished) == []
    lora_clean(d)
    d.add("r2", [5], None, 2)
    d.finish()
    assert eng.request_stats("r2")["reason"] == "length"


def test_synchronous_load_path_cannot_fail() -> None:
    """Without overlap loading, adapter copies go on the *current* stream, which `SimDevice`
    performs immediately inside ``copy_async``; ``fail_next`` only affects copies still
    pending on a side stream, so a synchronous load cannot fail: ``FailTransfers`` is
    accepted, stays armed, and never fires (no copy is ever pending). The same holds for
    ``pin_adapter`` (it loads synchronously even with overlap on). Real devices report
    synchronous copy errors as exceptions from the forward, outside this fault model."""
    d = Driver(config(network="dummy", dtype="float32", max_load_retries=0, max_loras_per_batch=2))
    eng = d.engine
    assert eng.loader is None
    d.load("a", "gen:4:1")
    d.load("b", "gen:2:2")
    assert d.apply(FailTransfers(3)) == []
    for i, ad in enumerate(["a", "b", "a", None, "b"]):
        d.add(f"r{i}", [1 + i, 2], ad, 2)
    events = d.finish()
    assert of(events, LoadFailed) == []
    loads = [e for e in d.events if isinstance(e, LoadStarted)]
    assert loads and not any(e.overlap for e in loads)
    assert eng.device.failed == 0 and eng.device.pending() == 0
    assert eng.device._fail_next == 3  # armed, but nothing ever went through a side stream
    assert {eng.request_stats(r)["reason"] for r in eng.requests} == {"length"}


def test_pin_with_overlap_is_synchronous_and_cannot_fail() -> None:
    d = overlap_driver(max_loras_per_batch=3, max_load_retries=0)
    d.apply(FailTransfers(1))
    events = d.load("p", "gen:4:3", pinned=True)
    assert [e.kind for e in events][-2:] == ["LoadCompleted", "Pinned"]
    assert d.engine.device.failed == 0 and "p" in d.engine.pool.uid_to_slot
    d.add("r", [1], "p", 2)
    d.finish()


# -- the stateful machine's fail_transfer rule reaches LoadFailed -----------------------------
# the manual device: copies stay pending until a CompleteTransfers, so the rule finds some to fail
_Base = make_machine("FailTransferCount", enable_lora_overlap_loading=True, device="sim")


class FailTransferCount(_Base):  # type: ignore[misc,valid-type]
    """Counts ops and events over every example, the teardown drain included."""

    counts: ClassVar[Counter[str]] = Counter()

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            if self.h is not None:
                for rec in self.h.records:
                    FailTransferCount.counts["op:" + rec.op.kind] += 1
                    FailTransferCount.counts.update(e.kind for e in rec.events)
                    FailTransferCount.counts["violations"] += len(rec.violations)


def test_machine_fail_transfer_rule_reaches_load_failed() -> None:
    """Over a derandomized run with overlap loading on, the machine's ``fail_transfer`` rule
    fires and its failures surface as ``LoadFailed`` (setup and teardown drain included),
    with every checker clean. The rule is rare (its precondition needs copies pending when
    rules are drawn): the first 60 examples hold 3 ``FailTransfers`` and 1 ``LoadFailed``;
    100 examples hold 64 and 37, hence the budget."""
    FailTransferCount.counts.clear()
    run_state_machine_as_test(
        FailTransferCount,
        settings=settings(
            max_examples=100,
            stateful_step_count=30,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
    c = FailTransferCount.counts
    assert c["violations"] == 0, c
    assert c["op:FailTransfers"] >= 10, c
    assert c["LoadFailed"] >= 5, c
    assert c["LoadCompleted"] > c["LoadFailed"], c
