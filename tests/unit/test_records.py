"""Ops and events: stable kind names, lossless JSON round trip, strict `from_dict`."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Union

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorainv.errors import InvariantViolation, TraceError, Violation
from lorainv.events import EVENTS, Event
from lorainv.ops import OPS, AddRequest, AdvanceClock, CompleteTransfers, Op, Step
from lorainv.records import Record

OP_KINDS = {
    "AddRequest",
    "Abort",
    "Step",
    "CompleteTransfers",
    "AdvanceClock",
    "LoadAdapter",
    "UnloadAdapter",
    "PinAdapter",
    "UnpinAdapter",
    "OpenSession",
    "CloseSession",
    "FailTransfers",
}

EVENT_KINDS = {
    "Queued",
    "Rejected",
    "PrefixHit",
    "Scheduled",
    "BatchFormed",
    "Decoded",
    "Retracted",
    "Finished",
    "Aborted",
    "AdapterRegistered",
    "AdapterUnregistered",
    "Pinned",
    "Unpinned",
    "LoadStarted",
    "LoadCompleted",
    "LoadFailed",
    "Evicted",
    "DrainMarked",
    "DrainCleared",
    "CacheEvicted",
    "SessionOpened",
    "SessionRestored",
    "SessionSaved",
    "SessionClosed",
    "TransfersCompleted",
    "ClockAdvanced",
    "Idle",
}

SETTINGS = settings(derandomize=True, max_examples=100, deadline=None)


# -- strategies built from the type hints --------------------------------------------------


def strategy_for(tp: Any) -> st.SearchStrategy[Any]:
    """A strategy for values of annotation ``tp`` (the annotation vocabulary of records)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return st.one_of(*[st.none() if a is type(None) else strategy_for(a) for a in typing.get_args(tp)])
    if origin is tuple:
        elem, *_ = typing.get_args(tp)
        return st.lists(strategy_for(elem), max_size=6).map(tuple)
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(min_value=-(2**70), max_value=2**70)
    if tp is float:
        return st.floats(allow_nan=False, allow_infinity=False)
    if tp is str:
        return st.text(max_size=12)
    raise AssertionError(f"no strategy for annotation {tp!r}: extend strategy_for")


