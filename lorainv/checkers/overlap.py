"""Overlap loads (L8): loads in flight are mapped; completed loads are reaped even when no
request of the adapter is ever scheduled; ready ⇔ mapped ∧ not in flight."""

from __future__ import annotations

from lorainv.checkers.base import register
from lorainv.errors import Violation
from lorainv.snapshot import Snapshot


@register("overlap")
class OverlapChecker:
    def check(self, snap: Snapshot) -> list[Violation]:
        lo = snap.lora
        out: list[Violation] = []
        u2s = dict(lo.uid_to_slot)
        tracked = {ld.uid for ld in lo.loads}
        for ld in lo.loads:
            if u2s.get(ld.uid) != ld.slot:
                out.append(
                    Violation("overlap", "L8", f"load of {ld.uid!r} into slot {ld.slot} is not mapped there", (ld.uid,))
                )
            if ld.done:
                out.append(
                    Violation(
                        "overlap",
                        "L8",
                        f"load of {ld.uid!r} into slot {ld.slot} completed but was never reaped",
                        (ld.uid, ld.slot),
                    )
                )
        for uid in u2s:
            if (uid in lo.ready) != (uid not in tracked):
                state = "ready while in flight" if uid in lo.ready else "mapped, not in flight, yet not ready"
                out.append(Violation("overlap", "L8", f"adapter {uid!r} is {state}", (uid,)))
        stray = lo.ready - set(u2s)
        if stray:
            out.append(Violation("overlap", "L8", "adapters ready but not mapped", tuple(sorted(stray, key=repr))))
        return out
