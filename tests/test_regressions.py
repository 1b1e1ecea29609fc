"""Every trace under tests/regressions/ is a test, replayed forever; its ``expect`` field is
honoured: null means the replay must run clean, otherwise a violation with those fields
must occur (fault traces prove the suite still detects each historic bug)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorainv.trace import load, replay

TRACES = sorted((Path(__file__).parent / "regressions").glob("*.json"))


def test_regression_traces_exist() -> None:
    assert len(TRACES) >= 12


@pytest.mark.parametrize("path", TRACES, ids=[p.stem for p in TRACES])
def test_regression_trace(path: Path) -> None:
    trace = load(path)
    res = replay(trace)
    if trace.expect is None:
        assert res.ok, [str(v) for v in res.violations]
    else:
        assert res.matches(trace.expect), f"expected {trace.expect}, got {[str(v) for v in res.violations]}"


def test_a_stolen_reserved_slot_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The drain trace has teeth: a scheduler that ignores the reservation (the victim's own
    retracted request, queued first, takes the freed slot back) is refused by the model's policy check."""
    from lorainv.impl.scheduler import Scheduler

    admit = Scheduler._admit_adapter

    def ignoring_reservations(self: Scheduler, uid: object, batch: set[object], ev: list[object]) -> bool:
        saved, self.drainer.reserved = self.drainer.reserved, set()
        try:
            return admit(self, uid, batch, ev)
        finally:
            self.drainer.reserved = saved | self.drainer.reserved

    trace = load(Path(__file__).parent / "regressions" / "drain-preempt-keeps-reserved-slot.json")
    assert replay(trace).ok
    monkeypatch.setattr(Scheduler, "_admit_adapter", ignoring_reservations)
    res = replay(trace)
    assert not res.ok
    # the reservation is lorainv's drain policy: the policy check names it (the drainer's L11 agrees)
    got = {(v.pool, v.invariant) for v in res.violations}
    assert ("policy", "max-loras-per-batch") in got, [str(v) for v in res.violations]
