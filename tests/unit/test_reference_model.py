"""The reference model (`lorainv.model.reference`).

1. It refuses illegal event sequences: one hand-written bad sequence per rule, each asserting
   that ``observe_events`` (refinement alone: no op obligations, no policy; those have
   their own tests in test_obligations.py and test_policy.py) returns exactly one violation
   naming the refused event.
2. It accepts everything the real engine emits, across networks, page sizes, chunk sizes,
   overlap on/off, sessions, aborts, drains and retraction pressure, with every checker and
   ``RefinementChecker(model)`` clean after every op.
3. It stays pure Python: importing and running it never imports torch.
"""

from __future__ import annotations

import collections
import random
import subprocess
import sys
from typing import Any

import pytest
from checker_states import Driver, busy, dummy_config, evicting, random_ops

from lorainv import events as E
from lorainv.config import RuntimeConfig
from lorainv.model.reference import ReferenceModel
from lorainv.ops import AddRequest, OpenSession

# P = 2 slots, pages of 2 tokens, chunks of at most 8 tokens, ranks up to 16
CFG = RuntimeConfig(network="dummy", page_size=2, max_loras_per_batch=2, chunked_prefill_size=8, max_total_tokens=64)

# -- building blocks of event sequences ------------------------------------------------------------


def reg(*names: str) -> list[E.Event]:
    return [E.AdapterRegistered(n, 4) for n in names]


def load(adapter: str | None, slot: int) -> list[E.Event]:
    return [E.LoadStarted(adapter, slot, False), E.LoadCompleted(adapter, slot)]


def prefill(rid: str, adapter: str | None, n: int, *, token: bool = True) -> list[E.Event]:
    """One prefill round of ``n`` tokens that completes ``rid``'s prompt (and yields a token)."""
    ev: list[E.Event] = [E.BatchFormed("prefill", (rid,), (adapter,), 1), E.Scheduled(rid, n, True)]
    return [*ev, E.Decoded(rid, 7)] if token else ev


def decode(*pairs: tuple[str, str | None]) -> list[E.Event]:
    rids, adapters = tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
    runs = sum(1 for i, a in enumerate(adapters) if i == 0 or adapters[i - 1] != a)
    return [E.BatchFormed("decode", rids, adapters, runs), *[E.Decoded(r, 7) for r in rids]]


# r0 on adapter a, 4-token prompt, 3 new tokens, decoding with 1 output
RUNNING_A = [*reg("a", "b", "c"), *load("a", 0), E.Queued("r0", "a", 4, 3), *prefill("r0", "a", 4)]
# r0 finished by length (1 new token)
DONE_A = [*reg("a"), *load("a", 0), E.Queued("r0", "a", 4, 1), *prefill("r0", "a", 4), E.Finished("r0", "length")]
# session s: turn t1 (3 prompt + 1 output) saved with kv 3; turn t2 (2 prompt tokens) queued
SESSION = [
    *reg("a"),
    *load("a", 0),
    E.SessionOpened("s"),
    E.Queued("t1", "a", 3, 1, "s"),
    *prefill("t1", "a", 3),
    E.SessionSaved("s", "t1", 3),
    E.Finished("t1", "length"),
    E.Queued("t2", "a", 2, 4, "s"),
]
# r0's 8 aligned tokens (of 9 + 1 output) went into the prefix cache; r1 shares the prompt
CACHED = [
    *reg("a"),
    *load("a", 0),
    E.Queued("r0", "a", 9, 1),
    E.BatchFormed("prefill", ("r0",), ("a",), 1),
    E.Scheduled("r0", 8, False),
    E.BatchFormed("prefill", ("r0",), ("a",), 1),
    E.Scheduled("r0", 1, True),
    E.Decoded("r0", 7),
    E.CacheInserted("r0", 8),
    E.Finished("r0", "length"),
    E.Queued("r1", "a", 12, 2),
]
DRAINING = [
    *reg("a", "b", "c"),
    *load("a", 0),
    *load("b", 1),
    E.Queued("ra", "a", 2, 4),
    E.Queued("rb", "b", 2, 4),
    E.Queued("rc", "c", 2, 4),
    E.BatchFormed("prefill", ("ra", "rb"), ("a", "b"), 2),
    E.Scheduled("ra", 2, True),
    E.Decoded("ra", 7),
    E.Scheduled("rb", 2, True),
    E.Decoded("rb", 7),
]