def record_strategy(cls: type[Record]) -> st.SearchStrategy[Record]:
    hints = typing.get_type_hints(cls)
    fields = {f.name: strategy_for(hints[f.name]) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return st.builds(cls, **fields)


def registry_strategy(registry: dict[str, type[Record]]) -> st.SearchStrategy[Record]:
    return st.one_of(*[record_strategy(registry[k]) for k in sorted(registry)])


def json_round_trip(rec: Record, base: type[Record]) -> Record:
    return base.from_dict(json.loads(json.dumps(rec.to_dict())))


# -- round trip ----------------------------------------------------------------------------


@SETTINGS
@given(registry_strategy(Op._registry))
def test_every_op_round_trips_through_json(rec: Record) -> None:
    back = json_round_trip(rec, Op)
    assert back == rec
    assert type(back) is type(rec)
    assert back.to_dict() == rec.to_dict()


@SETTINGS
@given(registry_strategy(Event._registry))
def test_every_event_round_trips_through_json(rec: Record) -> None:
    back = json_round_trip(rec, Event)
    assert back == rec
    assert type(back) is type(rec)
    assert back.to_dict() == rec.to_dict()


@pytest.mark.parametrize("kind", sorted(OPS.keys() | EVENTS.keys()))
def test_strategy_covers_every_field_type(kind: str) -> None:
    """Guard: every record's annotations are in the strategy vocabulary (else the property skips types)."""
    cls = {**OPS, **EVENTS}[kind]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        strategy_for(hints[f.name])


def test_tuples_become_lists_and_back() -> None:
    rec = AddRequest("r1", (5, 6, 7), adapter="a", max_new_tokens=3, session_id=None)
    d = rec.to_dict()
    assert d == {
        "op": "AddRequest",
        "rid": "r1",
        "prompt": [5, 6, 7],
        "adapter": "a",
        "max_new_tokens": 3,
        "session_id": None,
    }
    back = Op.from_dict(d)
    assert back == rec
    assert back.prompt == (5, 6, 7)  # type: ignore[attr-defined]
    assert isinstance(back.prompt, tuple)  # type: ignore[attr-defined]


def test_defaults_fill_missing_optional_fields() -> None:
    assert Op.from_dict({"op": "AddRequest", "rid": "r", "prompt": [1]}) == AddRequest("r", (1,), None, 8, None)
    assert Op.from_dict({"op": "CompleteTransfers"}) == CompleteTransfers(None)
    assert Op.from_dict({"op": "Step"}) == Step()
    assert Op.from_dict({"op": "LoadAdapter", "name": "a", "source": "gen:4:1"}).pinned is False  # type: ignore[attr-defined]


def test_int_accepted_where_float() -> None:
    back = Op.from_dict({"op": "AdvanceClock", "dt": 2})
    assert back == AdvanceClock(2.0)
    assert type(back.dt) is float  # type: ignore[attr-defined]


def test_dict_keys_use_op_and_kind() -> None:
    assert Step().to_dict() == {"op": "Step"}
    assert EVENTS["Idle"]().to_dict() == {"kind": "Idle"}
    assert EVENTS["Decoded"]("r1", 42).to_dict() == {"kind": "Decoded", "rid": "r1", "token": 42}


# -- kind names ----------------------------------------------------------------------------


def test_op_kinds_are_stable() -> None:
    assert set(OPS) == OP_KINDS
    assert set(Op._registry) == OP_KINDS
    for kind, cls in OPS.items():
        assert cls.kind == kind
        assert cls.__name__ == kind


def test_event_kinds_are_stable() -> None:
    """Existing event names never change; new events may be added (the property covers them)."""
    assert sorted(EVENT_KINDS - set(EVENTS)) == []
    assert set(Event._registry) == set(EVENTS)
    for kind, cls in EVENTS.items():
        assert cls.kind == kind


def test_records_are_frozen() -> None:
    rec = AddRequest("r1", (1, 2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.rid = "r2"  # type: ignore[misc]


def test_str_is_readable_and_abbreviates_long_tuples() -> None:
    assert str(AddRequest("r1", (1, 2), adapter="a")) == (
        "AddRequest(rid=r1, prompt=(1, 2), adapter=a, max_new_tokens=8, session_id=None)"
    )
    assert str(AddRequest("r2", tuple(range(9)))).startswith("AddRequest(rid=r2, prompt=<9 items>, adapter=None")
    assert str(Step()) == "Step()"


# -- from_dict errors ----------------------------------------------------------------------


def _trace_error(base: type[Record], data: Any) -> str:
    with pytest.raises(TraceError) as info:
        base.from_dict(data)
    return str(info.value)


def test_unknown_kind() -> None:
    msg = _trace_error(Op, {"op": "Teleport"})
    assert "unknown op 'Teleport'" in msg
    assert "AddRequest" in msg  # lists the known kinds
    assert "unknown kind 'Nope'" in _trace_error(Event, {"kind": "Nope"})


def test_event_kind_is_not_an_op_and_vice_versa() -> None:
    assert "unknown op 'Decoded'" in _trace_error(Op, {"op": "Decoded", "rid": "r", "token": 1})
    assert "unknown kind 'Step'" in _trace_error(Event, {"kind": "Step"})


@pytest.mark.parametrize("data", [{}, {"kind": "Step"}, {"op": 3}, {"op": None}])
def test_missing_or_non_string_kind(data: dict[str, Any]) -> None:
    assert "unknown op" in _trace_error(Op, data)


@pytest.mark.parametrize("data", [[], "Step", None, 3])
def test_not_an_object(data: Any) -> None:
    assert "op must be an object" in _trace_error(Op, data)


def test_missing_field_is_named() -> None:
    assert _trace_error(Op, {"op": "AddRequest", "rid": "r1"}) == "AddRequest: missing field 'prompt'"
    assert _trace_error(Op, {"op": "AdvanceClock"}) == "AdvanceClock: missing field 'dt'"
    assert _trace_error(Event, {"kind": "Decoded", "rid": "r"}) == "Decoded: missing field 'token'"


def test_unknown_field_is_named() -> None:
    msg = _trace_error(Op, {"op": "Abort", "rid": "r1", "why": "x", "also": 1})
    assert msg == "Abort: unknown field(s) ['also', 'why']"


BAD_TYPES: list[tuple[type[Record], dict[str, Any], str, str]] = [
    (Op, {"op": "AddRequest", "rid": "r", "prompt": [1], "max_new_tokens": True}, "AddRequest.max_new_tokens", "int"),
    (Op, {"op": "AddRequest", "rid": "r", "prompt": [1], "max_new_tokens": "8"}, "AddRequest.max_new_tokens", "int"),
    (Op, {"op": "AddRequest", "rid": "r", "prompt": [1], "max_new_tokens": 8.0}, "AddRequest.max_new_tokens", "int"),
    (Op, {"op": "AddRequest", "rid": ["r"], "prompt": [1]}, "AddRequest.rid", "string"),
    (Op, {"op": "AddRequest", "rid": "r", "prompt": "12"}, "AddRequest.prompt", "list"),
    (Op, {"op": "AddRequest", "rid": "r", "prompt": [1, True]}, "AddRequest.prompt[1]", "int"),
    (Op, {"op": "AddRequest", "rid": "r", "prompt": [1, "2"]}, "AddRequest.prompt[1]", "int"),
    (Op, {"op": "AddRequest", "rid": "r", "prompt": [1], "adapter": 3}, "AddRequest.adapter", "matches none"),
    (Op, {"op": "AddRequest", "rid": "r", "prompt": [1], "session_id": ["s"]}, "AddRequest.session_id", "matches none"),
    (Op, {"op": "CompleteTransfers", "n": True}, "CompleteTransfers.n", "matches none"),
    (Op, {"op": "CompleteTransfers", "n": "2"}, "CompleteTransfers.n", "matches none"),
    (Op, {"op": "AdvanceClock", "dt": "1.0"}, "AdvanceClock.dt", "number"),
    (Op, {"op": "AdvanceClock", "dt": False}, "AdvanceClock.dt", "number"),
    (Op, {"op": "LoadAdapter", "name": "a", "source": "s", "pinned": 1}, "LoadAdapter.pinned", "bool"),
    (Op, {"op": "FailTransfers", "n": None}, "FailTransfers.n", "int"),
    (Event, {"kind": "Decoded", "rid": "r", "token": True}, "Decoded.token", "int"),
    (Event, {"kind": "Scheduled", "rid": "r", "chunk_tokens": 4, "done": "yes"}, "Scheduled.done", "bool"),
    (
        Event,
        {"kind": "BatchFormed", "mode": "decode", "rids": ["a"], "adapters": [1], "num_segments": 1},
        "BatchFormed.adapters[0]",
        "matches none",
    ),
    (Event, {"kind": "Rejected", "op": ["Abort"], "error": "E", "message": "m"}, "Rejected.op", "string"),
]


@pytest.mark.parametrize("base, data, where, what", BAD_TYPES, ids=[c[2] + ":" + repr(c[1]) for c in BAD_TYPES])
def test_wrong_type_is_named(base: type[Record], data: dict[str, Any], where: str, what: str) -> None:
    msg = _trace_error(base, data)
    assert msg.startswith(where + ":")
    assert what in msg


def test_from_dict_does_not_mutate_input() -> None:
    data = {"op": "AddRequest", "rid": "r", "prompt": [1, 2]}
    snapshot = json.dumps(data)
    Op.from_dict(data)
    assert json.dumps(data) == snapshot


# -- violations (errors.py) ----------------------------------------------------------------


def test_violation_str_and_offender_truncation() -> None:
    v = Violation("kv", "K3", "index aliased", tuple(range(20)))
    assert str(v) == (
        "[kv/K3] index aliased offenders=[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] (+4 more)"
    )
    assert str(Violation("lora", "L1", "bijection broken")) == "[lora/L1] bijection broken"


def test_violation_to_dict_is_json_safe() -> None:
    v = Violation("sessions", "K5", "row owned twice", (3, "s1", None, 1.5, ("a", 1)))
    d = json.loads(json.dumps(v.to_dict()))
    assert d == {
        "pool": "sessions",
        "invariant": "K5",
        "message": "row owned twice",
        "offenders": [3, "s1", None, 1.5, "('a', 1)"],
    }


def test_invariant_violation_message_lists_violations_and_events() -> None:
    err = InvariantViolation([Violation("kv", "K1", "leak", (7,))], recent_events=["Step()"])
    assert str(err).splitlines() == [
        "1 invariant violation(s):",
        "  [kv/K1] leak offenders=[7]",
        "  last 1 step(s) of events:",
        "    Step()",
    ]
    assert err.args == (str(err),)
