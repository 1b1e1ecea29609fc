"""Policy checks (`lorainv.model.policy`): for each check, a hand-made round that breaks
lorainv's documented rule is refused under that check's name (and only it), the correct
round is accepted, and switching the check off silences it.

Setups are fed with ``observe_events`` (refinement only); the round under test is a
``Step`` observed with ``observe``.
"""

from __future__ import annotations

from typing import Any

import pytest

from lorainv import events as E
from lorainv.config import RuntimeConfig
from lorainv.model.reference import POLICY_CHECKS, ReferenceModel
from lorainv.ops import Step

BASE: dict[str, Any] = {
    "network": "dummy",
    "page_size": 1,
    "max_loras_per_batch": 2,
    "chunked_prefill_size": 8,
    "max_total_tokens": 64,
}


def reg(*names: str) -> list[E.Event]:
    return [E.AdapterRegistered(n, 4) for n in names]


def load(adapter: str | None, slot: int) -> list[E.Event]:
    return [E.LoadStarted(adapter, slot, False), E.LoadCompleted(adapter, slot)]


def prefill(*chunks: tuple[str, str | None, int, bool]) -> list[E.Event]:
    """One prefill batch of ``(rid, adapter, chunk, done)``; a done chunk yields a token."""
    adapters = tuple(c[1] for c in chunks)
    runs = sum(1 for i, a in enumerate(adapters) if i == 0 or adapters[i - 1] != a)
    ev: list[E.Event] = [E.BatchFormed("prefill", tuple(c[0] for c in chunks), adapters, runs)]
    for rid, _, n, done in chunks:
        ev += [E.Scheduled(rid, n, done), *([E.Decoded(rid, 7)] if done else [])]
    return ev


# a (slot 0) and b (slot 1) resident; r0 ran on a and finished, so a was used after b loaded
A_USED_LAST = [
    *reg("a", "b", "c"),
    *load("a", 0),
    *load("b", 1),
    E.Queued("r0", "a", 2, 1),
    *prefill(("r0", "a", 2, True)),
    E.Finished("r0", "length"),
]
# r1 decodes on a (slot 0); slot 1 is free
A_RUNS = [*reg("a", "c", "d"), *load("a", 0), E.Queued("r1", "a", 2, 4), *prefill(("r1", "a", 2, True))]
# two requests of a wait behind nothing; a is resident
TWO_WAIT = [*reg("a", "b"), *load("a", 0), E.Queued("r1", "a", 3, 2), E.Queued("r2", "a", 3, 2)]
# three decoders: r1 (4-token prompt), r2 (6), r3 (4), one output each; r3 arrived last
DECODERS = [
    *reg("a"),
    *load("a", 0),
    E.Queued("r1", "a", 4, 5),
    E.Queued("r2", "a", 6, 4),
    E.Queued("r3", "a", 4, 5),
    *prefill(("r1", "a", 4, True)),
    *prefill(("r2", "a", 6, True)),
    *prefill(("r3", "a", 4, True)),
]
# a runs r1 (4 tokens of work left) and drains for starving c
DRAINING = [
    *reg("a", "b", "c"),
    *load("a", 0),
    *load("b", 1),
    E.Queued("r1", "a", 2, 5),
    E.Queued("rc", "c", 2, 4),
    *prefill(("r1", "a", 2, True)),
    E.DrainMarked("a", "c"),
]
# ra (a) and rb (b) ran; a drained for c and stopped: its slot is reserved for c
RESERVED = [
    *reg("a", "b", "c"),
    *load("a", 0),
    *load("b", 1),
    E.Queued("ra", "a", 2, 4),
    E.Queued("rb", "b", 2, 4),
    E.Queued("rc", "c", 2, 4),
    *prefill(("ra", "a", 2, True), ("rb", "b", 2, True)),
    E.DrainMarked("a", "c"),
    E.Finished("ra", "abort"),
    E.DrainCleared("a"),
    E.SlotReserved("c"),
]