# ra (adapter a) stopped running with a marked for c: the drain freed a slot, reserved for c
RESERVED = [
    *DRAINING,
    E.DrainMarked("a", "c"),
    E.Finished("ra", "abort"),
    E.DrainCleared("a"),
    E.SlotReserved("c"),
]

Case = tuple[list[E.Event], list[E.Event], str]

# (setup, tail, why): the setup and every event of the tail but the last are allowed; the
# last is refused, with ``why`` in the message. The tail is observed as one op, since a
# batch's `Scheduled`/`Decoded` events must follow its `BatchFormed` within the same op.
REFUSED: dict[str, Case] = {
    # requests
    "request id reused": ([*reg("a"), E.Queued("r0", "a", 4, 3)], [E.Queued("r0", None, 2, 1)], "request id reused"),
    "queued on a closed session": ([], [E.Queued("r0", None, 2, 1, "s")], "session s is not open"),
    "queued on an unregistered adapter": ([], [E.Queued("r0", "zz", 2, 1)], "adapter zz is not registered"),
    "second live turn of a session": (SESSION, [E.Queued("t3", "a", 2, 4, "s")], "already has a live turn"),
    "scheduled on an adapter not loaded": (
        [*reg("a"), E.Queued("r0", "a", 4, 3)],
        [E.BatchFormed("prefill", ("r0",), ("a",), 1)],
        "not loaded and waited on",
    ),
    "scheduled on an adapter still loading": (
        [*reg("a"), E.LoadStarted("a", 0, True), E.Queued("r0", "a", 4, 3)],
        [E.BatchFormed("prefill", ("r0",), ("a",), 1)],
        "not loaded and waited on",
    ),
    "ran on another adapter": (
        [*RUNNING_A, *load("b", 1)],
        [E.BatchFormed("decode", ("r0",), ("b",), 1)],
        "r0 ran on 'b', not its adapter 'a'",
    ),
    "more adapters in a batch than slots": (
        [*reg("a", "b", "c")],
        [E.BatchFormed("prefill", ("r0", "r1", "r2"), ("a", "b", "c"), 3)],
        "3 adapters in a batch > 2 slots",
    ),
    "segment count from the batch size": (
        [*reg("a"), *load("a", 0), E.Queued("r0", "a", 2, 2), E.Queued("r1", "a", 2, 2)],
        [E.BatchFormed("prefill", ("r0", "r1"), ("a", "a"), 2)],
        "2 LoRA segments for 1 runs",
    ),
    "finished request scheduled again": (
        DONE_A,
        [E.BatchFormed("prefill", ("r0",), ("a",), 1)],
        "r0 is finished, expected waiting/prefilling",
    ),
    "finished request decoded again": (
        DONE_A,
        [E.BatchFormed("decode", ("r0",), ("a",), 1)],
        "r0 is finished, expected decoding",
    ),
    "aborted request scheduled again": (
        [*reg("a"), *load("a", 0), E.Queued("r0", "a", 4, 3), E.Aborted("r0", "waiting")],
        [E.BatchFormed("prefill", ("r0",), ("a",), 1)],
        "r0 is aborted",
    ),
    "chunk outside its batch": (
        [*reg("a"), *load("a", 0), E.Queued("r0", "a", 4, 3)],
        [E.Scheduled("r0", 4, True)],
        "outside a batch",
    ),
    "chunk over chunked_prefill_size": (
        [*reg("a"), *load("a", 0), E.Queued("r0", "a", 12, 3)],
        [E.BatchFormed("prefill", ("r0",), ("a",), 1), E.Scheduled("r0", 12, True)],
        "over chunked_prefill_size",
    ),
    "last chunk not marked done": (
        [*reg("a"), *load("a", 0), E.Queued("r0", "a", 4, 3)],
        [E.BatchFormed("prefill", ("r0",), ("a",), 1), E.Scheduled("r0", 4, False)],
        "chunk reaches 4 of 4 tokens but done=False",
    ),
    "chunk past the prompt": (
        [*reg("a"), *load("a", 0), E.Queued("r0", "a", 4, 3)],
        [E.BatchFormed("prefill", ("r0",), ("a",), 1), E.Scheduled("r0", 6, True)],
        "chunk reaches 6 of 4 tokens",
    ),
    "decoded past max_new_tokens": (
        [*reg("a"), *load("a", 0), E.Queued("r0", "a", 4, 1), *prefill("r0", "a", 4)],
        decode(("r0", "a")),
        "past max_new_tokens",
    ),
    "decoded outside a batch": (RUNNING_A, [E.Decoded("r0", 7)], "outside the batch"),
    "decoded while waiting": (
        [*reg("a"), E.Queued("r0", "a", 4, 3)],
        [E.Decoded("r0", 7)],
        "r0 is waiting, expected decoding",
    ),
    "finished by length too early": (RUNNING_A, [E.Finished("r0", "length")], "by length with 1 of 3 tokens"),
    "finished for an unknown reason": (RUNNING_A, [E.Finished("r0", "bored")], "unknown finish reason 'bored'"),
    "finished twice": (DONE_A, [E.Finished("r0", "abort")], "r0 is finished"),
    "aborted in another state": (RUNNING_A, [E.Aborted("r0", "waiting")], "aborted in state waiting"),
    "aborted after it finished": (DONE_A, [E.Aborted("r0", "finished")], "r0 is finished"),
    "unknown request": ([], [E.Aborted("ghost", "waiting")], "unknown request ghost"),
    "retracted with wrong output count": (RUNNING_A, [E.Retracted("r0", 0)], "retracted with 0 outputs"),
    "retracted while waiting": (
        [*reg("a"), E.Queued("r0", "a", 4, 3)],
        [E.Retracted("r0", 0)],
        "r0 is waiting, expected prefilling/decoding",
    ),
    # prefix cache
    "cache hit bigger than the cache": (
        [*reg("a"), E.Queued("r0", "a", 10, 2)],
        [E.PrefixHit("r0", 4, "cache")],
        "hit larger than the cache",
    ),
    "cache hit not page aligned": (CACHED, [E.PrefixHit("r1", 3, "cache")], "bad cache hit of 3 tokens"),
    "cache hit of the whole prompt": (
        [*CACHED[:-1], E.Queued("r1", "a", 8, 2)],
        [E.PrefixHit("r1", 8, "cache")],
        "bad cache hit of 8 tokens for fill 8",
    ),
    "cache insert beyond the request's own tokens": (
        [*CACHED[:-1], E.Queued("r1", "a", 12, 2), E.PrefixHit("r1", 8, "cache"), *prefill("r1", "a", 4)],
        [E.CacheInserted("r1", 6)],
        "inserted 6 tokens; the request had 4 of its own",
    ),
    "cache insert not page aligned": (RUNNING_A, [E.CacheInserted("r0", 3)], "inserted 3 tokens"),
    "cache eviction bigger than the cache": (CACHED, [E.CacheEvicted(10)], "evicted 10 tokens from a cache of 8"),
    # sessions
    "session opened twice": ([E.SessionOpened("s")], [E.SessionOpened("s")], "session s opened twice"),
    "session restore with wrong token count": (
        SESSION,
        [E.SessionRestored("s", "t2", 4)],
        "session s cannot lend 4 tokens to t2",
    ),
    "session restored to a request of another session": (
        [*SESSION, E.SessionOpened("s2"), E.Queued("u", "a", 2, 2, "s2")],
        [E.SessionRestored("s", "u", 3)],
        "session s cannot lend 3 tokens to u",
    ),
    "session saved with wrong token count": (
        [*SESSION, E.SessionRestored("s", "t2", 3), *prefill("t2", "a", 3)],
        [E.SessionSaved("s", "t2", 7)],
        "session s cannot take 7 tokens from t2",
    ),
    "session closed while lent": (
        [*SESSION, E.SessionRestored("s", "t2", 3), *prefill("t2", "a", 3)],
        [E.SessionClosed("s", 4)],
        "session s closed while unknown or lent",
    ),
    "session closed with wrong freed count": (SESSION[:-1], [E.SessionClosed("s", 2)], "freed 2, held 4"),
    "unknown session closed": ([], [E.SessionClosed("s", 0)], "closed while unknown"),
    # adapters
    "adapter registered twice": (reg("a"), [E.AdapterRegistered("a", 4)], "registered twice"),
    "adapter rank over max_lora_rank": ([], [E.AdapterRegistered("a", 32)], "with rank 32"),
    "adapter unregistered while in use": (RUNNING_A, [E.AdapterUnregistered("a")], "while live requests use it"),
    "adapter unregistered while resident": (
        [*reg("a"), *load("a", 0)],
        [E.AdapterUnregistered("a")],
        "while resident or pinned",
    ),
    "pin of an adapter not resident": (reg("a"), [E.Pinned("a")], "not resident or more than P-1 pins"),
    "unpin of an adapter not pinned": ([*reg("a"), *load("a", 0)], [E.Unpinned("a")], "a, which is not pinned"),
    "more than P-1 pins": (
        [*reg("a", "b"), *load("a", 0), *load("b", 1), E.Pinned("a")],
        [E.Pinned("b")],
        "more than P-1 pins",
    ),
    "load into an occupied slot": ([*reg("a", "b"), *load("a", 0)], [E.LoadStarted("b", 0, True)], "occupied"),
    "load into a slot out of range": (reg("a"), [E.LoadStarted("a", 2, True)], "out of range"),
    "load of a resident adapter": ([*reg("a"), *load("a", 0)], [E.LoadStarted("a", 1, True)], "already resident"),
    "load of an unregistered adapter": ([], [E.LoadStarted("zz", 0, True)], "not registered"),
    "load completed without a start": (reg("a"), [E.LoadCompleted("a", 0)], "'a' was not loading into slot 0"),
    "load completed twice": ([*reg("a"), *load("a", 0)], [E.LoadCompleted("a", 0)], "was not loading"),
    "load completed into another slot": (
        [*reg("a"), E.LoadStarted("a", 0, True)],
        [E.LoadCompleted("a", 1)],
        "'a' was not loading into slot 1",
    ),
    "load failed without a start": (reg("a"), [E.LoadFailed("a", 0, "io")], "was not loading"),
    "eviction of a pinned adapter": (
        [*reg("a"), *load("a", 0), E.Pinned("a")],
        [E.Evicted("a", 0)],
        "evicted pinned adapter 'a'",
    ),
    "eviction of an adapter a running request uses": (
        RUNNING_A,
        [E.Evicted("a", 0)],
        "while running requests ['r0'] use it",
    ),
    "eviction of an adapter still loading": (
        [*reg("a"), E.LoadStarted("a", 0, True)],
        [E.Evicted("a", 0)],
        "or it loads",
    ),
    "eviction from the wrong slot": ([*reg("a"), *load("a", 0)], [E.Evicted("a", 1)], "'a' is not in slot 1"),
    # drainer
    "drain mark on an adapter that is not running": (DRAINING, [E.DrainMarked("c", "b")], "not running"),
    "second drainer for the same starving adapter": (
        [*DRAINING, E.DrainMarked("a", "c")],
        [E.DrainMarked("b", "c")],
        "already draining / drained for",
    ),
    "adapter marked twice": (
        [*DRAINING, E.DrainMarked("a", "c")],
        [E.DrainMarked("a", None)],
        "already draining",
    ),
    "drain cleared that was never marked": (DRAINING, [E.DrainCleared("a")], "'a' was not draining"),
    "drain for an adapter that runs": (DRAINING, [E.DrainMarked("a", "b")], "does not starve"),
    "second drain at once (preempt policy)": (
        [*DRAINING, E.Queued("rn", None, 2, 4), E.DrainMarked("a", "c")],
        [E.DrainMarked("b", None)],
        "one at a time",
    ),
    "drain retraction of an adapter that does not drain": (
        DRAINING,
        [E.Retracted("ra", 1, "drain")],
        "its adapter 'a' does not drain",
    ),
    "drain retraction before progress since admission": (
        [*DRAINING, E.DrainMarked("a", "c"), E.Retracted("ra", 1, "drain"), *prefill("ra", "a", 3, token=False)],
        [E.Retracted("ra", 1, "drain")],
        "before it produced a token since admission",
    ),
    "retraction for an unknown reason": (DRAINING, [E.Retracted("ra", 1, "whim")], "unknown retraction reason"),
    "slot reserved without a drain": (DRAINING, [E.SlotReserved("c")], "without a drain that freed one"),
    "reservation that never was ends": (DRAINING, [E.ReservationEnded("c", "gone")], "had none"),
    "reservation gone while its requests wait": (
        RESERVED,
        [E.ReservationEnded("c", "gone")],
        "while its requests wait",
    ),
    # transfers and clock
    "negative transfer count": ([], [E.TransfersCompleted(-1)], "negative transfer counts"),
    "clock going back": ([E.ClockAdvanced(2.0)], [E.ClockAdvanced(1.0)], "the clock went from 2.0 back to 1.0"),
}
# a batch taking a slot reserved for a starving adapter is lorainv's drain policy, not safety:
# see test_policy.py ("max-loras-per-batch")

