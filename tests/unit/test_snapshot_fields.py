"""The snapshotter builds its hottest records without the dataclass constructor; what it builds
must still be exactly the declared record: every field, nothing else, plain values."""

from __future__ import annotations

import dataclasses

from lorainv.config import RuntimeConfig
from lorainv.impl.engine import Engine
from lorainv.impl.request import ReqState
from lorainv.ops import AddRequest, LoadAdapter, Step
from lorainv.snapshot import ReqSnap


def test_request_records_have_exactly_the_declared_fields() -> None:
    eng = Engine(RuntimeConfig(network="dummy", device="sim-auto", max_total_tokens=64, max_running_requests=2))
    for op in (
        LoadAdapter("a", "gen:4:1"),
        AddRequest("r0", (1, 2, 3), "a", 3),
        AddRequest("r1", (4, 5), None, 2),
        AddRequest("r2", (6,), None, 1),  # waits: max_running_requests=2
        Step(),
        Step(),
    ):
        eng.apply(op)
    snap = eng.snapshot()
    states = {r.state for r in snap.requests}
    assert {"waiting"} < states, states  # a bare (memoized) record and live ones both checked
    declared = {f.name for f in dataclasses.fields(ReqSnap)}
    for r in snap.requests:
        assert type(r) is ReqSnap and set(vars(r)) == declared
        assert r.state in {s.value for s in ReqState} and type(r.state) is str
        assert r == dataclasses.replace(r)  # the constructor accepts exactly these values