Case = tuple[dict[str, Any], list[E.Event], list[E.Event], list[E.Event], str]
# check -> cases of (config, setup, round refused, round accepted, text of the message)
CASES: dict[str, list[Case]] = {
    "eviction-victim": [
        (
            {"lora_eviction_policy": "lru"},
            A_USED_LAST,
            [E.Evicted("a", 0), E.LoadStarted("c", 0, True)],
            [E.Evicted("b", 1), E.LoadStarted("c", 1, True)],
            "lru victim for 'c' is 'b'",
        ),
        (
            {"lora_eviction_policy": "fifo"},
            A_USED_LAST,
            [E.Evicted("b", 1), E.LoadStarted("c", 1, True)],
            [E.Evicted("a", 0), E.LoadStarted("c", 0, True)],
            "fifo victim for 'c' is 'a'",
        ),
        (  # the base model goes only when it is the sole candidate, though older
            {},
            [*reg("a", "c"), *load(None, 0), *load("a", 1)],
            [E.Evicted(None, 0), E.LoadStarted("c", 0, True)],
            [E.Evicted("a", 1), E.LoadStarted("c", 1, True)],
            "victim for 'c' is 'a'",
        ),
        ({}, reg("a"), [E.LoadStarted("a", 1, True)], [E.LoadStarted("a", 0, True)], "not free 0"),
        (
            {},
            [*reg("a", "c"), *load("a", 0)],
            [E.Evicted("a", 0), E.LoadStarted("c", 0, True)],
            [E.LoadStarted("c", 1, True)],
            "while slots [1] were free",
        ),
    ],
    "no-thrash": [
        (
            {},
            A_RUNS,
            [*load("c", 1), E.Evicted("c", 1), *load("d", 1)],
            [*load("c", 1)],
            "evicted 'c', loaded in this same op",
        )
    ],
    "fcfs": [
        (
            {},
            TWO_WAIT,
            prefill(("r2", "a", 3, True)),
            prefill(("r1", "a", 3, True)),
            "passed over r1",
        ),
        (
            {},
            TWO_WAIT,
            prefill(("r2", "a", 3, True), ("r1", "a", 3, True)),
            prefill(("r1", "a", 3, True), ("r2", "a", 3, True)),
            "out of queue order",
        ),
        (  # another adapter may overtake (b's request may not fit): r1 is passed over
            {},
            [*reg("a", "b"), *load("a", 0), *load("b", 1), E.Queued("r1", "b", 3, 2), E.Queued("r2", "a", 3, 2)],
            prefill(("r2", "a", 3, True), ("r1", "b", 3, True)),
            prefill(("r2", "a", 3, True)),
            "out of queue order",
        ),
    ],
    "max-running": [
        (
            {"max_running_requests": 1},
            TWO_WAIT,
            prefill(("r1", "a", 3, True), ("r2", "a", 3, True)),
            prefill(("r1", "a", 3, True)),
            "2 requests prefill or decode > max_running_requests=1",
        )
    ],
    "prefill-budget": [
        (
            {"chunked_prefill_size": 4},
            TWO_WAIT,
            prefill(("r1", "a", 3, True), ("r2", "a", 3, True)),
            prefill(("r1", "a", 3, True), ("r2", "a", 1, False)),
            "r2 got a chunk of 3, not 1",
        ),
        (  # a chunk is as large as the budget allows
            {"chunked_prefill_size": 4},
            TWO_WAIT,
            prefill(("r1", "a", 2, False)),
            prefill(("r1", "a", 3, True), ("r2", "a", 1, False)),
            "r1 got a chunk of 2, not 3",
        ),
        (  # an unfinished chunk ends the batch
            {"chunked_prefill_size": 4},
            [*reg("a"), *load("a", 0), E.Queued("r1", "a", 6, 2), E.Queued("r2", "a", 3, 2)],
            prefill(("r1", "a", 4, False), ("r2", "a", 1, False)),
            prefill(("r1", "a", 4, False)),
            "after an unfinished chunk",
        ),
    ],
    # the pools are sized so that the decoders' next tokens do not fit: every retraction is under pressure
    "retraction-victim": [
        ({"max_total_tokens": 16}, DECODERS, [E.Retracted("r1", 1)], [E.Retracted("r2", 1)], "the rule picks r2"),
        (  # equal outputs and prompts: the latest arrival goes
            {"max_total_tokens": 9},
            [*DECODERS, E.Retracted("r2", 1)],
            [E.Retracted("r1", 1)],
            [E.Retracted("r3", 1)],
            "the rule picks r3",
        ),
        (
            {"max_total_tokens": 16},
            DECODERS,
            [E.Finished("r1", "abort")],
            [E.Retracted("r2", 1)],
            "instead of retracting",
        ),
        (
            {"max_total_tokens": 24},
            [*DECODERS, E.Queued("r4", "a", 9, 2), *prefill(("r4", "a", 8, False))],
            [E.Retracted("r4", 0)],
            [E.Retracted("r2", 1)],
            "retracted the staged r4 with 3 decoders",
        ),
    ],
    "retraction-pressure": [
        # r1, r2, r3 decode at page size 1: their next tokens need 3 tokens; 3 are free
        ({"max_total_tokens": 17}, DECODERS, [E.Retracted("r2", 1)], [E.Idle()], "with KV to spare"),
    ],
    "drain-tolerance": [
        (
            {"lora_drain_wait_threshold": 0.5, "lora_drain_policy": "admission"},
            [*DRAINING, E.Queued("r2", "a", 2, 5)],  # 5 > 1.2 x 4
            prefill(("r2", "a", 2, True)),
            [E.Idle()],
            "admitted r2 although its adapter 'a' drains",
        ),
        (
            {"lora_drain_wait_threshold": 0.5, "lora_drain_policy": "admission"},
            [*DRAINING, E.Queued("r2", "a", 2, 5), E.Queued("r3", "a", 2, 4)],  # r3: 4 <= 4.8
            prefill(("r2", "a", 2, True), ("r3", "a", 2, True)),
            prefill(("r3", "a", 2, True)),
            "admitted r2",
        ),
        (
            {"lora_drain_wait_threshold": 0.5, "lora_drain_policy": "preempt"},
            [*DRAINING, E.Queued("r3", "a", 2, 1)],
            prefill(("r3", "a", 2, True)),
            [E.Idle()],
            "admitted r3 although its adapter 'a' drains",
        ),
    ],
    "drain-threshold": [
        (  # a and b run; rc (c) has waited 0.6 s, rd (d) has just arrived: only c starves at 0.5 s
            {"lora_drain_wait_threshold": 0.5},
            [
                *reg("a", "b", "c", "d"),
                *load("a", 0),
                *load("b", 1),
                E.Queued("r1", "a", 2, 5),
                E.Queued("rb", "b", 2, 5),
                E.Queued("rc", "c", 2, 4),
                *prefill(("r1", "a", 2, True), ("rb", "b", 2, True)),
                E.ClockAdvanced(0.6),
                E.Queued("rd", "d", 2, 4),
            ],
            [E.DrainMarked("a", "d")],
            [E.DrainMarked("a", "c")],
            "its longest wait is 0 s, not over the threshold 0.5 s",
        ),
        (  # only a runs; b is resident but idle, so its slot can go to c without a drain
            {"lora_drain_wait_threshold": 0.5},
            [
                *reg("a", "b", "c"),
                *load("a", 0),
                *load("b", 1),
                E.Queued("r1", "a", 2, 5),
                E.Queued("rc", "c", 2, 4),
                *prefill(("r1", "a", 2, True)),
                E.ClockAdvanced(0.6),
            ],
            [E.DrainMarked("a", "c")],
            [E.Idle()],
            "with a slot to spare: only 1 of 2 slots are held",
        ),
    ],
    "drain-victim": [
        (  # a runs r1, b runs rb1 and rb2: b's demand is higher, so a drains for starving c
            {"lora_drain_wait_threshold": 0.5, "max_loras_per_batch": 2},
            [
                *reg("a", "b", "c"),
                *load("a", 0),
                *load("b", 1),
                E.Queued("r1", "a", 2, 5),
                E.Queued("rb1", "b", 2, 5),
                E.Queued("rb2", "b", 2, 5),
                E.Queued("rc", "c", 2, 4),
                *prefill(("r1", "a", 2, True), ("rb1", "b", 2, True), ("rb2", "b", 2, True)),
                E.ClockAdvanced(1.0),
            ],
            [E.DrainMarked("b", "c")],
            [E.DrainMarked("a", "c")],
            "'b' drains for 'c'; the rule picks 'a'",
        ),
    ],
    "max-loras-per-batch": [
        (
            {"lora_drain_wait_threshold": 0.5},
            [*RESERVED, E.Queued("rx", "a", 2, 4)],
            prefill(("rx", "a", 2, True)),
            [E.Evicted("a", 0), *load("c", 0), E.ReservationEnded("c", "admitted"), *prefill(("rc", "c", 2, True))],
            "need 3 slots",
        )
    ],
}


