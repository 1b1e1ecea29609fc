"""Drainer marks (L10): only running adapters drain; at most one per starving adapter;
a mark clears once its adapter has no running requests."""

from __future__ import annotations

from collections import Counter

from lorainv.checkers.base import register, shown
from lorainv.errors import Violation
from lorainv.snapshot import Snapshot


@register("drainer")
class DrainerChecker:
    def check(self, snap: Snapshot) -> list[Violation]:
        out: list[Violation] = []
        marks = dict(snap.drainer.marks)
        if marks and not snap.drainer.enabled:
            out.append(Violation("drainer", "L10", "drain marks while the drainer is off", shown(marks)))
        running = {r.adapter for r in snap.live() if r.state in ("prefilling", "decoding")}
        for adapter, starving in marks.items():
            if adapter not in running:
                out.append(
                    Violation(
                        "drainer",
                        "L10",
                        f"adapter {adapter!r} still drains for {starving!r} with no running requests",
                        (adapter,),
                    )
                )
        dup = [s for s, c in Counter(marks.values()).items() if c > 1]
        if dup:
            out.append(Violation("drainer", "L10", "several adapters drain for one starving adapter", shown(dup)))
        return out
