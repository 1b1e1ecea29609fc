"""Injected time. The runtime never reads wall time directly; it asks a `Clock`."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since an arbitrary origin; never decreases."""
        ...


class SimClock:
    """Deterministic clock advanced only by ``advance`` (the ``AdvanceClock`` op)."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)

    def now(self) -> float:
        return self._now

    def advance(self, dt: float) -> float:
        if not dt >= 0:
            raise ValueError(f"clock can only move forward, got dt={dt!r}")
        self._now += float(dt)
        return self._now


class MonotonicClock:
    """Real serving clock: ``time.monotonic`` relative to construction."""

    def __init__(self) -> None:
        self._t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self._t0

    def advance(self, dt: float) -> float:
        raise TypeError("MonotonicClock cannot be advanced; use SimClock for simulated time")
