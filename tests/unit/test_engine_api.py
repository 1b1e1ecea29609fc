"""The engine's user API (issue #5): `generate`, per-request queries, sessions, pins, clock-time
latencies, and bad input — every refused call is a `RequestError` that changes nothing at the
snapshot level, and through ``apply`` a ``Rejected`` event the reference model accepts."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from engine_util import Driver, config, of, state_key

from lorainv.errors import AdapterError, RequestError
from lorainv.events import (
    AdapterUnregistered,
    Evicted,
    Finished,
    LoadCompleted,
    LoadStarted,
    Pinned,
    Rejected,
    SessionClosed,
    SessionOpened,
    Unpinned,
)
from lorainv.ops import Abort, AddRequest, CloseSession, Op, OpenSession, UnloadAdapter


def test_public_imports_and_generate() -> None:
    from lorainv import Engine, RuntimeConfig

    engine = Engine(RuntimeConfig(network="dummy", strict_mem_check=2))
    d = Driver(engine.cfg, engine)  # the model observes every op the API runs
    engine.load_adapter("a", "gen:4:1")
    outs = engine.generate([[1, 2, 3], [4, 5], [6]], ["a", None, "a"], max_new_tokens=5)
    assert isinstance(outs, list) and len(outs) == 3
    assert all(isinstance(o, list) and len(o) == 5 and all(type(t) is int for t in o) for o in outs)
    assert engine.generate([[1, 2, 3]], ["a"], 5) == [outs[0]]  # deterministic, cache hit or not
    assert engine.output("r0") == outs[0] and engine.status("r0") == "finished"
    assert engine.is_idle() and engine.check() == []
    assert engine.generate([[7]], None, 2) == [engine.output("r4")]
    with pytest.raises(RequestError, match="2 prompts but 1 adapters"):
        engine.generate([[1], [2]], ["a"], 2)
    d.finish()
    assert sum(e.kind == "Queued" for e in d.events) == 5


def test_status_and_output_follow_a_request() -> None:
    d = Driver(config(network="dummy", chunked_prefill_size=2))
    e = d.engine
    rid = e.add_request([1, 2, 3], None, 3)
    assert rid == "r0" and e.status(rid) == "waiting" and e.output(rid) == [] and not e.is_idle()
    e.step()
    assert e.status(rid) == "prefilling" and e.output(rid) == []
    e.step()
    assert e.status(rid) == "decoding" and len(e.output(rid)) == 1
    e.step()
    e.step()
    assert e.status(rid) == "finished" and len(e.output(rid)) == 3 and e.is_idle()
    assert e.add_request([5], rid="mine", max_new_tokens=1) == "mine"
    with pytest.raises(RequestError, match="unknown request id"):
        e.output("nope")
    with pytest.raises(RequestError, match="unknown request id"):
        e.status("nope")
    d.finish()
    assert e.status("mine") == "finished"


def test_sessions_api() -> None:
    d = Driver(config(network="dummy"))
    e = d.engine
    assert e.open_session("s") == [SessionOpened("s")]
    e.add_request([1, 2, 3], None, 2, "s")
    d.finish()
    assert e.close_session("s") == [SessionClosed("s", 4)]
    assert e.snapshot().sessions == () and e.check() == []


def test_pin_and_unpin() -> None:
    d = Driver(config(network="dummy", max_loras_per_batch=2))
    for name, src in (("a", "gen:4:1"), ("b", "gen:4:2"), ("c", "gen:4:3")):
        d.load(name, src)
    assert d.engine.pin_adapter("a") == [LoadStarted("a", 0, False), LoadCompleted("a", 0), Pinned("a")]
    with pytest.raises(AdapterError, match="at most max_loras_per_batch-1=1"):
        d.engine.pin_adapter("b")
    with pytest.raises(AdapterError, match="already pinned"):
        d.engine.pin_adapter("a")
    d.add("rb", [1], "b", 1)
    d.add("rc", [2], "c", 1)
    ev = d.run_to_idle()
    assert Evicted("b", 1) in ev and not any(isinstance(x, Evicted) and x.adapter == "a" for x in ev)
    assert d.engine.snapshot().lora.uid_to_slot == (("a", 0), ("c", 1))
    assert d.engine.unpin_adapter("a") == [Unpinned("a")]
    with pytest.raises(AdapterError, match="is not pinned"):
        d.engine.unpin_adapter("a")
    d.engine.pin_adapter("a")
    assert d.engine.unload_adapter("a") == [Unpinned("a"), Evicted("a", 0), AdapterUnregistered("a")]
    d.finish()


def test_ttft_and_e2e_in_clock_time() -> None:
    d = Driver(config(network="dummy"))
    e = d.engine
    e.add_request([1, 2, 3], None, 3)  # arrives at t=0
    d.advance(0.5)
    e.add_request([4, 5], None, 3)  # arrives at t=0.5
    d.advance(0.25)
    e.step()  # t=0.75: prefill of both, first tokens
    assert e.request_stats("r0")["ttft"] == 0.75 and e.request_stats("r1")["ttft"] == 0.25
    assert e.request_stats("r0")["e2e"] is None
    d.advance(1.0)
    e.step()  # t=1.75
    d.advance(2.0)
    e.step()  # t=3.75: third tokens, both finish
    s0, s1 = e.request_stats("r0"), e.request_stats("r1")
    assert (s0["ttft"], s0["e2e"], s1["ttft"], s1["e2e"]) == (0.75, 3.75, 0.25, 3.25)
    assert s0["state"] == "finished" and s0["reason"] == "length" and s0["output_len"] == 3
    assert s0["retractions"] == 0
    e.add_request([6], None, 2)
    d.advance(1.0)
    e.abort("r2")
    s2 = e.request_stats("r2")
    assert (s2["ttft"], s2["e2e"], s2["state"], s2["reason"]) == (None, 1.0, "aborted", "abort")
    d.finish()


def test_generate_is_atomic_on_bad_input() -> None:
    d = Driver(config(network="dummy"))
    d.load("a", "gen:4:1")
    before = state_key(d.engine.snapshot())
    with pytest.raises(RequestError, match="outside the vocabulary"):
        d.engine.generate([[1, 2], [3, 4999]], ["a", "a"], 3)
    assert state_key(d.engine.snapshot()) == before and d.engine.requests == {}
    assert d.engine.generate([[1, 2]], ["a"], 2) == [d.engine.output("r0")]


# -- bad input: each a RequestError, the snapshot-level state unchanged ---------------------------
def _busy() -> Driver:
    """A non-trivial state: a live chunked request, a waiting session turn, session KV (of
    adapters `a` and `c`), prefix-cache entries, resident adapters, a closed session."""
    d = Driver(config(network="dummy", max_total_tokens=64, chunked_prefill_size=4))
    d.load("a", "gen:4:1")
    d.load("b", "gen:4:2")
    d.load("c", "gen:4:3")
    d.open("s")
    d.add("t1", [1, 2, 3], "a", 2, "s")
    d.add("done", [4, 5, 6, 7], "b", 2)
    d.open("s3")
    d.add("t3", [5, 4], "c", 1, "s3")
    d.run_to_idle()
    d.open("gone")
    d.close("gone")
    d.open("s2")
    d.add("live", list(range(10, 20)), "a", 3)
    d.step()
    assert d.engine.status("live") == "prefilling"
    d.add("u1", [8, 9], "b", 2, "s2")
    return d


BAD: list[tuple[str, Callable[[Any], object], Op, str]] = [
    ("empty prompt", lambda e: e.add_request([], None, 2), AddRequest("x", ()), "empty prompt"),
    ("prompt > max_total_tokens", lambda e: e.add_request([1] * 65), AddRequest("x", (1,) * 65), "max_total_tokens"),
    (
        "beyond the model context",
        lambda e: e.add_request([1] * 10, None, 4087),
        AddRequest("x", (1,) * 10, None, 4087),
        "exceeds the model context 4096",
    ),
    ("token id = vocab", lambda e: e.add_request([1, 1024]), AddRequest("x", (1, 1024)), "outside the vocabulary"),
    ("negative token id", lambda e: e.add_request([-1]), AddRequest("x", (-1,)), "outside the vocabulary"),
    ("unknown adapter", lambda e: e.add_request([1], "zz"), AddRequest("x", (1,), "zz"), "unknown adapter 'zz'"),
    ("max_new 0", lambda e: e.add_request([1], None, 0), AddRequest("x", (1,), None, 0), "max_new_tokens"),
    ("max_new -1", lambda e: e.add_request([1], None, -1), AddRequest("x", (1,), None, -1), "max_new_tokens"),
    ("max_new True", lambda e: e.add_request([1], None, True), AddRequest("x", (1,), None, True), "max_new_tokens"),
    ("max_new 1.5", lambda e: e.add_request([1], None, 1.5), AddRequest("x", (1,), None, 1.5), "max_new_tokens"),
    ("duplicate rid", lambda e: e.add_request([1], rid="done"), AddRequest("done", (1,)), "already used"),
    ("abort unknown id", lambda e: e.abort("nope"), Abort("nope"), "unknown request id"),
    ("abort finished id", lambda e: e.abort("done"), Abort("done"), "already ended"),
    ("duplicate session id", lambda e: e.open_session("s"), OpenSession("s"), "already open"),
    ("close unknown session", lambda e: e.close_session("zz"), CloseSession("zz"), "unknown session"),
    (
        "turn in a closed session",
        lambda e: e.add_request([1], "a", 2, "gone"),
        AddRequest("x", (1,), "a", 2, "gone"),
        "is not open",
    ),
    (
        "second live turn",
        lambda e: e.add_request([1], "b", 2, "s2"),
        AddRequest("x", (1,), "b", 2, "s2"),
        "already has a live turn",
    ),
    (
        "turn on another adapter than the session KV",
        lambda e: e.add_request([1], "b", 2, "s"),
        AddRequest("x", (1,), "b", 2, "s"),
        "its KV cannot serve 'b'",
    ),
    ("unload an adapter in use", lambda e: e.unload_adapter("a"), UnloadAdapter("a"), "used by live request"),
    (
        "unload an adapter whose KV a session holds",
        lambda e: e.unload_adapter("c"),
        UnloadAdapter("c"),
        r"computed the KV that session\(s\) \['s3'\] hold",
    ),
    ("non-int token", lambda e: e.add_request([1, "2"]), AddRequest("x", (1, "2")), "only ints|outside the vocab"),
]


@pytest.mark.parametrize(("call", "op", "match"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_refused_and_changes_nothing(call: Callable[[Any], object], op: Op, match: str) -> None:
    d = _busy()
    before = state_key(d.engine.snapshot())
    with pytest.raises(RequestError, match=match):
        call(d.engine)
    assert state_key(d.engine.snapshot()) == before
    assert d.engine.check() == []
    ev = d.apply(op)  # the same op through apply: a Rejected event; the model agrees nothing changed
    assert len(ev) == 1 and isinstance(ev[0], Rejected) and ev[0].error == "RequestError"
    assert re.search(match, ev[0].message)
    assert state_key(d.engine.snapshot()) == before
    ev = d.finish()
    fins = {f.rid: f.reason for f in of(ev, Finished)}
    assert fins == {"live": "length", "u1": "length"}
