"""Issue 14 §2: a snapshot is a pure read.

The same ops on two engines, one snapshotted (twice, plus a full check) after every op and
one never snapshotted, must report the same events, op for op; two snapshots in a row must
be equal. Run over every regression trace (each with its faults) and over generated ops.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorainv import ops as O
from lorainv.config import RuntimeConfig
from lorainv.impl.engine import Engine
from lorainv.trace import load

TRACES = sorted((Path(__file__).parent.parent / "regressions").glob("*.json"))


def plain(x: Any) -> Any:
    """A comparable rendering of a snapshot: dataclasses and arrays become tuples."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return (type(x).__name__, tuple((f.name, plain(getattr(x, f.name))) for f in dataclasses.fields(x)))
    if isinstance(x, np.ndarray):
        return ("array", tuple(x.tolist()))
    if isinstance(x, (tuple, list)):
        return tuple(plain(v) for v in x)
    if isinstance(x, (set, frozenset)):
        return ("set", tuple(sorted((plain(v) for v in x), key=repr)))
    return x


def attempt(engine: Engine, op: O.Op) -> tuple[Any, ...]:
    """The op's events, or the runtime failure it raised (a fault trace may crash a step)."""
    try:
        return ("events", engine.apply(op))
    except Exception as e:
        return ("raised", type(e).__name__, str(e))


def run_both(cfg: RuntimeConfig, ops: list[O.Op]) -> None:
    cfg = cfg.replace(strict_mem_check=0)  # the engine's own checks would snapshot both engines
    watched, alone = Engine(cfg), Engine(cfg)
    watched.snapshot()
    for i, op in enumerate(ops):
        got_watched = attempt(watched, op)
        first = watched.snapshot()
        second = watched.snapshot()
        watched.check()
        watched.is_idle()
        got_alone = attempt(alone, op)
        assert got_watched == got_alone, f"op {i} {op}: events differ once snapshots are taken"
        assert plain(first) == plain(second), f"op {i} {op}: two snapshots in a row differ"
        if got_alone[0] == "raised":
            break
    assert plain(watched.snapshot()) == plain(alone.snapshot())


@pytest.mark.parametrize("path", TRACES, ids=[p.stem for p in TRACES])
def test_regression_traces_do_not_see_the_snapshots(path: Path) -> None:
    trace = load(path)
    run_both(trace.config, list(trace.ops))


ADAPTERS = ("a", "b", "c")
SESSIONS = ("s0", "s1")


def op_strategy() -> st.SearchStrategy[O.Op]:
    rid = st.sampled_from([f"r{i}" for i in range(8)])
    adapter = st.sampled_from((None, *ADAPTERS))
    prompt = st.lists(st.integers(1, 60), min_size=1, max_size=14).map(tuple)
    return st.one_of(
        st.builds(O.AddRequest, rid, prompt, adapter, st.integers(1, 6), st.sampled_from((None, *SESSIONS))),
        st.just(O.Step()),
        st.just(O.Step()),
        st.builds(O.Abort, rid),
        st.builds(O.CompleteTransfers, st.sampled_from((None, 1, 3))),
        st.builds(O.FailTransfers, st.integers(0, 2)),
        st.builds(O.AdvanceClock, st.sampled_from((0.5, 2.0))),
        st.builds(
            O.LoadAdapter, st.sampled_from(ADAPTERS), st.sampled_from(("gen:2:1", "gen:4:2", "gen:8:3")), st.booleans()
        ),
        st.builds(O.UnloadAdapter, st.sampled_from(ADAPTERS)),
        st.builds(O.PinAdapter, st.sampled_from(ADAPTERS)),
        st.builds(O.UnpinAdapter, st.sampled_from(ADAPTERS)),
        st.builds(O.OpenSession, st.sampled_from(SESSIONS)),
        st.builds(O.CloseSession, st.sampled_from(SESSIONS)),
    )


@settings(
    max_examples=40,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    ops=st.lists(op_strategy(), min_size=1, max_size=40),
    overlap=st.booleans(),
    tp_size=st.sampled_from((1, 2)),
    page_size=st.sampled_from((1, 2)),
)
def test_generated_ops_do_not_see_the_snapshots(ops: list[O.Op], overlap: bool, tp_size: int, page_size: int) -> None:
    cfg = RuntimeConfig(
        network="dummy",
        device="sim",
        max_total_tokens=96,
        page_size=page_size,
        max_loras_per_batch=3,
        max_lora_rank=8,
        chunked_prefill_size=8,
        max_sessions=2,
        enable_lora_overlap_loading=overlap,
        tp_size=tp_size,
        seed=0,
    )
    run_both(cfg, ops)


def test_an_impure_snapshot_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison has teeth: a snapshot that lands pending transfers changes the events."""
    from lorainv.impl import snapshotter

    pure = snapshotter.take_snapshot

    def landing(engine: Engine) -> Any:
        engine.device.complete(None)
        return pure(engine)

    cfg = RuntimeConfig(network="dummy", device="sim", max_total_tokens=96, enable_lora_overlap_loading=True)
    ops = [O.LoadAdapter("a", "gen:4:1"), O.AddRequest("r0", (1, 2, 3), "a", 2), O.Step(), O.Step(), O.Step()]
    run_both(cfg, ops)
    monkeypatch.setattr(snapshotter, "take_snapshot", landing)
    with pytest.raises(AssertionError, match="events differ once snapshots are taken"):
        run_both(cfg, ops)


def test_a_stale_snapshot_memo_is_a_violation(monkeypatch: pytest.MonkeyPatch) -> None:
    """At teardown the memoized snapshot must equal one taken with every memo empty."""
    from lorainv.impl import snapshotter
    from lorainv.testing.harness import memo_violations

    eng = Engine(RuntimeConfig(network="dummy", device="sim", max_total_tokens=32, page_size=2))
    for op in (O.LoadAdapter("a", "gen:4:1"), O.AddRequest("r1", (1, 2, 3), "a", 2)):
        eng.apply(op)
    while not eng.is_idle():
        eng.apply(O.CompleteTransfers(None))
        eng.apply(O.Step())
    assert memo_violations(eng) == []
    # plant: the memo entry of the waiting r2 answers with a snapshot naming another adapter
    eng.apply(O.AddRequest("r2", (4, 5), None, 1))
    eng.snapshot()
    r2 = eng.requests["r2"]
    obj, key, snap = snapshotter._REQ_MEMO[id(r2)]
    monkeypatch.setitem(snapshotter._REQ_MEMO, id(r2), (obj, key, dataclasses.replace(snap, adapter="a")))
    (v,) = memo_violations(eng)
    assert (v.pool, v.invariant) == ("snapshot", "memo") and "requests" in v.message