# event kinds whose handler never refuses (the op obligations judge them instead)
NEVER_REFUSED = {"Rejected", "Idle"}


def _ids(ev: E.Event) -> tuple[Any, ...]:
    for name in ("rid", "adapter", "name", "session_id"):
        if hasattr(ev, name):
            return (getattr(ev, name),)
    return ()


@pytest.mark.parametrize("case", list(REFUSED), ids=list(REFUSED))
def test_model_refuses(case: str) -> None:
    setup, tail, why = REFUSED[case]
    m = ReferenceModel(CFG)
    assert m.observe_events(setup) == [], "the setup must be a legal sequence"
    out = m.observe_events(tail, "Step")
    assert len(out) == 1, [str(v) for v in out]
    v = out[0]
    bad = tail[-1]
    assert (v.pool, v.invariant) == ("model", "refinement")
    assert v.message.startswith(f"Step: {bad} not allowed: "), v.message
    assert why in v.message, v.message
    assert v.offenders == _ids(bad)
    assert m.violations == out


def test_every_event_kind_with_a_rule_has_a_refusal_case() -> None:
    """A new ``_on_<Event>`` rule must come with a hand-written bad sequence above."""
    ruled = {name[4:] for name in dir(ReferenceModel) if name.startswith("_on_")}
    refused = {tail[-1].kind for _, tail, _ in REFUSED.values()}
    assert ruled - refused == NEVER_REFUSED


