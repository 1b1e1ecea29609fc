"""Hostile arguments to the user API and to ``Engine.apply`` on a live engine.

Every call is either accepted or refused. A refusal raises `RequestError` or `AdapterError`
(both `LorainvError`) and leaves the snapshot exactly as it was; through ``apply`` it becomes
a single ``Rejected`` event. The engine never lets a bare ``AssertionError``, ``IndexError``,
``KeyError``, ``TypeError``, ``AttributeError``, ``ValueError`` or ``RuntimeError`` reach
the user, and after any sequence of calls it still drains to idle with every checker clean.
``generate`` is all-or-nothing: a refused prompt queues none of the others.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from reliability_util import live_engine, state_of

from lorainv import Engine
from lorainv import ops as O
from lorainv.checkers.liveness import drain_to_idle
from lorainv.errors import AdapterError, InvariantViolation, LorainvError, RequestError
from lorainv.events import Rejected

REFUSALS = (RequestError, AdapterError)

RIDS = ["ra", "r0", "rb", "rbase", "rs", "r5", "r6", "r7", "n1", "n2", "n3", "n4", "n5"]
ADAPTERS = ["a", "b", "c", "gen:2:5"]
NEW_NAMES = ["c", "d", "gen:2:5", "a"]  # mostly not registered yet: loads that can be accepted
SESSIONS = ["s", "t", "u"]
BAD_SOURCES = [
    "gen:99:1",
    "gen:0:1",
    "gen:2",
    "gen:-1:2",
    "/etc/passwd",
    "/nonexistent/adapter",
    "",
    ".",
    "/",
    "/dev/zero",
]
SOURCES = st.one_of(st.sampled_from(["gen:2:5", "gen:4:1", "gen:8:3"]), st.sampled_from(BAD_SOURCES))


class Opaque:
    """An arbitrary object a careless caller might pass."""

    def __repr__(self) -> str:
        return "Opaque()"


hostile = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.just(math.nan),
    st.binary(max_size=6),
    st.lists(st.one_of(st.integers(-3, 300), st.none(), st.text(max_size=2)), max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.frozensets(st.integers(0, 5), max_size=3),
    st.integers(2**63, 2**200),
    st.integers(-(2**70), -1),
    st.integers(0, 5),
    st.just(""),
    st.text(max_size=8),
    st.sampled_from(["ü", "\x00", "a" * 300, "𝔘𝔫𝔦", "r0\n", " ", "../../etc"]),
    st.builds(Opaque),
    st.just(Path("/nonexistent")),
)


def mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Valid three times in four, hostile otherwise, so that calls also get accepted and the
    engine moves through its states while being poked."""
    # map() keeps each side one branch: one_of flattens nested one_ofs into equal-weight branches
    ok, bad = valid.map(lambda v: v), hostile.map(lambda v: v)
    return st.one_of(ok, ok, ok, bad)


rid_arg = mostly(st.sampled_from(RIDS))
name_arg = mostly(st.sampled_from(ADAPTERS))
new_name_arg = mostly(st.sampled_from(NEW_NAMES))
sid_arg = mostly(st.sampled_from(SESSIONS))
prompt_arg = mostly(st.one_of(st.lists(st.integers(0, 255), min_size=1, max_size=6), st.tuples(st.integers(0, 9))))
adapter_arg = mostly(st.one_of(st.none(), st.sampled_from(ADAPTERS)))
max_new_arg = mostly(st.integers(1, 4))
n_arg = mostly(st.one_of(st.none(), st.integers(0, 3)))

Call = tuple[str, tuple[Any, ...], dict[str, Any]]


def call(name: str, *args: st.SearchStrategy[Any], **kw: st.SearchStrategy[Any]) -> st.SearchStrategy[Call]:
    return st.tuples(st.just(name), st.tuples(*args), st.fixed_dictionaries(kw))


