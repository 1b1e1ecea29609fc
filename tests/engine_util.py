"""Helpers for the engine tests: a driver that runs the `Engine` and the `ReferenceModel` in
lockstep, idle-baseline and snapshot-state comparisons, and an isolated greedy oracle.

Every op goes through ``engine.apply(op)``; its events are fed to ``model.observe`` and the
snapshot is checked against the model (refinement) after every op. Engines built here run
with ``strict_mem_check=2`` so any checker violation raises `InvariantViolation` at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from lorainv import Engine, RuntimeConfig
from lorainv.checkers.liveness import drain_to_idle
from lorainv.checkers.refinement import RefinementChecker
from lorainv.events import Event
from lorainv.model.reference import ReferenceModel
from lorainv.ops import (
    Abort,
    AddRequest,
    AdvanceClock,
    CloseSession,
    CompleteTransfers,
    LoadAdapter,
    Op,
    OpenSession,
    Step,
    UnloadAdapter,
)
from lorainv.snapshot import Snapshot

E = TypeVar("E", bound=Event)

# The tiny network's matmuls are far faster single-threaded on a shared 2-core machine
# (no oversubscription); the numerics do not depend on the thread count in float64 argmax.
torch.set_num_threads(1)


def config(**kw: Any) -> RuntimeConfig:
    """A strict (level 2) config; numeric runs default to the tiny model in float64."""
    kw.setdefault("strict_mem_check", 2)
    kw.setdefault("dtype", "float64")
    return RuntimeConfig(**kw)


def of(events: Iterable[Event], cls: type[E]) -> list[E]:
    return [e for e in events if isinstance(e, cls)]


def kinds(events: Iterable[Event]) -> list[str]:
    return [e.kind for e in events]


class Driver:
    """An engine and a reference model driven in lockstep; every op is checked.

    The model observes every op the engine runs — through `apply`, the user API
    (``engine.add_request``, ``engine.step``, ``engine.generate`` ...) or ``drain_to_idle`` —
    because the driver wraps the engine's single op entry point ``_do``. After each op the
    model must accept every event and the snapshot must refine the model's state.
    """

    def __init__(self, cfg: RuntimeConfig, engine: Engine | None = None) -> None:
        """Drive a new engine for ``cfg``, or attach to a fresh ``engine`` built from it."""
        assert cfg.strict_mem_check == 2, "engine tests run at strict level 2"
        self.cfg = cfg
        self.engine = engine if engine is not None else Engine(cfg)
        assert self.engine.cfg is cfg and not self.engine.requests and not self.engine.registry
        self.model = ReferenceModel(cfg)
        self.refinement = RefinementChecker(self.model)
        self.log: list[tuple[Op, list[Event]]] = []
        self.sources: dict[str, str] = {}  # adapter name -> source of the registered adapter
        self.adapters: dict[str, Any] = {}  # source -> the `LoraAdapter` loaded from it
        inner = self.engine._do

        def observed(op: Op) -> list[Event]:
            events = inner(op)
            self._observe(op, events)
            return events

        self.engine._do = observed  # type: ignore[method-assign]

    # -- the lockstep core -----------------------------------------------------------------
    def _observe(self, op: Op, events: list[Event]) -> None:
        self.log.append((op, events))
        if isinstance(op, LoadAdapter) and events and events[0].kind == "AdapterRegistered":
            self.sources[op.name] = op.source
            self.adapters[op.source] = self.engine.registry[op.name]
        bad = self.model.observe(op, events)
        assert bad == [], f"model refused {op}: {[str(v) for v in bad]}"
        ref = self.refinement.check(self.engine.snapshot())
        assert ref == [], f"refinement after {op}: {[str(v) for v in ref]}"

    def apply(self, op: Op) -> list[Event]:
        """``engine.apply(op)``; a refused op (``Rejected``) is checked against the model too."""
        n = len(self.log)
        events = self.engine.apply(op)
        if len(self.log) == n:  # refused before any mutation: nothing reached the wrapper
            self._observe(op, events)
        return events

    @property
    def events(self) -> list[Event]:
        return [e for _, evs in self.log for e in evs]

    # -- op shorthands ---------------------------------------------------------------------
    def load(self, name: str, source: str, pinned: bool = False) -> list[Event]:
        return self.apply(LoadAdapter(name, source, pinned))

    def unload(self, name: str) -> list[Event]:
        return self.apply(UnloadAdapter(name))

    def add(
        self,
        rid: str,
        prompt: Sequence[int],
        adapter: str | None = None,
        max_new: int = 4,
        session: str | None = None,
    ) -> list[Event]:
        return self.apply(AddRequest(rid, tuple(prompt), adapter, max_new, session))

    def step(self) -> list[Event]:
        return self.apply(Step())

    def steps(self, n: int) -> list[Event]:
        return [e for _ in range(n) for e in self.step()]

    def abort(self, rid: str) -> list[Event]:
        return self.apply(Abort(rid))

    def complete(self, n: int | None = None) -> list[Event]:
        return self.apply(CompleteTransfers(n))

    def advance(self, dt: float) -> list[Event]:
        return self.apply(AdvanceClock(dt))

    def open(self, sid: str) -> list[Event]:
        return self.apply(OpenSession(sid))

    def close(self, sid: str) -> list[Event]:
        return self.apply(CloseSession(sid))

    def state(self, rid: str) -> str:
        return self.engine.status(rid)

    def req(self, rid: str) -> Any:
        return next(r for r in self.engine.snapshot().requests if r.rid == rid)

    def step_until(self, pred: Any, bound: int = 200) -> list[Event]:
        """Step (completing no transfers) until ``pred()``; the events of those steps."""
        out: list[Event] = []
        for _ in range(bound):
            if pred():
                return out
            out += self.step()
        raise AssertionError(f"condition not reached within {bound} steps")

    def run_to_idle(self, bound: int = 400) -> list[Event]:
        """Complete transfers and step through the driver (model in lockstep) until idle."""
        out: list[Event] = []
        for _ in range(bound):
            if self.engine.is_idle():
                return out
            out += self.complete()
            out += self.step()
        raise AssertionError(f"not idle after {bound} rounds; live: {live_rids(self.engine)}")

    def finish(self, bound: int = 400) -> list[Event]:
        """Run to idle, then the liveness and baseline checks every scenario ends with."""
        out = self.run_to_idle(bound)
        assert drain_to_idle(self.engine, bound) == []
        assert self.engine.check() == []
        assert_baseline(self.engine)
        assert self.model.live() == set()
        assert self.model.expected_available() == self.engine.snapshot().available
        return out

    # -- oracle ----------------------------------------------------------------------------
    def isolated(self, tokens: Sequence[int], adapter: str | None, n: int, source: str | None = None) -> list[int]:
        """``n`` greedy tokens of ``tokens`` run alone through the plain non-paged forward, with
        ``adapter`` as loaded from ``source`` (default: the adapter registered under that name now)."""
        if adapter is not None and source is None:
            source = self.sources[adapter]
        return isolated(self.engine, tokens, None if source is None else self.adapters[source], source, n)


def live_rids(engine: Any) -> list[str]:
    return [r.rid for r in engine.requests.values() if r.state.live]


def assert_baseline(engine: Any) -> None:
    """Idle baseline: only the prefix cache (all evictable) and session slots hold memory."""
    snap = engine.snapshot()
    assert snap.idle and snap.held_by_requests == 0
    assert snap.protected == 0, "an idle engine locks no prefix-cache node"
    session_tokens = sum(len(s.indices) for s in snap.sessions)
    assert snap.session_held == session_tokens
    assert snap.available == snap.total_tokens - snap.evictable - session_tokens
    session_rows = {s.row for s in snap.sessions if s.row is not None}
    assert set(snap.free_rows) == set(range(snap.rows_total)) - session_rows
    assert snap.lora.loads == ()


# -- snapshot-level state, comparable with == ------------------------------------------------
def _arr(a: np.ndarray) -> tuple[int, ...]:
    return tuple(int(x) for x in np.asarray(a).tolist())


def state_key(snap: Snapshot) -> dict[str, Any]:
    """Every pool-level field of a snapshot as plain values (clock and step excluded)."""
    return {
        "free_indices": _arr(snap.free_indices),
        "available": snap.available,
        "evictable": snap.evictable,
        "protected": snap.protected,
        "session_held": snap.session_held,
        "held_by_requests": snap.held_by_requests,
        "free_rows": snap.free_rows,
        "requests": tuple(
            (r.rid, r.state, r.adapter, r.session_id, r.row, _arr(r.indices), r.kv_len, r.cache_len, r.output_len)
            for r in snap.requests
        ),
        "staged": snap.staged,
        "prefix_nodes": tuple((n.id, n.namespace, n.parent, _arr(n.indices), n.lock_ref) for n in snap.prefix_nodes),
        "sessions": tuple(
            (s.session_id, s.row, _arr(s.indices), s.kv_len, s.is_active, s.active_rid, s.adapter)
            for s in snap.sessions
        ),
        "slot_to_uid": snap.lora.slot_to_uid,
        "uid_to_slot": snap.lora.uid_to_slot,
        "pinned": snap.lora.pinned,
        "loads": snap.lora.loads,
        "registered": snap.lora.registered,
        "marks": snap.drainer.marks,
        "idle": snap.idle,
    }


# -- the isolated oracle -------------------------------------------------------------------
_GREEDY: dict[tuple[Any, ...], list[int]] = {}


def isolated(engine: Any, tokens: Sequence[int], adapter: Any, source: str | None, n: int) -> list[int]:
    """Greedy continuation via ``reference_forward`` with ``adapter``'s (a `LoraAdapter`) merged weights.

    Memoised per (network seed, dtype, adapter source, tokens): a longer run extends a shorter one.
    """
    cfg = engine.cfg
    key = (cfg.network, cfg.seed, cfg.dtype, source, tuple(tokens))
    out = _GREEDY.setdefault(key, [])
    if len(out) < n:
        net = engine.network
        lora = None if adapter is None else list(adapter.weights)
        scaling = 1.0 if adapter is None else adapter.scaling
        seq = [*tokens, *out]
        while len(out) < n:
            t = int(net.reference_forward(seq, lora=lora, scaling=scaling)[-1].argmax())
            out.append(t)
            seq.append(t)
    return out[:n]