def test_every_event_kind_has_a_rule() -> None:
    """An event the model has no rule for is a violation, so every kind needs a handler."""
    ruled = {name[4:] for name in dir(ReferenceModel) if name.startswith("_on_")}
    assert set(E.EVENTS) - ruled == set()


def test_an_event_without_a_rule_is_a_violation() -> None:
    class Blind(ReferenceModel):
        _on_Idle = None  # type: ignore[assignment]

    m = Blind(CFG)
    out = m.observe_events([E.Idle()], "Step")
    assert [(v.pool, v.invariant, v.offenders) for v in out] == [("model", "unhandled-event", ("Idle",))]


def test_model_survives_a_turn_of_a_closed_session() -> None:
    """A bad trace (the session closed under a waiting turn) yields violations, not a crash."""
    m = ReferenceModel(CFG)
    out = m.observe_events(
        [*reg("a"), *load("a", 0), E.SessionOpened("s"), E.Queued("t1", "a", 3, 2, "s"), E.SessionClosed("s", 0)],
        "Step",
    )
    assert [v.message for v in out] == [
        "Step: SessionClosed(session_id=s, freed_tokens=0) not allowed: session s has a live turn t1"
    ]
    out = m.observe_events(prefill("t1", "a", 3))
    assert out and all(v.offenders == ("t1",) for v in out)
    assert "session s is not open" in out[0].message


