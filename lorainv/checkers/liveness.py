"""Liveness: live requests must be able to finish.

Two checks:

* `no_progress` (pool ``liveness``, invariant ``no_progress``), a state predicate run by
  ``Engine.check()`` and by the strict hook (level 1 after every step, level 2 after every op).
  A device with a ``latency_steps`` bound promises that a side-stream copy lands within that
  many steps. A tracked adapter load whose copies are still pending past that bound will never
  land, so the engine can never run the requests waiting on it; and while a load is in flight
  the engine ends no request to make room, so when nothing runs every waiting request is stuck.
  A pending load still within its bound is progress, and so is every load on a device with no
  bound (device ``sim``: its driver, the fuzzer or a trace, lands copies when it chooses).
* `drain_to_idle`: with no new ops and every transfer completed, steps must finish everything
  within a bound (the teardown check of fixtures and tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorainv.errors import InvariantViolation, Violation


@dataclass(frozen=True)
class PendingLoad:
    """A tracked (not yet reaped) adapter load."""

    adapter: str | None
    slot: int
    started_step: int  # the engine step it was issued in
    landed: bool  # every copy of it is done or failed (it waits only to be reaped)


@dataclass(frozen=True)
class ProgressView:
    """The facts `no_progress` reads, taken by ``Engine.progress_view()`` (a pure read)."""

    step: int  # engine steps so far
    latency_steps: int | None  # the device's landing bound; None: no bound is promised
    live: tuple[tuple[str, str, str | None], ...]  # (rid, state, adapter) of every live request
    loads: tuple[PendingLoad, ...]


def overdue_loads(view: ProgressView) -> list[PendingLoad]:
    """Loads whose copies are still pending more than ``latency_steps`` steps after issue."""
    bound = view.latency_steps
    if bound is None:
        return []
    return [ld for ld in view.loads if not ld.landed and view.step - ld.started_step > bound]


def no_progress(view: ProgressView) -> list[Violation]:
    """A ``liveness/no_progress`` violation naming the waiting requests that can never run."""
    if not view.live:
        return []
    overdue = overdue_loads(view)
    if not overdue:
        return []
    blocked = {ld.adapter for ld in overdue}
    running = [rid for rid, state, _ in view.live if state != "waiting"]
    stuck = [rid for rid, state, a in view.live if state == "waiting" and (a in blocked or not running)]
    if not stuck:
        return []
    loads = ", ".join(
        f"{ld.adapter!r} into slot {ld.slot} (issued at step {ld.started_step}, now {view.step})" for ld in overdue
    )
    why = f"adapter load(s) {loads} never landed although the device lands copies within {view.latency_steps} step(s)"
    if not running:
        why += "; nothing runs, and no request is ended to make room while a load is in flight"
    msg = f"{len(stuck)} waiting request(s) can never run: {why}"
    return [Violation("liveness", "no_progress", msg, tuple(stuck))]


def drain_to_idle(engine: Any, max_steps: int, *, raise_on_stall: bool = False) -> list[Violation]:
    """Complete all transfers and step until idle; a `liveness` violation past ``max_steps``.

    The stall a leaked slot or a stuck drain mark causes shows up here.
    """
    from lorainv.ops import CompleteTransfers, Step

    for _ in range(max_steps):
        if engine.is_idle():
            return []
        engine.apply(CompleteTransfers(None))
        engine.apply(Step())
    if engine.is_idle():
        return []
    live = [r.rid for r in engine.requests.values() if r.state.live]
    v = Violation(
        "requests", "liveness", f"not idle after {max_steps} steps: {len(live)} live request(s) stalled", tuple(live)
    )
    if raise_on_stall:
        raise InvariantViolation([v])
    return [v]
