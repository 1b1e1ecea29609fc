"""At strict level 2 the engine's own hook has just taken and checked a snapshot when ``apply``
returns; the harness reuses that very snapshot (`Engine.last_checked_snapshot`) instead of
taking and checking an identical second one, and runs on it only the checkers the hook does
not run (refinement). These tests pin down when the engine offers the snapshot and that the
harness still reports everything.
"""

from __future__ import annotations

import pytest
from checker_states import dummy_config

import lorainv.impl.snapshotter as snapshotter
from lorainv.errors import InvariantViolation
from lorainv.impl.engine import Engine
from lorainv.model.reference import ReferenceModel
from lorainv.ops import AddRequest, LoadAdapter, Op, Step, UnloadAdapter
from lorainv.testing.harness import Harness

OPS: list[Op] = [
    LoadAdapter("a", "gen:4:1"),
    AddRequest("r0", (1, 2, 3), "a", 3),
    AddRequest("r1", (4, 5), None, 2),
    Step(),
    Step(),
    Step(),
]


def test_engine_offers_the_snapshot_its_strict_hook_found_clean() -> None:
    e = Engine(dummy_config(strict_mem_check=2))
    for op in OPS:
        e.apply(op)
        snap = e.last_checked_snapshot
        assert snap is not None
        fresh = e.snapshot()  # the offered snapshot describes the engine as the op left it
        assert [(r.rid, r.state, r.kv_len, r.fill) for r in snap.requests] == [
            (r.rid, r.state, r.kv_len, r.fill) for r in fresh.requests
        ]
        assert snap.lora.contents == fresh.lora.contents and snap.free_indices.tolist() == fresh.free_indices.tolist()
    # a refused op never reaches the hook: nothing is offered
    e.apply(UnloadAdapter("nope"))
    assert e.last_checked_snapshot is None


def test_no_snapshot_offered_below_level_2_between_idle_checks() -> None:
    e = Engine(dummy_config(strict_mem_check=0))
    for op in OPS:
        e.apply(op)
        assert e.last_checked_snapshot is None


def test_harness_takes_one_snapshot_per_op_at_level_2(monkeypatch: pytest.MonkeyPatch) -> None:
    taken: list[int] = []
    real = snapshotter.take_snapshot

    def counting(engine: Engine) -> object:
        taken.append(1)
        return real(engine)

    monkeypatch.setattr(snapshotter, "take_snapshot", counting)
    for level, per_op in ((0, 1), (2, 1)):
        h = Harness(dummy_config(strict_mem_check=level))
        taken.clear()
        for op in OPS:
            assert not h.apply(op).violations
        assert len(taken) == per_op * len(OPS), level
    assert [c.name for c in h.beyond_default] == ["refinement"]


def test_harness_still_reports_refinement_on_the_reused_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model that forgets every live request: the refinement checker must still fire at
    level 2, where the harness checks the engine's snapshot instead of taking its own."""
    monkeypatch.setattr(ReferenceModel, "live", lambda self: set())
    h = Harness(dummy_config(strict_mem_check=2))
    h.apply(OPS[0])
    rec = h.apply(OPS[1])
    assert ("refinement", "live") in {(v.pool, v.invariant) for v in rec.violations}


def _corrupt(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    for op in OPS[:4]:
        assert not h.apply(op).violations
    req = h.engine.requests["r0"]
    monkeypatch.setattr(req, "cache_len", req.cache_len + 1)  # K1: the request now under-counts its tokens


def test_a_corruption_is_caught_by_the_engines_own_check(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(dummy_config(strict_mem_check=2))
    _corrupt(h, monkeypatch)
    with pytest.raises(InvariantViolation):
        h.engine.apply(Step())


def test_a_refused_op_is_checked_by_the_harness_in_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused op never reaches the engine's hook, so nothing is offered and the harness
    takes and checks its own snapshot: the corruption is reported there."""
    h = Harness(dummy_config(strict_mem_check=2))
    _corrupt(h, monkeypatch)
    rec = h.apply(UnloadAdapter("nope"))
    assert h.engine.last_checked_snapshot is None
    assert ("kv", "K1") in {(v.pool, v.invariant) for v in rec.violations}