def test_model_predictions_follow_the_events() -> None:
    m = ReferenceModel(CFG)
    assert m.observe_events([*CACHED, E.PrefixHit("r1", 8, "cache"), *prefill("r1", "a", 4)]) == []
    assert m.s.cache_tokens == 8 and m.held("r1") == 12 - 8  # pages(kv 12) minus the 8 borrowed
    assert m.expected_available() == 64 - 8 - 4
    assert m.observe_events([E.Retracted("r1", 1)]) == []
    assert m.held("r1") == 0 and m.expected_available() == 64 - 8
    assert m.resident() == {"a": 0} and m.live() == {"r1"}


# -- acceptance: the model allows whatever the real engine does ------------------------------


def test_model_accepts_the_busy_scenarios() -> None:
    for ps in (1, 2):
        d = busy(ps)  # Driver.do: model + every checker + refinement clean after each op
        d.settle()
    d = evicting()
    d.settle()
    kinds = {e.kind for _, ev in d.log for e in ev}
    assert {"DrainMarked", "DrainCleared", "Evicted"} <= kinds


def test_model_accepts_retraction_of_a_session_turn() -> None:
    d = Driver(dummy_config(page_size=2, max_total_tokens=20, chunked_prefill_size=4))
    d.run([OpenSession("s"), AddRequest("t1", (1, 2, 3, 4), None, 2, "s")])
    d.settle()
    d.run([AddRequest("x", (9, 10), None, 8), AddRequest("t2", (5, 6, 7, 8, 9, 10), None, 8, "s")])
    d.settle()
    got = [str(e) for _, ev in d.log for e in ev if e.kind in ("Retracted", "SessionRestored", "SessionSaved")]
    assert got == [
        "SessionSaved(session_id=s, rid=t1, tokens=5)",
        "SessionRestored(session_id=s, rid=t2, tokens=5)",
        "Retracted(rid=t2, output_len=3, reason=kv)",
        "SessionRestored(session_id=s, rid=t2, tokens=5)",
        "Retracted(rid=t2, output_len=3, reason=kv)",
        "SessionRestored(session_id=s, rid=t2, tokens=5)",
        "SessionSaved(session_id=s, rid=t2, tokens=19)",
    ]