def _model(cfg: dict[str, Any], policy: frozenset[str] | None = None) -> ReferenceModel:
    return ReferenceModel(RuntimeConfig(**{**BASE, **cfg}), vocab_size=64, max_context_len=64, policy=policy)


def test_every_check_has_cases() -> None:
    assert set(CASES) == set(POLICY_CHECKS)


PARAMS = [(check, i) for check, cases in CASES.items() for i in range(len(cases))]


@pytest.mark.parametrize(("check", "i"), PARAMS, ids=[f"{c}-{i}" for c, i in PARAMS])
def test_check_refuses_the_broken_round(check: str, i: int) -> None:
    cfg, setup, bad, _, text = CASES[check][i]
    m = _model(cfg)
    assert m.observe_events(setup) == [], "the setup must be legal"
    out = m.observe(Step(), bad)
    assert {(v.pool, v.invariant) for v in out} == {("policy", check)}, [str(v) for v in out]
    assert any(text in v.message for v in out), [str(v) for v in out]


@pytest.mark.parametrize(("check", "i"), PARAMS, ids=[f"{c}-{i}" for c, i in PARAMS])
def test_check_accepts_the_correct_round(check: str, i: int) -> None:
    cfg, setup, _, good, _ = CASES[check][i]
    m = _model(cfg)
    assert m.observe_events(setup) == []
    assert m.observe(Step(), good) == []


@pytest.mark.parametrize("check", list(CASES))
def test_check_switched_off_is_silent(check: str) -> None:
    cfg, setup, bad, _, _ = CASES[check][0]
    m = _model(cfg, policy=frozenset(POLICY_CHECKS) - {check})
    assert m.observe_events(setup) == []
    assert m.observe(Step(), bad) == []


def test_unknown_check_name_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown policy checks"):
        _model({}, policy=frozenset({"lifo"}))
