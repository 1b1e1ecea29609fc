"""Asynchronous adapter loads on a side stream, overlapped with the forward.

A load is *tracked* from `start_load` until it is *reaped*: its event has completed, the
current stream has waited on it, and a ``LoadCompleted`` (or, if a copy failed,
``LoadFailed`` with the slot unmapped) was emitted.

Invariants (L8):

* tracked uids ⊆ mapped uids (``pool.uid_to_slot``);
* every completed load is reaped at the next `reap` / `reap_completed` / `start_load`,
  whether or not any request of that adapter is ever scheduled (the engine reaps once per op,
  so no completed load outlives the op that completed it);
* ``LOADED`` ⇔ mapped ∧ not tracked: "loaded" is derived from the pool mapping, never from
  the event dict alone.

Mutating calls: `reap`, `reap_completed`, `start_load`. Pure reads (a
snapshot may call them): `status`, `is_ready`, `in_flight`, `tracked`, `started_steps`. Events of loads reaped
by `reap_completed` or `start_load` are queued and returned by the next `reap`, so none is
lost: call `reap` once per engine op.

Faults: ``stale_overlap_event`` (a completed entry is reaped only by ``reap_completed(only=...)``,
which the scheduler calls for an adapter whose request it has just scheduled; readiness is
read from the event dict), ``use_before_transfer`` (`is_ready` as soon as mapped).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, NamedTuple

from lorainv.config import RuntimeConfig
from lorainv.errors import PoolError
from lorainv.events import Event, LoadCompleted, LoadFailed
from lorainv.impl import faults
from lorainv.impl.adapters import LoraAdapter
from lorainv.impl.lora_pool import LoraPool, Uid


class LoadStatus(enum.Enum):
    NOT_LOADED = "not_loaded"
    LOADING = "loading"
    LOADED = "loaded"


class TrackedLoad(NamedTuple):
    """A load not yet reaped, for snapshots: its event's ``done`` / ``failed`` as of now."""

    uid: Uid
    slot: int
    done: bool
    failed: bool


@dataclass
class _Entry:
    slot: int
    event: Any
    started: int  # the engine step during which the load was issued


class OverlapLoader:
    """Starts loads on its own stream and reaps them; see the module docstring for the rules."""

    def __init__(
        self, pool: LoraPool, device: Any, cfg: RuntimeConfig, step_counter: Callable[[], int] | None = None
    ) -> None:
        """``step_counter``: the engine's step count, read when a load starts (for `started_steps`)."""
        self.pool = pool
        self._step_counter = step_counter if step_counter is not None else (lambda: 0)
        self.device = device
        self.cfg = cfg
        self.stream = device.new_stream("lora_load")
        self._pending: dict[Uid, _Entry] = {}
        self._outbox: list[Event] = []
        self._stale = faults.on(cfg, "stale_overlap_event")

    def reap(self) -> list[Event]:
        """Reap every completed load; return all events produced since the last call (mutates)."""
        self._reap_done()
        out, self._outbox = self._outbox, []
        return out

    def reap_completed(self, only: Collection[Uid] | None = None) -> None:
        """Reap every completed load now, or only the loads of ``only``; their events wait in
        the queue for the next `reap` (mutates)."""
        self._reap_done(only)

    def status(self, uid: Uid) -> LoadStatus:
        """LOADING while tracked; else LOADED iff ``uid`` is mapped in the pool (pure: no reaping)."""
        entry = self._pending.get(uid)
        if entry is not None:
            if self._stale:  # the historic bug: the event dict is the source of truth
                return LoadStatus.LOADED if entry.event.query() else LoadStatus.LOADING
            return LoadStatus.LOADING
        return LoadStatus.LOADED if uid in self.pool.uid_to_slot else LoadStatus.NOT_LOADED

    def is_ready(self, uid: Uid) -> bool:
        """May a batch read ``uid``'s slot now? (status LOADED: mapped, copied and waited on; pure)."""
        if faults.on(self.cfg, "use_before_transfer"):
            return uid in self.pool.uid_to_slot
        return self.status(uid) is LoadStatus.LOADED

    def in_flight(self) -> set[Uid]:
        """Uids with a tracked load: these slots are busy and not evictable (pure: no reaping)."""
        return set(self._pending)

    def tracked(self) -> tuple[TrackedLoad, ...]:
        """Pure view of the tracked loads in start order (no reaping)."""
        return tuple(
            TrackedLoad(uid, e.slot, bool(e.event.query()), bool(e.event.failed)) for uid, e in self._pending.items()
        )

    def started_steps(self) -> dict[Uid, int]:
        """Tracked uid -> the engine step its load was issued in (pure: no reaping)."""
        return {uid: e.started for uid, e in self._pending.items()}

    def start_load(self, uid: Uid, adapter: LoraAdapter | None, protected: Any) -> list[Event] | None:
        """Reaps, then loads ``uid`` into a free slot or a victim outside ``protected`` and the
        loads in flight, on the side stream. None when there is no room (nothing changed)."""
        self._reap_done()
        if uid in self._pending or uid in self.pool.uid_to_slot:
            raise PoolError(f"adapter {uid!r} is already resident or loading")
        choice = self.pool.choose_slot(uid, set(protected) | set(self._pending))
        if choice is None:
            return None
        events = self.pool.load(uid, adapter, choice[0], self.stream)
        self._pending[uid] = _Entry(choice[0], self.device.record_event(self.stream), self._step_counter())
        return events

    def _reap_done(self, only: Collection[Uid] | None = None) -> None:
        if self._stale and only is None:
            return  # the historic bug: an entry left only when a request of its adapter was scheduled
        for uid in [u for u, e in self._pending.items() if e.event.query() and (only is None or u in only)]:
            self._finish(uid)

    def _finish(self, uid: Uid) -> None:
        entry = self._pending.pop(uid)
        self.device.wait_event(self.device.current_stream(), entry.event)
        if entry.event.failed:
            self.pool.unmap_failed(uid)
            self._outbox.append(LoadFailed(adapter=uid, slot=entry.slot, detail="host-to-device copy failed"))
        else:
            self._outbox.append(LoadCompleted(adapter=uid, slot=entry.slot))