# config -> event kinds that the four random runs of that config must produce (beyond the
# common ones), so that each run provably exercises what it is named after
FUZZ_CONFIGS: dict[str, tuple[dict[str, Any], set[str]]] = {
    "page1-sync-chunk4": (
        {"page_size": 1, "max_total_tokens": 64, "chunked_prefill_size": 4, "max_loras_per_batch": 2},
        {"PrefixHit", "CacheEvicted", "Evicted", "SessionRestored", "SessionSaved", "Pinned", "Unpinned"},
    ),
    "page2-overlap-pressure": (
        {
            "page_size": 2,
            "max_total_tokens": 48,
            "chunked_prefill_size": 8,
            "max_loras_per_batch": 3,
            "enable_lora_overlap_loading": True,
        },
        {"Retracted", "LoadFailed", "CacheEvicted", "SessionSaved", "SessionClosed"},
    ),
    "page2-overlap-drainer-chunk5": (
        {
            "page_size": 2,
            "max_total_tokens": 96,
            "chunked_prefill_size": 5,
            "max_loras_per_batch": 3,
            "enable_lora_overlap_loading": True,
            "lora_drain_wait_threshold": 1.0,
        },
        {"DrainMarked", "DrainCleared", "LoadFailed", "PrefixHit"},
    ),
    "page4-nocache-3running": (
        {
            "page_size": 4,
            "max_total_tokens": 64,
            "chunked_prefill_size": 16,
            "max_loras_per_batch": 4,
            "enable_prefix_cache": False,
            "max_running_requests": 3,
        },
        {"SessionSaved", "Pinned"},
    ),
    "page1-one-slot-tight": (
        {
            "page_size": 1,
            "max_total_tokens": 24,
            "chunked_prefill_size": 3,
            "max_loras_per_batch": 1,
            "max_running_requests": 4,
            "enable_lora_overlap_loading": True,
            "max_load_retries": 0,
        },
        {"Retracted", "Evicted", "LoadFailed", "CacheEvicted"},
    ),
}


