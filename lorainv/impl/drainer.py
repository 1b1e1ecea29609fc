"""The fairness drainer: when every LoRA slot is taken and an adapter starves in the queue,
a running adapter is marked *draining* so that its slot goes to the starving adapter.

Two policies (``RuntimeConfig.lora_drain_policy``):

* ``"preempt"`` (default): one drain at a time. The victim is the running adapter with the
  least demand (running + waiting requests), so popular adapters stay resident and the
  rare ones rotate through the remaining slots. A draining adapter admits nothing new;
  once its oldest running request was admitted a quantum ago (``lora_drain_quantum``,
  default the wait threshold) the scheduler retracts its running requests that produced a token since their
  last admission, each at most ``lora_drain_max_preemptions`` times; the slot frees at once.
* ``"admission"``: every starving adapter gets a drainer, the one with the least remaining
  work; it only admits requests no longer than ``lora_drain_tolerance`` x its longest
  remaining one and frees its slot when what runs has finished.

When a draining adapter stops running its mark clears and the freed slot is *reserved* for
the starving adapter: no other adapter may take a new slot while it waits (otherwise the
queue's FCFS order hands the slot to whichever adapter queued first, and the drain was for
nothing). A reservation ends when the adapter runs, loads, or has nothing left waiting.

Invariants (L10/L11): only running adapters are marked, each for a starving adapter (one with
waiting requests that neither runs nor loads); at most one mark per starving adapter; a mark
clears at the first `update` where its adapter has no running requests or its starving
adapter no longer starves; active adapters plus pending reservations never exceed the slots.
A drain retracts a request only while its adapter is marked and only after the request
produced a token since its last admission, so every preemption is progress (no livelock).
Time comes from the injected clock only.

Fault ``drainer_never_clears``: marks are never cleared.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from lorainv.config import RuntimeConfig
from lorainv.events import DrainCleared, DrainMarked, Event, ReservationEnded, SlotReserved
from lorainv.impl import faults
from lorainv.impl.clock import Clock

Uid = str | None


def _key(u: Uid) -> tuple[bool, str]:
    return (u is not None, u or "")


@dataclass(frozen=True)
class ReqInfo:
    """What the drainer needs of a request.

    ``since``: when it entered its current state: for a waiting request its arrival or last
    retraction, for a running one its last admission. ``remaining = max_new_tokens - produced``;
    ``preemptible``: a drain may retract it now.
    """

    rid: str
    adapter: Uid
    since: float
    remaining: int
    preemptible: bool = False


class Drainer:
    """``update`` once per scheduling round, then ``admits`` for each waiting request and
    ``preempt_due`` for the adapters whose requests the scheduler should retract now."""

    def __init__(self, cfg: RuntimeConfig, clock: Clock) -> None:
        self.cfg = cfg
        self.clock = clock
        self.threshold = float(cfg.lora_drain_wait_threshold)
        self.tolerance = float(cfg.lora_drain_tolerance)
        self.preempt = cfg.lora_drain_policy == "preempt"
        self.quantum = float(cfg.lora_drain_quantum) if cfg.lora_drain_quantum > 0 else self.threshold
        self.enabled = self.threshold > 0
        self.marks: dict[Uid, Uid] = {}  # draining adapter -> starving adapter it drains for
        self.reserved: set[Uid] = set()  # starving adapters a drain freed a slot for
        self._running_since: dict[Uid, float] = {}  # per running adapter: its oldest admission
        self._running: dict[Uid, int] = {}  # running requests per adapter, at the last update
        self._max_remaining: dict[Uid, int] = {}
        self._preemptible: dict[Uid, int] = {}
        self._waiting: dict[Uid, tuple[int, float]] = {}  # per waiting adapter: (count, max wait)

    def update(
        self,
        waiting: Sequence[ReqInfo],
        running: Sequence[ReqInfo],
        slots_full: bool,
        loading: Collection[Uid] = (),
    ) -> list[Event]:
        """Clear marks that are done, then mark a drainer for starving adapters.

        ``running``: requests that hold KV (decoding or the staged chunk); ``loading``:
        adapters with a load in flight; ``slots_full``: no slot is free or unreserved.
        """
        now = self.clock.now()
        self._running, self._max_remaining, self._preemptible, self._running_since = {}, {}, {}, {}
        for r in running:
            a = r.adapter
            self._running[a] = self._running.get(a, 0) + 1
            self._running_since[a] = min(self._running_since.get(a, r.since), r.since)
            self._max_remaining[a] = max(self._max_remaining.get(a, 0), r.remaining)
            self._preemptible[a] = self._preemptible.get(a, 0) + int(r.preemptible)
        self._waiting = {}
        for w in waiting:
            n, wait = self._waiting.get(w.adapter, (0, 0.0))
            self._waiting[w.adapter] = (n + 1, max(wait, now - w.since))
        hungry = {a for a in self._waiting if a not in self._running and a not in loading}
        events: list[Event] = []
        for a in sorted(self.reserved, key=_key):
            if a not in hungry:
                events.extend(self.end_reservation(a, "gone" if a not in self._waiting else "admitted"))
        if not faults.on(self.cfg, "drainer_never_clears"):
            for a in sorted(self.marks, key=_key):
                s = self.marks[a]
                if a in self._running and s in hungry:
                    continue
                del self.marks[a]
                events.append(DrainCleared(adapter=a))
                if a not in self._running and s in hungry and s not in self.reserved:
                    self.reserved.add(s)
                    events.append(SlotReserved(adapter=s))
        if not (self.enabled and slots_full) or (self.preempt and (self.marks or self.reserved)):
            return events
        starving = [a for a in hungry if self._waiting[a][1] > self.threshold]
        starving.sort(key=lambda a: (-self._waiting[a][1], _key(a)))  # longest wait first
        for s in starving:
            if s in self.marks.values() or s in self.reserved:
                continue
            free = [a for a in self._running if a not in self.marks]
            if not free:
                break
            d = min(free, key=self._victim_key)
            self.marks[d] = s
            events.append(DrainMarked(adapter=d, for_adapter=s))
            if self.preempt:
                break
        return events

    def end_reservation(self, adapter: Uid, reason: str) -> list[Event]:
        """End ``adapter``'s reservation, if it has one (the scheduler calls this on admission)."""
        if adapter not in self.reserved:
            return []
        self.reserved.discard(adapter)
        return [ReservationEnded(adapter=adapter, reason=reason)]

    def _victim_key(self, a: Uid) -> tuple[Any, ...]:
        if not self.preempt:
            return (self._max_remaining[a], _key(a))
        ripe = self.clock.now() - self._running_since[a] >= self.quantum and self._preemptible[a] > 0
        demand = self._running[a] + self._waiting.get(a, (0, 0.0))[0]
        return (demand, not ripe, self._max_remaining[a], _key(a))

    def preempt_due(self) -> list[Uid]:
        """Marked adapters whose oldest running request was admitted at least a quantum ago:
        retract their preemptible requests now."""
        if not self.preempt:
            return []
        now = self.clock.now()
        return [a for a in sorted(self.marks, key=_key) if now - self._running_since.get(a, now) >= self.quantum]

    def admits(self, adapter: Uid, max_new_tokens: int) -> bool:
        """May a new request of ``adapter`` start? Not while it drains under ``preempt``;
        under ``admission`` only if no longer than ``tolerance`` x its longest remaining request."""
        if adapter not in self.marks:
            return True
        if self.preempt:
            return False
        return max_new_tokens <= self.tolerance * self._max_remaining.get(adapter, 0)