user_calls = st.one_of(
    call("add_request", prompt_arg),
    call("add_request", prompt_arg, adapter_arg, max_new_arg),
    call("add_request", prompt_arg, adapter_arg, max_new_arg, st.one_of(st.none(), sid_arg), rid=rid_arg),
    call("abort", rid_arg),
    call("load_adapter", new_name_arg, mostly(SOURCES)),
    call("load_adapter", new_name_arg, SOURCES, mostly(st.booleans())),
    call("load_adapter", st.sampled_from(["c", "d"]), st.sampled_from(["gen:2:5", "gen:4:1"])),  # plain valid
    call("unload_adapter", name_arg),
    call("unload_adapter", st.sampled_from(["c", "d"])),
    call("pin_adapter", name_arg),
    call("unpin_adapter", name_arg),
    call("open_session", sid_arg),
    call("close_session", sid_arg),
    call("complete_transfers", n_arg),
    call("step"),
    call(
        "generate",
        mostly(st.lists(st.one_of(st.lists(st.integers(0, 255), min_size=1, max_size=4), hostile), max_size=3)),
        st.one_of(st.none(), st.lists(adapter_arg, max_size=3), hostile),
        max_new_arg,
    ),
    call("generate", st.lists(st.lists(st.integers(0, 255), min_size=1, max_size=4), min_size=1, max_size=3)),
    call("again"),  # repeat the previous call
)

# the same hostility through ``apply``: ops built with any field values (a program, not a trace)
op_calls = st.one_of(
    st.builds(O.AddRequest, rid_arg, prompt_arg, adapter_arg, max_new_arg, st.one_of(st.none(), sid_arg)),
    st.builds(O.Abort, rid_arg),
    st.builds(O.LoadAdapter, new_name_arg, mostly(SOURCES), mostly(st.booleans())),
    st.builds(O.UnloadAdapter, name_arg),
    st.builds(O.PinAdapter, name_arg),
    st.builds(O.UnpinAdapter, name_arg),
    st.builds(O.OpenSession, sid_arg),
    st.builds(O.CloseSession, sid_arg),
    st.builds(O.CompleteTransfers, n_arg),
    st.builds(O.FailTransfers, mostly(st.integers(0, 2))),
    st.builds(O.AdvanceClock, mostly(st.floats(0, 2))),
    st.builds(O.Step),
)


def run_call(engine: Engine, c: Call) -> str:
    """Run one user call: "accepted" or the refusal's class name; asserts the refusal contract."""
    name, args, kw = c
    before = state_of(engine)
    try:
        getattr(engine, name)(*args, **kw)
    except InvariantViolation:
        raise
    except LorainvError as e:
        assert isinstance(e, REFUSALS), f"{name}{args}: {type(e).__name__}: {e}"
        assert str(e), "a refusal must say what went wrong"
        assert state_of(engine) == before, f"{name}{args} was refused ({e}) but changed the state"
        return type(e).__name__
    assert engine.check() == []
    return "accepted"


def run_op(engine: Engine, op: O.Op) -> str:
    before = state_of(engine)
    events = engine.apply(op)  # anything but a LorainvError refusal propagates and fails the test
    rejected = [e for e in events if isinstance(e, Rejected)]
    if rejected:
        assert len(events) == 1 and rejected[0].op == op.kind, events
        assert rejected[0].error in {"RequestError"} | {c.__name__ for c in _adapter_errors()}, rejected
        assert state_of(engine) == before, f"{op} was rejected ({rejected[0]}) but changed the state"
        return rejected[0].error
    assert engine.check() == []
    return "accepted"


def _adapter_errors() -> list[type]:
    out: list[type] = []
    todo: list[type] = [AdapterError]
    while todo:
        c = todo.pop()
        out.append(c)
        todo.extend(c.__subclasses__())
    return out


def finish_clean(engine: Engine) -> None:
    assert drain_to_idle(engine, 2000) == []
    assert engine.check() == []