@pytest.mark.parametrize("name", list(FUZZ_CONFIGS))
def test_model_accepts_random_engine_runs(name: str) -> None:
    cfg, expect = FUZZ_CONFIGS[name]
    kinds: collections.Counter[str] = collections.Counter()
    for seed in range(4):
        rng = random.Random(f"{name}/{seed}")
        d = Driver(dummy_config(**cfg))  # Driver.do: model + every checker + refinement after each op
        d.run(random_ops(rng, 120))
        d.settle(400)
        kinds.update(e.kind for _, ev in d.log for e in ev)
    assert {"Scheduled", "Decoded", "Finished", "Aborted", "LoadCompleted"} | expect <= set(kinds), kinds
    assert "CacheInserted" in kinds or not cfg.get("enable_prefix_cache", True)


def test_model_accepts_the_tiny_network() -> None:
    """Numeric mode: the real tiny Llama, overlap loading and pages of 2."""
    cfg = RuntimeConfig(
        network="tiny",
        page_size=2,
        max_total_tokens=48,
        chunked_prefill_size=6,
        max_loras_per_batch=2,
        enable_lora_overlap_loading=True,
    )
    d = Driver(cfg)
    rng = random.Random("tiny")
    d.run(random_ops(rng, 40, adapters=2, sessions=True))
    d.settle(200)
    assert {"Scheduled", "Decoded", "Finished"} <= {e.kind for _, ev in d.log for e in ev}


# -- purity ---------------------------------------------------------------------------------


def test_model_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "from lorainv.config import RuntimeConfig\n"
        "from lorainv.model.reference import ReferenceModel\n"
        "from lorainv import events as E\n"
        "from lorainv.ops import AddRequest, LoadAdapter\n"
        "m = ReferenceModel(RuntimeConfig(), vocab_size=16, max_context_len=64)\n"
        "assert m.observe(LoadAdapter('a', 'gen:4:1'), [E.AdapterRegistered('a', 4)]) == []\n"
        "assert m.observe(AddRequest('r0', (1, 2, 3), 'a', 2), [E.Queued('r0', 'a', 3, 2)]) == []\n"
        "print(sorted(k for k in sys.modules if k == 'torch' or k.startswith('torch.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -- the model's own rules (not the runtime's formulas) -------------------------------------


def test_model_retires_the_oldest_ended_requests() -> None:
    """With ``max_finished_requests=2`` the model keeps the two most recently ended requests,
    in the order they ended (not the order they arrived); live ones are never retired."""
    m = ReferenceModel(CFG.replace(max_finished_requests=2))
    queued = [E.Queued(f"r{i}", None, 2, 1) for i in range(4)]
    assert m.observe_events([*queued, E.Aborted("r2", "waiting"), E.Aborted("r0", "waiting")]) == []
    assert set(m.s.reqs) == {"r0", "r1", "r2", "r3"}
    assert m.observe_events([E.Aborted("r3", "waiting")]) == []
    assert set(m.s.reqs) == {"r0", "r1", "r3"}  # r2 ended first, so it goes first
    assert m.observe_events([E.Aborted("r1", "waiting")]) == []
    assert set(m.s.reqs) == {"r3", "r1"}
    assert m.observe_events([E.Queued("r0", None, 2, 1)]) != [], "a retired id is never reused"


