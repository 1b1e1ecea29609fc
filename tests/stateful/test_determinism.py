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


CAMPAIGN = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
from lorainv.testing.campaign import run_campaign
res = run_campaign(max_examples=30, derandomize=True, name="determinism", shrink=False)
print(json.dumps([res.examples, res.ops, sorted(map(str, res.stats.get("transitions", ())))]))
"""


def test_a_derandomized_campaign_does_not_depend_on_what_was_imported_before() -> None:
    """Hypothesis mixes constants from loaded local modules into its draws; a derandomized
    campaign loads all of lorainv first, so importing some of it beforehand (as an earlier test
    in the same worker would) changes nothing. Before that fix, the same fault campaign found its
    bug after 45 examples in one import order and after 12 in another."""
    import subprocess
    import sys

    def run(*modules: str) -> list[object]:
        out = subprocess.run(
            [sys.executable, "-c", CAMPAIGN, *modules], capture_output=True, text=True, check=True
        ).stdout
        return json.loads(out.strip().splitlines()[-1])

    bare = run()
    assert bare[1] > 0
    assert run("lorainv.targets.vllm_snapshot", "lorainv.cli.replay", "lorainv.testing.minimize") == bare
