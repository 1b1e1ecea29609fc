"""Many live requests: the snapshotter copies their indices and rows in bulk. That must give
what the per-request path gives, and K5 must still name the one bad row."""

from __future__ import annotations

import numpy as np
import pytest

from lorainv.checkers.req_to_token import ReqToTokenChecker
from lorainv.config import RuntimeConfig
from lorainv.impl import snapshotter
from lorainv.impl.engine import Engine
from lorainv.ops import AddRequest, Step
from lorainv.snapshot import canonical

LIVE = 64  # above both bulk thresholds


@pytest.fixture
def engine() -> Engine:
    eng = Engine(
        RuntimeConfig(
            network="dummy",
            device="sim-auto",
            max_total_tokens=LIVE * 16,
            max_running_requests=LIVE,
            chunked_prefill_size=LIVE * 8,
        )
    )
    for i in range(LIVE):
        eng.apply(AddRequest(f"r{i}", tuple(range(1 + i % 5, 6 + i % 5)), None, 6))
    for _ in range(3):
        eng.apply(Step())
    assert sum(1 for r in eng.requests.values() if r.row is not None) == LIVE
    return eng


def test_bulk_copies_equal_the_engine_and_the_per_request_path(engine: Engine, monkeypatch) -> None:
    assert LIVE >= snapshotter._BULK_FROM
    bulk = engine.snapshot()
    r2t = engine.rows.req_to_token.numpy()
    for snap in bulk.requests:
        r = engine.requests[snap.rid]
        assert np.array_equal(snap.indices, r.indices) and snap.indices is not r.indices
        assert np.array_equal(snap.row_entries, r2t[r.row, : len(r.indices)])
        assert not snap.indices.flags.writeable and not snap.row_entries.flags.writeable
    monkeypatch.setattr(snapshotter, "_BULK_FROM", 10**9)
    assert canonical(engine.snapshot()) == canonical(bulk)


def test_bulk_copies_are_copies(engine: Engine) -> None:
    snap = engine.snapshot()
    first = next(s for s in snap.requests if s.row is not None)
    before = first.row_entries.copy()
    engine.rows.req_to_token[first.row, 0] += 1  # a write after the snapshot was taken
    assert np.array_equal(first.row_entries, before)


def test_a_wrong_row_is_named(engine: Engine) -> None:
    assert ReqToTokenChecker().check(engine.snapshot()) == []
    victim = engine.requests["r37"]
    engine.rows.req_to_token[victim.row, 2] = int(victim.indices[3])  # points at a neighbour's token
    got = ReqToTokenChecker().check(engine.snapshot())
    assert [(v.invariant, v.message) for v in got] == [
        ("K5", f"row {victim.row} of request r37 does not point at the request's token indices")
    ]
    assert list(got[0].offenders) == [2]  # the position in the row


def test_more_indices_than_the_row_holds_is_shown_not_raised(engine: Engine) -> None:
    """A request claiming more tokens than its row can point at: the bulk gather would index
    past the table, so the snapshot falls back to the per-request copy, and K5 reports it."""
    victim = engine.requests["r5"]
    width = engine.rows.req_to_token.shape[1]
    victim.indices = np.concatenate([victim.indices, np.arange(width, dtype=np.int64) + 10_000])
    snap = engine.snapshot()
    got = next(s for s in snap.requests if s.rid == "r5")
    assert len(got.indices) == len(victim.indices) and len(got.row_entries) == width
    messages = [v.message for v in ReqToTokenChecker().check(snap)]
    assert messages == [f"row {victim.row} of request r5 does not point at the request's token indices"]


def test_a_wrong_bulk_copy_is_reported_by_the_memo_check(engine: Engine, monkeypatch) -> None:
    """The teardown's memo check compares with a snapshot taken request by request: a bulk copy
    that gathers the wrong row entries is a ``snapshot/memo`` violation (planted here)."""
    from lorainv.testing.harness import memo_violations

    assert memo_violations(engine) == []
    real = snapshotter._bulk_copies

    def shifted(reqs, r2t):  # every request reads the next row's entries
        got = real(reqs, r2t)
        keys = list(got)
        return {k: (got[k][0], got[keys[(i + 1) % len(keys)]][1]) for i, k in enumerate(keys)}

    monkeypatch.setattr(snapshotter, "_bulk_copies", shifted)
    assert [(v.pool, v.invariant, v.offenders) for v in memo_violations(engine)] == [
        ("snapshot", "memo", ("requests",))
    ]
