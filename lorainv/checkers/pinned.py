"""Pinned host cache: it holds slices of registered adapters only, and no more than they need.

* PN1: every entry belongs to a registered adapter and was made from that adapter's current
  tensors (an unregistered or re-registered adapter leaves nothing behind).
* PN2: the cache's byte count is the sum of its entries.
* PN3: per adapter, the entries' bytes are at most ``tp_size`` times the adapter's host bytes
  (each rank pins at most one whole copy of each tensor).

Assumes a target with a host-side pinned cache; a target without one reports an empty
`PinnedSnap`, which is always clean.
"""

from __future__ import annotations

from collections import Counter

from lorainv.checkers.base import register, shown
from lorainv.errors import Violation
from lorainv.snapshot import PinnedSnap, Snapshot


@register("pinned")
class PinnedChecker:
    """Remembers its last input and verdict: the snapshotter hands out the very same entry and
    need tuples while the cache and the registry are unchanged, and the verdict is a function
    of those values alone, so an identical input gets the remembered verdict."""

    def __init__(self) -> None:
        self._last: tuple[object, object, int, int, list[Violation]] | None = None

    def check(self, snap: Snapshot) -> list[Violation]:
        pc = snap.pinned
        last = self._last
        if last is not None and last[0] is pc.entries and last[1] is pc.need and last[2:4] == (pc.bytes, pc.tp_size):
            return list(last[4])
        out = _verdict(pc)
        self._last = (pc.entries, pc.need, pc.bytes, pc.tp_size, list(out))
        return out


def _verdict(pc: PinnedSnap) -> list[Violation]:
    out: list[Violation] = []
    need = dict(pc.need)
    orphans = [e.key for e in pc.entries if e.adapter not in need]
    if orphans:
        names = sorted({e.adapter for e in pc.entries if e.adapter not in need})
        out.append(
            Violation(
                "pinned",
                "PN1",
                f"{len(orphans)} pinned slice(s) of unregistered adapter(s) {names[:8]}",
                shown(orphans),
            )
        )
    stale = [e.key for e in pc.entries if e.adapter in need and not e.current]
    if stale:
        out.append(
            Violation(
                "pinned",
                "PN1",
                f"{len(stale)} pinned slice(s) made from tensors no longer registered",
                shown(stale),
            )
        )
    total = sum(e.nbytes for e in pc.entries)
    if total != pc.bytes:
        out.append(Violation("pinned", "PN2", f"cache reports {pc.bytes} bytes but its entries hold {total}"))
    held: Counter[str] = Counter()
    for e in pc.entries:
        held[e.adapter] += e.nbytes
    for name in sorted(held):
        if name not in need:
            continue
        if held[name] > pc.tp_size * need[name]:
            out.append(
                Violation(
                    "pinned",
                    "PN3",
                    f"{name!r} pins {held[name]} bytes > tp_size {pc.tp_size} x its {need[name]} host bytes",
                    (name,),
                )
            )
    return out
