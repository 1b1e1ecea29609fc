"""The fairness drainer: when every LoRA slot is taken and an adapter starves in the queue,
a running adapter is marked *draining* so that it stops admitting long requests, finishes,
and frees its slot.

Invariants (L10): only running adapters are marked; at most one adapter drains for a given
starving adapter (and one mark per draining adapter); a mark clears at the first `update`
where its adapter has no running requests. Time comes from the injected clock only.

Fault ``drainer_never_clears``: marks are never cleared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lorainv.config import RuntimeConfig
from lorainv.events import DrainCleared, DrainMarked, Event
from lorainv.impl import faults
from lorainv.impl.clock import Clock

Uid = str | None


def _key(u: Uid) -> tuple[bool, str]:
    return (u is not None, u or "")


@dataclass(frozen=True)
class ReqInfo:
    """What the drainer needs of a request; ``remaining = max_new_tokens - produced``."""

    rid: str
    adapter: Uid
    arrival: float
    remaining: int


class Drainer:
    """``update`` once per scheduling round, then ``admits`` for each waiting request."""

    def __init__(self, cfg: RuntimeConfig, clock: Clock) -> None:
        self.cfg = cfg
        self.clock = clock
        self.threshold = float(cfg.lora_drain_wait_threshold)
        self.tolerance = float(cfg.lora_drain_tolerance)
        self.enabled = self.threshold > 0
        self.marks: dict[Uid, Uid] = {}  # draining adapter -> starving adapter it drains for
        self._max_remaining: dict[Uid, int] = {}  # per running adapter, at the last update
        self._waiting: dict[Uid, tuple[int, float]] = {}  # per waiting adapter: (count, max wait)

    def update(self, waiting: Sequence[ReqInfo], running: Sequence[ReqInfo], slots_full: bool) -> list[Event]:
        """Clear marks of adapters with no running request, then mark drainers for starving ones."""
        now = self.clock.now()
        self._max_remaining = {}
        for r in running:
            self._max_remaining[r.adapter] = max(self._max_remaining.get(r.adapter, 0), r.remaining)
        self._waiting = {}
        for w in waiting:
            n, wait = self._waiting.get(w.adapter, (0, 0.0))
            self._waiting[w.adapter] = (n + 1, max(wait, now - w.arrival))
        events: list[Event] = []
        if not faults.on(self.cfg, "drainer_never_clears"):
            for a in sorted(self.marks, key=_key):
                if a not in self._max_remaining:
                    del self.marks[a]
                    events.append(DrainCleared(adapter=a))
        if not (self.enabled and slots_full):
            return events
        starving = [
            a for a, (_, wait) in self._waiting.items() if a not in self._max_remaining and wait > self.threshold
        ]
        starving.sort(key=lambda a: (-self._waiting[a][1], _key(a)))  # longest wait first
        for s in starving:
            if s in self.marks.values():
                continue
            free = [a for a in self._max_remaining if a not in self.marks]
            if not free:
                break
            d = min(free, key=lambda a: (self._max_remaining[a], _key(a)))
            self.marks[d] = s
            events.append(DrainMarked(adapter=d, for_adapter=s))
        return events

    def admits(self, adapter: Uid, max_new_tokens: int, *, resuming_chunk: bool = False) -> bool:
        """May a new request of ``adapter`` start? A draining adapter only takes requests no
        longer than ``tolerance`` x its longest remaining running request; a resuming chunk always."""
        if adapter not in self.marks or resuming_chunk:
            return True
        return max_new_tokens <= self.tolerance * self._max_remaining.get(adapter, 0)

    def stats(self) -> dict[Any, dict[str, float]]:
        """Per adapter seen at the last update: waiting count, max wait, max remaining tokens."""
        out: dict[Any, dict[str, float]] = {}
        for a in sorted(set(self._waiting) | set(self._max_remaining), key=_key):
            n, wait = self._waiting.get(a, (0, 0.0))
            out[a] = {"waiting": n, "max_wait": wait, "max_remaining": self._max_remaining.get(a, 0)}
        return out
