"""Delta debugging by replay (`lorainv.testing.minimize`): a failing trace padded with ops that
play no part shrinks back, keeps its first (pool, invariant), and a clean trace is left alone."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lorainv.ops import Abort, AddRequest, AdvanceClock, CloseSession, Op, OpenSession, Step
from lorainv.testing.minimize import first_violation_key, minimize
from lorainv.trace import Trace, load

REGRESSIONS = Path(__file__).resolve().parents[1] / "regressions"


def padded(trace: Trace) -> Trace:
    """``trace`` with irrelevant ops between its own, and a bulky request and steps after them."""
    noise = [OpenSession("zz"), AdvanceClock(0.5), CloseSession("zz"), Abort("nobody")]
    ops: list[Op] = []
    for i, op in enumerate(trace.ops):
        ops.append(noise[i % len(noise)])
        ops.append(op)
    ops += [AddRequest("pad", tuple(range(9)), None, 3), Step(), Step()]
    return dataclasses.replace(trace, ops=tuple(ops))


def test_a_padded_fault_trace_shrinks_back_and_keeps_its_violation() -> None:
    original = load(REGRESSIONS / "fault-session_double_count.json")
    big = padded(original)
    want = first_violation_key(big)
    assert want == ("kv", "K1")
    small = minimize(big)
    assert first_violation_key(small) == want
    assert len(small.ops) <= len(original.ops) < len(big.ops)
    assert small.meta["minimized_from"] == len(big.ops)
    assert all(op.kind not in ("AdvanceClock", "CloseSession", "Abort") for op in small.ops)
    assert all(not (isinstance(op, AddRequest) and op.rid == "pad") for op in small.ops)


def test_fields_are_simplified() -> None:
    original = load(REGRESSIONS / "fault-retract_leaks_tail.json")
    small = minimize(original)
    assert first_violation_key(small) == first_violation_key(original) == ("kv", "K1")
    adds = [op for op in small.ops if isinstance(op, AddRequest)]
    before = [op for op in original.ops if isinstance(op, AddRequest)]
    assert sum(len(op.prompt) + op.max_new_tokens for op in adds) <= sum(
        len(op.prompt) + op.max_new_tokens for op in before
    )


def test_a_clean_trace_is_returned_unchanged() -> None:
    clean = load(REGRESSIONS / "fault-session_double_count.json")
    clean = dataclasses.replace(clean, config=clean.config.replace(faults=frozenset()), ops=(Step(),))
    assert first_violation_key(clean) is None
    assert minimize(clean) is clean


def test_a_custom_predicate_and_the_replay_budget_bound_the_work() -> None:
    big = padded(load(REGRESSIONS / "fault-session_double_count.json"))
    calls: list[int] = []

    def never(_: Trace) -> bool:
        calls.append(1)
        return False

    assert minimize(big, fails=never, max_replays=5) is big
    assert len(calls) == 5