def test_model_starving_adapter_rule() -> None:
    """An adapter starves when all its live requests wait (one at least) and it does not load."""
    m = ReferenceModel(CFG)
    assert m.observe_events(DRAINING) == []
    assert m._hungry("c") and not m._hungry("a") and not m._hungry("b") and not m._hungry(None)
    assert m.observe_events([E.Queued("ra2", "a", 2, 4)]) == []
    assert not m._hungry("a"), "a waiting request of a running adapter does not starve it"
    assert m.observe_events([E.Aborted("rc", "waiting")]) == []
    assert not m._hungry("c"), "nothing of c waits any more"


# -- engine-initiated aborts of waiting requests must have a reason --------------------------------
def _step(m: ReferenceModel, events: list[E.Event]) -> list[str]:
    from lorainv.ops import Step

    return [v.message for v in m.observe(Step(), events) if v.pool == "model"]


def test_an_unasked_abort_of_a_request_that_fits_is_refused() -> None:
    m = ReferenceModel(CFG)
    assert m.observe_events([*reg("a"), *load("a", 0), E.Queued("r1", "a", 4, 4)]) == []
    # nothing runs, so this Step may end a stalled request, but r1 fits and its slot is ready
    (msg,) = _step(m, [E.Finished("r1", "abort")])
    assert "aborted waiting r1 unasked, yet it fits" in msg


def test_an_abort_of_a_request_that_can_never_fit_is_allowed() -> None:
    m = ReferenceModel(CFG.replace(max_total_tokens=8))
    assert m.observe_events([*reg("a"), *load("a", 0), E.Queued("r1", "a", 6, 4)]) == []  # 6 + 4 - 1 > 8
    assert _step(m, [E.Finished("r1", "abort")]) == []


def test_load_retries_exhausted_abort_every_waiting_request_then_only() -> None:
    cfg = CFG.replace(max_load_retries=1, enable_lora_overlap_loading=True)
    fail = [E.LoadStarted("a", 0, False), E.LoadFailed("a", 0, "copy failed")]
    m = ReferenceModel(cfg)
    assert m.observe_events([*reg("a"), E.Queued("r1", "a", 4, 4), E.Queued("r2", "a", 4, 4)]) == []
    # the first failure leaves one retry: ending r1 now is refused
    (msg,) = _step(m, [*fail, E.Finished("r1", "abort")])
    assert "no load of 'a' ran out of retries" in msg
    m = ReferenceModel(cfg)
    assert m.observe_events([*reg("a"), E.Queued("r1", "a", 4, 4), E.Queued("r2", "a", 4, 4), *fail]) == []
    # the second failure exhausts the retries: both waiting requests must end in this op
    (msg,) = _step(m, [*fail, E.Finished("r1", "abort")])
    assert "exhausted, yet ['r2'] still wait" in msg
    m = ReferenceModel(cfg)
    assert m.observe_events([*reg("a"), E.Queued("r1", "a", 4, 4), E.Queued("r2", "a", 4, 4), *fail]) == []
    assert _step(m, [*fail, E.Finished("r1", "abort"), E.Finished("r2", "abort")]) == []


def test_admitting_a_request_that_can_never_fit_is_refused() -> None:
    m = ReferenceModel(CFG.replace(max_total_tokens=8))
    assert m.observe_events([*reg("a"), *load("a", 0), E.Queued("r1", "a", 6, 4)]) == []  # 6 + 4 - 1 > 8
    (msg,) = _step(m, [E.BatchFormed("prefill", ("r1",), ("a",), 1), E.Scheduled("r1", 6, True)])
    assert "admitted r1, which can never fit in 8 tokens" in msg
