"""Liveness: with no new ops and every transfer completed, steps must finish everything."""

from __future__ import annotations

from typing import Any

from lorainv.errors import InvariantViolation, Violation


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
