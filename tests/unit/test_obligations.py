"""Op obligations (`lorainv.model.obligations`): the model predicts, before reading the
events, whether each op is accepted, the error class of a refusal and the op's immediate
effect.

1. Against the real engine: a script of valid and invalid ops of every kind, each with the
   outcome the README's Errors table documents (written here by hand), is met exactly and
   the model reports no broken obligation.
2. Hand-made event streams that break each obligation are each refused with the named
   invariant.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from lorainv import events as E
from lorainv import ops as O
from lorainv.config import RuntimeConfig
from lorainv.errors import Violation
from lorainv.impl.engine import Engine
from lorainv.model.obligations import predict
from lorainv.model.reference import ReferenceModel

CFG = RuntimeConfig(
    network="dummy", max_loras_per_batch=2, max_lora_rank=8, max_total_tokens=64, max_sessions=1, page_size=1
)
VOCAB, CONTEXT = 1024, 4096  # the dummy network's

# (op, outcome): "ok" or the documented error class of its `Rejected`
SCRIPT: list[tuple[O.Op, str]] = [
    # adapters
    (O.LoadAdapter("a", "gen:4:1"), "ok"),
    (O.LoadAdapter("a", "gen:2:2"), "DuplicateAdapterError"),
    (O.LoadAdapter("", "gen:2:2"), "AdapterError"),
    (O.LoadAdapter(7, "gen:2:2"), "AdapterError"),  # type: ignore[arg-type]
    (O.LoadAdapter("b", 5), "AdapterError"),  # type: ignore[arg-type]
    (O.LoadAdapter("b", "gen:2:2", "yes"), "AdapterError"),  # type: ignore[arg-type]
    (O.LoadAdapter("b", "gen:x:2"), "AdapterConfigError"),
    (O.LoadAdapter("b", "gen:0:2"), "AdapterConfigError"),
    (O.LoadAdapter("b", "gen:99:2"), "AdapterRankError"),
    (O.LoadAdapter("b", "gen:2:2:x"), "AdapterConfigError"),
    (O.LoadAdapter("b", "gen:2:2:1:rsx"), "AdapterConfigError"),
    (O.LoadAdapter("b", "gen:2:18446744073709551616"), "AdapterConfigError"),
    (O.LoadAdapter("b", "/nonexistent/adapter/dir"), "AdapterNotFoundError"),
    (O.LoadAdapter("b", "gen:2:2", True), "ok"),  # pinned: loaded into a slot at once
    (O.LoadAdapter("c", "gen:2:3", True), "AdapterError"),  # a second pin > P - 1 = 1
    (O.LoadAdapter("c", "gen:2:3:4.5:rs"), "ok"),
    (O.PinAdapter("b"), "AdapterError"),  # already pinned
    (O.PinAdapter("zz"), "AdapterNotFoundError"),
    (O.PinAdapter(3), "AdapterNotFoundError"),  # type: ignore[arg-type]
    (O.PinAdapter("c"), "AdapterError"),  # P - 1 pins already
    (O.UnpinAdapter("c"), "AdapterError"),  # not pinned
    (O.UnpinAdapter("zz"), "AdapterNotFoundError"),
    (O.UnpinAdapter("b"), "ok"),
    (O.PinAdapter("c"), "ok"),  # loads c, evicting the idle b
    (O.UnpinAdapter("c"), "ok"),
    # requests
    (O.AddRequest("r0", (1, 2, 3), "a", 2), "ok"),
    (O.AddRequest("r0", (1, 2), None, 2), "RequestError"),  # id reused
    (O.AddRequest("", (1, 2), None, 2), "RequestError"),
    (O.AddRequest("r1", (), None, 2), "RequestError"),
    (O.AddRequest("r1", (1, VOCAB), None, 2), "RequestError"),
    (O.AddRequest("r1", (1, -1), None, 2), "RequestError"),
    (O.AddRequest("r1", (1, True), None, 2), "RequestError"),  # type: ignore[arg-type]
    (O.AddRequest("r1", "abc", None, 2), "RequestError"),  # type: ignore[arg-type]
    (O.AddRequest("r1", (1, 2), None, 0), "RequestError"),
    (O.AddRequest("r1", (1, 2), None, 1.5), "RequestError"),  # type: ignore[arg-type]
    (O.AddRequest("r1", (1, 2), "zz", 2), "RequestError"),
    (O.AddRequest("r1", (1, 2), 4, 2), "RequestError"),  # type: ignore[arg-type]
    (O.AddRequest("r1", (1, 2), None, 2, "nope"), "RequestError"),
    (O.AddRequest("r1", tuple([1] * 65), None, 2), "RequestError"),  # > max_total_tokens
    (O.AddRequest("r1", (1, 2), None, CONTEXT), "RequestError"),  # > the context
    (O.UnloadAdapter("a"), "RequestError"),  # r0 uses it
    (O.Step(), "ok"),
    (O.Abort("r0"), "ok"),
    (O.Abort("r0"), "RequestError"),  # already ended
    (O.Abort("ghost"), "RequestError"),
    (O.Abort(None), "RequestError"),  # type: ignore[arg-type]
    # sessions
    (O.OpenSession("s"), "ok"),
    (O.OpenSession("s"), "RequestError"),
    (O.OpenSession("t"), "RequestError"),  # max_sessions = 1
    (O.OpenSession(""), "RequestError"),
    (O.AddRequest("t1", (5, 6), "a", 1, "s"), "ok"),
    (O.AddRequest("t2", (5, 6), "a", 1, "s"), "RequestError"),  # a live turn already
    (O.Step(), "ok"),
    (O.Step(), "ok"),
    (O.AddRequest("t2", (7,), "c", 1, "s"), "RequestError"),  # the session's KV is a's
    (O.UnloadAdapter("a"), "RequestError"),  # the session holds a's KV
    (O.AddRequest("t2", (7,), "a", 4, "s"), "ok"),
    (O.CloseSession("s"), "ok"),  # aborts t2
    (O.CloseSession("s"), "RequestError"),
    (O.CloseSession(1), "RequestError"),  # type: ignore[arg-type]
    # transfers and clock
    (O.CompleteTransfers(None), "ok"),
    (O.CompleteTransfers(2), "ok"),
    (O.CompleteTransfers(-1), "RequestError"),
    (O.CompleteTransfers(True), "RequestError"),  # type: ignore[arg-type]
    (O.FailTransfers(1), "ok"),
    (O.FailTransfers(-1), "RequestError"),
    (O.FailTransfers(None), "RequestError"),  # type: ignore[arg-type]
    (O.AdvanceClock(0.5), "ok"),
    (O.AdvanceClock(-1.0), "RequestError"),
    (O.AdvanceClock(math.inf), "RequestError"),
    (O.AdvanceClock(math.nan), "RequestError"),
    (O.AdvanceClock(True), "RequestError"),  # type: ignore[arg-type]
    (O.UnloadAdapter("zz"), "AdapterNotFoundError"),
    (O.UnloadAdapter("c"), "ok"),
    (O.UnloadAdapter("a"), "ok"),
]


def _outcome(events: list[E.Event]) -> str:
    rejected = [e for e in events if isinstance(e, E.Rejected)]
    return rejected[0].error if rejected else "ok"


def test_engine_meets_every_documented_obligation() -> None:
    eng = Engine(CFG)
    assert (eng.network.vocab_size, eng.network.max_context_len) == (VOCAB, CONTEXT)
    m = ReferenceModel(CFG, vocab_size=VOCAB, max_context_len=CONTEXT)
    for op, want in SCRIPT:
        verdict = predict(m, op).verdict
        assert verdict == ("accept" if want == "ok" else "reject") or verdict == "either", (op, verdict)
        events = eng.apply(op)
        assert _outcome(events) == want, (op, events)
        assert m.observe(op, events) == [], (op, events)
    assert {type(op).__name__ for op, _ in SCRIPT} == set(O.OPS)


def test_either_only_where_the_model_cannot_know() -> None:
    m = ReferenceModel(CFG)  # no vocabulary or context: AddRequest's fate stays open
    assert predict(m, O.AddRequest("r", (1,), None, 1)).verdict == "either"
    assert predict(m, O.AddRequest("r", (-1,), None, 1)).verdict == "reject"
    m = ReferenceModel(CFG, vocab_size=VOCAB, max_context_len=CONTEXT)
    assert predict(m, O.AddRequest("r", (1,), None, 1)).verdict == "accept"
    assert predict(m, O.LoadAdapter("d", "/some/peft/dir")).verdict == "either"
    for ok in ("gen:4:1", "gen:4:1:8", "gen:4:1:0.5:rs", "gen:4:18446744073709551615"):
        assert predict(m, O.LoadAdapter("d", ok)).verdict == "accept", ok
    for bad in (
        "gen",
        "gen:",
        "gen:4",
        "gen:0:1",
        "gen:4:-1",
        "gen:4:1:x",
        "gen:4:1:1.:rs",
        "gen:4:1:1:r",
        "gen:4:1:1:rs:",
    ):
        want = predict(m, O.LoadAdapter("d", bad))
        assert (want.verdict, want.errors) == ("reject", {"AdapterConfigError"}), bad


# -- hand-made streams that break an obligation ----------------------------------------------

SETUP = [E.AdapterRegistered("a", 4), E.LoadStarted("a", 0, False), E.LoadCompleted("a", 0), E.Queued("r0", "a", 3, 2)]

Case = tuple[O.Op, list[E.Event], str, str]  # op, its events, invariant, text of the message
BROKEN: dict[str, Case] = {
    "valid abort refused": (O.Abort("r0"), [E.Rejected("Abort", "RequestError", "no")], "rejected-valid", "valid"),
    "abort ignored": (O.Abort("r0"), [], "effect", "must be Aborted(rid=r0, state=waiting)"),
    "abort reports the wrong state": (
        O.Abort("r0"),
        [E.Aborted("r0", "decoding")],
        "effect",
        "must be Aborted(rid=r0, state=waiting)",
    ),
    "abort of an unknown request accepted": (O.Abort("zz"), [], "accepted-invalid", "unknown or retired"),
    "wrong error class": (
        O.UnpinAdapter("a"),
        [E.Rejected("UnpinAdapter", "AdapterNotFoundError", "no")],
        "error-class",
        "expects ['AdapterError']",
    ),
    "refusal with other events": (
        O.Abort("zz"),
        [E.Rejected("Abort", "RequestError", "no"), E.Idle()],
        "rejected-effect",
        "only event",
    ),
    "refusal naming another op": (O.Abort("zz"), [E.Rejected("Step", "RequestError", "no")], "rejected-effect", ""),
    "pin accepted without pinning": (O.PinAdapter("a"), [], "effect", "no Pinned(name=a)"),
    "pin of a non-resident adapter without a load": (
        O.PinAdapter("b"),
        [E.Pinned("b")],
        "effect",
        "no LoadStarted",
    ),
    "unload leaves the slot mapped": (O.UnloadAdapter("b"), [E.AdapterUnregistered("b")], "effect", ""),
    "load registers another rank": (
        O.LoadAdapter("c", "gen:2:1"),
        [E.AdapterRegistered("c", 4)],
        "effect",
        "AdapterRegistered(name=c, rank=2",
    ),
    "request queued with another length": (
        O.AddRequest("r1", (1, 2), None, 1),
        [E.Queued("r1", None, 3, 1)],
        "effect",
        "prompt_len=2",
    ),
    "clock advanced by another step": (O.AdvanceClock(1.0), [E.ClockAdvanced(2.0)], "effect", "now=1.0"),
    "a step queues a request": (O.Step(), [E.Queued("r1", None, 2, 1)], "unexpected-event", "cannot cause"),
    "a step refused": (O.Step(), [E.Rejected("Step", "RequestError", "no")], "rejected-valid", ""),
    "idle with other events": (
        O.Step(),
        [E.LoadStarted("b", 1, False), E.LoadCompleted("b", 1), E.Idle()],
        "unexpected-event",
        "Idle",
    ),
    "an unpin that also evicts": (
        O.OpenSession("s"),
        [E.SessionOpened("s"), E.Evicted("a", 0)],
        "unexpected-event",
        "Evicted",
    ),
    "transfers completed, a load not landed": (
        O.CompleteTransfers(None),
        [E.TransfersCompleted(1)],
        "effect",
        "load of 'b' did not land",
    ),
    "close session without aborting its turn": (
        O.CloseSession("s"),
        [E.SessionClosed("s", 0)],
        "effect",
        "no Aborted(rid=t",
    ),
}

PRE: dict[str, list[E.Event]] = {
    "pin accepted without pinning": [],
    "pin of a non-resident adapter without a load": [E.AdapterRegistered("b", 2)],
    "unload leaves the slot mapped": [
        E.AdapterRegistered("b", 2),
        E.LoadStarted("b", 1, False),
        E.LoadCompleted("b", 1),
    ],
    "transfers completed, a load not landed": [E.AdapterRegistered("b", 2), E.LoadStarted("b", 1, True)],
    "close session without aborting its turn": [E.SessionOpened("s"), E.Queued("t", None, 2, 1, "s")],
    "idle with other events": [E.AdapterRegistered("b", 2)],
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_obligation_is_refused(case: str) -> None:
    op, events, invariant, text = BROKEN[case]
    m = ReferenceModel(CFG, vocab_size=VOCAB, max_context_len=CONTEXT, policy=frozenset())
    assert m.observe_events([*SETUP, *PRE.get(case, [])]) == []
    out = [v for v in m.observe(op, events) if v.pool == "obligation"]
    assert [v.invariant for v in out] == [invariant], [str(v) for v in out]
    assert out[0].message.startswith(f"{op.kind}: ") and text in out[0].message, out[0].message


def test_an_op_kind_without_a_rule_is_a_violation() -> None:
    class Reset(O.Op):  # not registered: an op kind the model has never heard of
        pass

    m = ReferenceModel(CFG)
    out: list[Violation] = m.observe(Reset(), [])
    assert [(v.pool, v.invariant) for v in out] == [("model", "unhandled-op")]


def test_obligations_hold_in_accepted_streams() -> None:
    """The same kinds of ops with their correct effects raise nothing."""
    m = ReferenceModel(CFG, vocab_size=VOCAB, max_context_len=CONTEXT, policy=frozenset())
    assert m.observe_events(SETUP) == []
    good: list[tuple[O.Op, list[Any]]] = [
        (O.PinAdapter("a"), [E.Pinned("a")]),
        (O.UnpinAdapter("a"), [E.Unpinned("a")]),
        (O.LoadAdapter("c", "gen:2:1", True), [E.AdapterRegistered("c", 2, True), *_load("c", 1), E.Pinned("c")]),
        (O.AdvanceClock(0.25), [E.ClockAdvanced(0.25)]),
        (O.AdvanceClock(0.5), [E.ClockAdvanced(0.75)]),
        (O.Abort("r0"), [E.Aborted("r0", "waiting")]),
        (O.UnloadAdapter("a"), [E.Evicted("a", 0), E.AdapterUnregistered("a")]),
        (O.UnloadAdapter("c"), [E.Unpinned("c"), E.Evicted("c", 1), E.AdapterUnregistered("c")]),
        (O.Step(), [E.Idle()]),
    ]
    for op, events in good:
        assert m.observe(op, events) == [], op


def _load(name: str, slot: int) -> list[E.Event]:
    return [E.LoadStarted(name, slot, False), E.LoadCompleted(name, slot)]
