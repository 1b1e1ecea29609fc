"""Same seed, config and ops give the same events, byte for byte (as madsim requires)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from lorainv import ops as O
from lorainv.config import RuntimeConfig
from lorainv.testing.machine import ADAPTERS
from lorainv.trace import Trace, replay

names = st.sampled_from(sorted(ADAPTERS))
op_strategy = st.one_of(
    st.builds(
        O.AddRequest,
        rid=st.sampled_from([f"r{i}" for i in range(8)]),
        prompt=st.lists(st.integers(0, 9), min_size=1, max_size=10).map(tuple),
        adapter=st.one_of(st.none(), names),
        max_new_tokens=st.integers(1, 4),
        session_id=st.one_of(st.none(), st.just("s0")),
    ),
    st.builds(O.Abort, rid=st.sampled_from([f"r{i}" for i in range(8)])),
    st.just(O.Step()),
    st.just(O.Step()),
    st.just(O.Step()),
    st.builds(O.CompleteTransfers, n=st.one_of(st.none(), st.integers(0, 3))),
    st.builds(O.AdvanceClock, dt=st.sampled_from([0.25, 1.0])),
    names.map(lambda n: O.LoadAdapter(n, ADAPTERS[n])),
    names.map(O.UnloadAdapter),
    names.map(O.PinAdapter),
    st.just(O.OpenSession("s0")),
    st.just(O.CloseSession("s0")),
    st.just(O.FailTransfers(1)),
)


def event_stream(trace: Trace) -> str:
    res = replay(trace)
    return json.dumps(
        [[r.op.to_dict(), [e.to_dict() for e in r.events], [v.to_dict() for v in r.violations]] for r in res.records]
    )


@settings(max_examples=40, derandomize=True, deadline=None)
@given(
    ops=st.lists(op_strategy, max_size=40),
    overlap=st.booleans(),
    page=st.sampled_from([1, 2]),
    chunk=st.integers(1, 6),
)
def test_replay_is_byte_identical(ops: list[O.Op], overlap: bool, page: int, chunk: int) -> None:
    cfg = RuntimeConfig(
        network="dummy",
        max_total_tokens=24,
        page_size=page,
        chunked_prefill_size=chunk,
        enable_lora_overlap_loading=overlap,
        max_loras_per_batch=2,
        max_lora_rank=8,
    )
    trace = Trace(cfg, (O.LoadAdapter("a0", ADAPTERS["a0"]), *ops))
    first = event_stream(trace)
    assert first == event_stream(trace)
    assert len(json.loads(first)) >= len(trace.ops)


def test_numeric_replay_is_byte_identical() -> None:
    cfg = RuntimeConfig(dtype="float64", max_total_tokens=48, chunked_prefill_size=3, max_loras_per_batch=2)
    ops = [
        O.LoadAdapter("a0", ADAPTERS["a0"]),
        O.AddRequest("r0", (1, 2, 3, 4, 5), "a0", 4),
        O.AddRequest("r1", (1, 2, 3), None, 3),
        *[O.Step() for _ in range(10)],
    ]
    trace = Trace(cfg, tuple(ops))
    first = event_stream(trace)
    assert first == event_stream(trace)
    assert first.count('"Decoded"') == 7
