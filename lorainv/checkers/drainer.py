"""Drainer marks and reservations (L10, L11).

L10: only running adapters drain, each for a starving adapter (something of it waits and it
neither runs nor loads); at most one drain per starving adapter; a mark clears once its
adapter has no running requests. L11: a reserved adapter starves, and the active adapters
(running or loading) plus the reserved ones never exceed ``max_loras_per_batch``.
"""

from __future__ import annotations

from collections import Counter

from lorainv.checkers.base import register, shown
from lorainv.errors import Violation
from lorainv.snapshot import Snapshot


@register("drainer")
class DrainerChecker:
    def check(self, snap: Snapshot) -> list[Violation]:
        out: list[Violation] = []
        d = snap.drainer
        marks = dict(d.marks)
        if (marks or d.reserved) and not d.enabled:
            out.append(Violation("drainer", "L10", "drain marks while the drainer is off", shown(marks)))
        running: set[str | None] = set()
        waiting: set[str | None] = set()
        for r in snap.live():
            (waiting if r.state == "waiting" else running).add(r.adapter)
        loading = {ld.uid for ld in snap.lora.loads}
        starving = waiting - running - loading
        for adapter, for_adapter in marks.items():
            if adapter not in running:
                out.append(
                    Violation(
                        "drainer",
                        "L10",
                        f"adapter {adapter!r} still drains for {for_adapter!r} with no running requests",
                        (adapter,),
                    )
                )
            elif for_adapter not in starving:
                why = f"{adapter!r} drains for {for_adapter!r}, which does not starve"
                out.append(Violation("drainer", "L10", why, (adapter,)))
        dup = [s for s, c in Counter(marks.values()).items() if c > 1] if len(marks) > 1 else []
        if dup:
            out.append(Violation("drainer", "L10", "several adapters drain for one starving adapter", shown(dup)))
        for a in d.reserved:
            if a not in starving:
                out.append(Violation("drainer", "L11", f"a slot stays reserved for {a!r}, which does not starve", (a,)))
        need = running | loading | set(d.reserved)
        if len(need) > snap.max_loras_per_batch:
            out.append(
                Violation(
                    "drainer",
                    "L11",
                    f"{len(need)} adapters active or reserved > {snap.max_loras_per_batch} slots",
                    shown(sorted(need, key=repr)),
                )
            )
        return out
