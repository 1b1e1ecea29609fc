"""Real engines in interesting states, for the checker and reference-model tests.

Every state is reached through ops only (`Driver.do`), with the reference model observing
the same ops and every checker (plus refinement) clean after each one, so a test that then
corrupts a snapshot knows it started from a healthy, model-approved state.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable
from typing import Any

import numpy as np

from lorainv.checkers import all_checkers, run_checks
from lorainv.checkers.refinement import RefinementChecker
from lorainv.config import RuntimeConfig
from lorainv.errors import Violation
from lorainv.events import Event
from lorainv.impl.engine import Engine
from lorainv.model.reference import ReferenceModel
from lorainv.ops import (
    Abort,
    AddRequest,
    AdvanceClock,
    CloseSession,
    CompleteTransfers,
    FailTransfers,
    LoadAdapter,
    Op,
    OpenSession,
    PinAdapter,
    Step,
    UnloadAdapter,
    UnpinAdapter,
)
from lorainv.snapshot import ReqSnap, SessionSnap, Snapshot

PRE = tuple(range(10, 22))  # a 12-token prompt whose KV ends up in the prefix cache


def dummy_config(**kw: Any) -> RuntimeConfig:
    base: dict[str, Any] = {"network": "dummy", "max_total_tokens": 256}
    base.update(kw)
    return RuntimeConfig(**base)


class Driver:
    """An engine and a reference model driven in lockstep by the same ops."""

    def __init__(self, cfg: RuntimeConfig, *, check: bool = True) -> None:
        self.cfg = cfg
        self.engine = Engine(cfg)
        self.model = ReferenceModel(cfg)
        self.check = check
        self.log: list[tuple[Op, list[Event]]] = []

    def checkers(self) -> list[Any]:
        return all_checkers(extra=[RefinementChecker(self.model)])

    def violations(self) -> list[Violation]:
        return run_checks(self.engine.snapshot(), self.checkers())

    def do(self, op: Op) -> list[Event]:
        ev = self.engine.apply(op)
        self.log.append((op, ev))
        bad = self.model.observe(op, ev)
        assert not bad, f"model refused {op}: {[str(v) for v in bad]}"
        if self.check:
            found = self.violations()
            assert not found, f"after {op} -> {[str(e) for e in ev]}: {[str(v) for v in found]}"
        return ev

    def run(self, ops: Iterable[Op]) -> None:
        for op in ops:
            self.do(op)

    def settle(self, max_steps: int = 200) -> None:
        for _ in range(max_steps):
            if self.engine.is_idle():
                return
            self.do(CompleteTransfers(None))
            self.do(Step())
        raise AssertionError("engine did not become idle")

    def snap(self) -> Snapshot:
        return self.engine.snapshot()


def busy(page_size: int = 2) -> Driver:
    """Requests in every live state with every kind of memory, and adapters in every state.

    * ``r1`` decodes on adapter ``a`` over a 12-token prefix-cache hit (locks node of ``r0``);
    * ``u2`` decodes as turn 2 of session ``s_act``, borrowing the session's KV (active slot);
    * ``r2`` decodes on pinned adapter ``p``; ``r3`` (adapter ``a``) is staged mid-chunk;
    * ``r4`` waits for adapter ``c``, whose load is in flight;
    * session ``s_in`` holds the KV of its finished first turn (inactive slot);
    * the prefix cache also holds an unlocked node of ``rb0`` (adapter ``b``).
    """
    d = Driver(
        dummy_config(
            page_size=page_size,
            chunked_prefill_size=8,
            max_loras_per_batch=4,
            enable_lora_overlap_loading=True,
            max_sessions=4,
        )
    )
    d.run(
        [
            LoadAdapter("p", "gen:2:9", pinned=True),
            LoadAdapter("a", "gen:4:1"),
            LoadAdapter("b", "gen:8:2"),
            LoadAdapter("c", "gen:2:3"),
            OpenSession("s_in"),
            OpenSession("s_act"),
            AddRequest("r0", PRE, "a", 2),
            AddRequest("t1", (1, 2, 3, 4, 5), "b", 2, "s_in"),
            AddRequest("u1", (6, 7, 8, 9, 10, 11), "b", 2, "s_act"),
            AddRequest("rb0", tuple(range(90, 98)), "b", 2),
        ]
    )
    d.settle()
    d.run(
        [
            AddRequest("r1", (*PRE, 50, 51, 52), "a", 6),
            AddRequest("u2", (60, 61, 62), "b", 6, "s_act"),
            AddRequest("r2", (70, 71, 72, 73), "p", 6),
        ]
    )
    for _ in range(10):
        d.do(CompleteTransfers(None))
        d.do(Step())
        if all(d.engine.status(r) == "decoding" for r in ("r1", "u2", "r2")):
            break
    d.run([AddRequest("r4", (80, 81, 82), "c", 4), AddRequest("r3", tuple(range(100, 120)), "a", 4), Step()])
    s = d.snap()
    assert {r.rid: r.state for r in s.live()} == {
        "r1": "decoding",
        "u2": "decoding",
        "r2": "decoding",
        "r4": "waiting",
        "r3": "prefilling",
    }
    assert s.staged == "r3" and [ld.uid for ld in s.lora.loads] == ["c"]
    return d


def idle(page_size: int = 2) -> Driver:
    """Idle, but with a prefix-cache node and a session holding KV."""
    d = Driver(dummy_config(page_size=page_size, max_loras_per_batch=2))
    d.run(
        [
            LoadAdapter("a", "gen:4:1"),
            OpenSession("s"),
            AddRequest("r0", PRE, "a", 3),
            AddRequest("t1", (1, 2, 3), "a", 3, "s"),
        ]
    )
    d.settle()
    return d


def draining() -> Driver:
    """P=2 slots held by running ``a`` and ``b``; ``c`` starves, so ``b`` drains for it
    (admission policy: the mark holds until ``b`` finishes)."""
    d = Driver(dummy_config(max_loras_per_batch=2, lora_drain_wait_threshold=1.0, lora_drain_policy="admission"))
    d.run(
        [
            LoadAdapter("a", "gen:4:1"),
            LoadAdapter("b", "gen:4:2"),
            LoadAdapter("c", "gen:4:3"),
            AddRequest("ra", (1, 2, 3), "a", 12),
            AddRequest("rb", (4, 5, 6), "b", 4),
            Step(),
            AddRequest("rc", (7, 8), "c", 3),
            AdvanceClock(2.0),
            Step(),
        ]
    )
    assert d.snap().drainer.marks == (("b", "c"),)
    return d


def evicting() -> Driver:
    """The drain above, run on until ``b`` leaves its slot to ``c``: the last step evicted."""
    d = draining()
    for _ in range(10):
        d.do(Step())
        if d.snap().lora.evictions:
            return d
    raise AssertionError("no eviction happened")


# -- snapshot surgery ---------------------------------------------------------------------------


def req(snap: Snapshot, rid: str) -> ReqSnap:
    return next(r for r in snap.requests if r.rid == rid)


def with_req(snap: Snapshot, rid: str, **changes: Any) -> Snapshot:
    reqs = tuple(dataclasses.replace(r, **changes) if r.rid == rid else r for r in snap.requests)
    return dataclasses.replace(snap, requests=reqs)


def session(snap: Snapshot, sid: str) -> SessionSnap:
    return next(s for s in snap.sessions if s.session_id == sid)


def with_session(snap: Snapshot, sid: str, **changes: Any) -> Snapshot:
    sessions = tuple(dataclasses.replace(s, **changes) if s.session_id == sid else s for s in snap.sessions)
    return dataclasses.replace(snap, sessions=sessions)


def with_lora(snap: Snapshot, **changes: Any) -> Snapshot:
    return dataclasses.replace(snap, lora=dataclasses.replace(snap.lora, **changes))


def with_node(snap: Snapshot, node_id: int, **changes: Any) -> Snapshot:
    nodes = tuple(dataclasses.replace(n, **changes) if n.id == node_id else n for n in snap.prefix_nodes)
    return dataclasses.replace(snap, prefix_nodes=nodes)


def ints(a: Any) -> tuple[int, ...]:
    return tuple(int(x) for x in np.asarray(a).reshape(-1))


def brief(vs: list[Violation]) -> list[tuple[str, str, tuple[Any, ...]]]:
    """(pool, invariant, offenders) of each violation, the part tests compare exactly."""
    return [(v.pool, v.invariant, tuple(v.offenders)) for v in vs]


# -- random op sequences (for the model's acceptance tests) -----------------------------------


def random_ops(rng: random.Random, n: int, *, adapters: int = 4, sessions: bool = True) -> list[Op]:
    """A random but always well-formed-looking op sequence; refused ops are fine (Rejected)."""
    names = [f"a{i}" for i in range(adapters)]
    prefixes = [tuple(rng.randrange(1, 200) for _ in range(rng.randrange(2, 9))) for _ in range(3)]
    ops: list[Op] = []
    rid = 0
    for _ in range(n):
        x = rng.random()
        if x < 0.22:
            prompt = rng.choice(prefixes)[: rng.randrange(1, 9)] + tuple(
                rng.randrange(1, 200) for _ in range(rng.randrange(0, 10))
            )
            sid = f"s{rng.randrange(3)}" if sessions and rng.random() < 0.25 else None
            adapter = rng.choice([None, *names])
            ops.append(AddRequest(f"r{rid}", prompt or (1,), adapter, rng.randrange(1, 8), sid))
            rid += 1
        elif x < 0.62:
            ops.append(Step())
        elif x < 0.70:
            ops.append(CompleteTransfers(rng.choice([None, 1, 2, 5])))
        elif x < 0.75 and rid:
            ops.append(Abort(f"r{rng.randrange(rid)}"))
        elif x < 0.79:
            ops.append(LoadAdapter(rng.choice(names), f"gen:{rng.choice([1, 2, 4, 8])}:{rng.randrange(9)}"))
        elif x < 0.81:
            ops.append(UnloadAdapter(rng.choice(names)))
        elif x < 0.83:
            ops.append(PinAdapter(rng.choice(names)))
        elif x < 0.85:
            ops.append(UnpinAdapter(rng.choice(names)))
        elif x < 0.88 and sessions:
            ops.append(OpenSession(f"s{rng.randrange(3)}"))
        elif x < 0.90 and sessions:
            ops.append(CloseSession(f"s{rng.randrange(3)}"))
        elif x < 0.92:
            ops.append(FailTransfers(1))
        else:
            ops.append(AdvanceClock(rng.choice([0.5, 1.0, 3.0])))
    return ops
