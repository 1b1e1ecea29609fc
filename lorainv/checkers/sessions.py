"""Session slots: an active slot is lent to exactly one live turn that holds the slot's
KV as its own leading tokens; an inactive slot holds whole pages it alone owns."""

from __future__ import annotations

import numpy as np

from lorainv.checkers.base import register
from lorainv.errors import Violation
from lorainv.snapshot import Snapshot


@register("sessions")
class SessionChecker:
    def check(self, snap: Snapshot) -> list[Violation]:
        out: list[Violation] = []
        live = {r.rid: r for r in snap.live()}
        for s in snap.sessions:
            alloc = len(s.indices)
            if alloc % snap.page_size or s.kv_len > alloc:
                out.append(
                    Violation("sessions", "S1", f"session {s.session_id}: kv_len {s.kv_len} / {alloc} allocated")
                )
            if (s.row is None) != (alloc == 0):
                out.append(Violation("sessions", "S1", f"session {s.session_id}: row {s.row} with {alloc} tokens"))
            if not s.is_active:
                if s.active_rid is not None:
                    out.append(Violation("sessions", "S2", f"inactive session {s.session_id} names a borrower"))
                continue
            r = live.get(s.active_rid or "")
            if r is None or r.session_id != s.session_id:
                out.append(
                    Violation(
                        "sessions",
                        "S2",
                        f"session {s.session_id} is lent to {s.active_rid}, which is not a live turn of it",
                        (s.active_rid,),
                    )
                )
                continue
            if r.state == "waiting":
                out.append(Violation("sessions", "S2", f"session {s.session_id} lent to waiting {r.rid}", (r.rid,)))
            elif not np.array_equal(r.indices[:alloc], s.indices) or r.session_alloc != alloc:
                out.append(
                    Violation("sessions", "S2", f"turn {r.rid} does not hold session {s.session_id}'s KV", (r.rid,))
                )
        for r in live.values():
            if r.session_alloc and not any(s.is_active and s.active_rid == r.rid for s in snap.sessions):
                out.append(Violation("sessions", "S2", f"{r.rid} holds session KV without an active lend", (r.rid,)))
        return out