FUZZ = settings(
    max_examples=120,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(calls=st.lists(user_calls, min_size=4, max_size=24))
def test_user_api_fuzz_accepts_or_refuses_cleanly(calls: list[Call]) -> None:
    engine = live_engine("dummy")
    prev: Call | None = None
    for c in calls:
        if c[0] == "again":
            if prev is None:
                continue
            c = prev
        outcome = run_call(engine, c)
        event(f"{c[0]}: {outcome}")
        prev = c
    finish_clean(engine)


@FUZZ
@given(ops=st.lists(op_calls, min_size=4, max_size=24))
def test_apply_fuzz_rejects_with_typed_errors(ops: list[O.Op]) -> None:
    engine = live_engine("dummy")
    for op in ops:
        outcome = run_op(engine, op)
        event(f"{op.kind}: {'accepted' if outcome == 'accepted' else 'rejected'}")
    finish_clean(engine)


# -- one test per hole the fuzz found (each raised a bare Python error before the fix) ----------
Bad = Callable[[Engine], Any]
FOUND: list[tuple[str, Bad, type[LorainvError], str]] = [
    ("bytes-prompt", lambda e: e.add_request(b"\x01\x02"), RequestError, "list or tuple of ints"),
    ("dict-prompt", lambda e: e.add_request({1: 2}), RequestError, "list or tuple of ints"),
    ("set-prompt", lambda e: e.add_request({1, 2}), RequestError, "list or tuple of ints"),
    ("list-adapter", lambda e: e.add_request([1], ["a"]), RequestError, "adapter must be None"),
    ("dict-session", lambda e: e.add_request([1], None, 2, {"s": 1}), RequestError, "session_id must be"),
    ("list-close-session", lambda e: e.close_session(["s"]), RequestError, "session_id must be a string"),
    ("none-path", lambda e: e.load_adapter("c", None), AdapterError, "adapter path must be"),
    ("int-path", lambda e: e.load_adapter("c", 3), AdapterError, "adapter path must be"),
    ("bytes-path", lambda e: e.load_adapter("c", b"gen:2:1"), AdapterError, "adapter path must be"),
    ("nul-path", lambda e: e.load_adapter("c", "/tmp/\x00x"), AdapterError, "not a valid adapter directory path"),
    ("surrogate-path", lambda e: e.load_adapter("c", "/tmp/\ud800"), AdapterError, "not a valid adapter directory"),
    ("pinned-str", lambda e: e.load_adapter("c", "gen:2:1", "yes"), AdapterError, "pinned must be a bool"),
    ("gen-seed-64bit", lambda e: e.load_adapter("c", "gen:2:" + "9" * 20), AdapterError, "seed < 2**64"),
    ("gen-huge-rank", lambda e: e.load_adapter("c", "gen:" + "9" * 5000 + ":1"), AdapterError, "gen:<rank>:<seed>"),
    ("generate-none", lambda e: e.generate(None), RequestError, "prompts must be a list"),
    ("generate-adapters-int", lambda e: e.generate([[1]], adapters=5), RequestError, "adapters must be a list"),
    ("generate-bytes-second", lambda e: e.generate([[1, 2], b"ab"]), RequestError, "prompt 1 must be a list"),
    ("generate-max-steps-str", lambda e: e.generate([[1]], max_steps="9"), RequestError, "max_steps must be"),
    ("apply-int-prompt", lambda e: e.apply(O.AddRequest("x", 5)), RequestError, "prompt must be a list"),  # type: ignore[arg-type]
    ("apply-none-source", lambda e: e.apply(O.LoadAdapter("c", None)), AdapterError, "adapter source must be"),  # type: ignore[arg-type]
    ("apply-list-close", lambda e: e.apply(O.CloseSession([1])), RequestError, "session_id must be a string"),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("bad", "error", "needle"), [f[1:] for f in FOUND], ids=[f[0] for f in FOUND])
def test_found_holes_are_typed_refusals(bad: Bad, error: type[LorainvError], needle: str) -> None:
    engine = live_engine("dummy")
    before = state_of(engine)
    try:
        out = bad(engine)
    except LorainvError as e:
        assert isinstance(e, error) and needle in str(e), f"{type(e).__name__}: {e}"
    else:  # through apply: a single Rejected event of that error class
        assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], Rejected), out
        assert issubclass(_by_name(out[0].error), error) and needle in out[0].message, out
    assert state_of(engine) == before
    assert engine.check() == []
    finish_clean(engine)


def _by_name(name: str) -> type:
    import lorainv.errors as errors

    return getattr(errors, name)


def test_repeated_calls_are_idempotent_refusals() -> None:
    """The second of two identical state-changing calls is refused and changes nothing."""
    engine = live_engine("dummy")
    pairs: list[tuple[str, tuple[Any, ...]]] = [
        ("open_session", ("u",)),
        ("load_adapter", ("c", "gen:2:7")),
        ("pin_adapter", ("a",)),
        ("unpin_adapter", ("a",)),
        ("unload_adapter", ("c",)),
        ("abort", ("rbase",)),
        ("close_session", ("u",)),
    ]
    for name, args in pairs:
        assert run_call(engine, (name, args, {})) == "accepted", (name, args)
        outcome = run_call(engine, (name, args, {}))
        assert outcome in ("RequestError", "AdapterError", "AdapterNotFoundError", "DuplicateAdapterError"), (
            name,
            outcome,
        )
    rid = engine.add_request([1, 2], None, 2, rid="dup")
    assert rid == "dup"
    assert run_call(engine, ("add_request", ([1, 2],), {"rid": "dup"})) == "RequestError"
    finish_clean(engine)
