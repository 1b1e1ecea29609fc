"""``req_to_token`` rows: K5 — each row has exactly one owner, and rows point at the
request's own token indices."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from lorainv.checkers.base import register, shown
from lorainv.errors import Violation
from lorainv.snapshot import Snapshot


@register("req_to_token")
class ReqToTokenChecker:
    def check(self, snap: Snapshot) -> list[Violation]:
        out: list[Violation] = []
        owners: Counter[int] = Counter()
        for r in snap.live():
            if r.row is not None:
                owners[r.row] += 1
        for s in snap.sessions:
            if s.row is not None and not s.is_active:
                owners[s.row] += 1
        owners.update(snap.free_rows)
        twice = sorted(r for r, c in owners.items() if c > 1)
        if twice:
            labels: dict[int, list[str]] = {}
            for r in snap.live():
                if r.row is not None:
                    labels.setdefault(r.row, []).append(f"request {r.rid}")
            for s in snap.sessions:
                if s.row is not None and not s.is_active:
                    labels.setdefault(s.row, []).append(f"session {s.session_id}")
            for row in snap.free_rows:
                labels.setdefault(row, []).append("free")
            who = "; ".join(f"row {r}: {', '.join(labels[r])}" for r in twice[:4])
            out.append(Violation("req_to_token", "K5", f"rows with two owners ({who})", shown(twice)))
        lost = sorted(set(range(snap.rows_total)) - set(owners))
        if lost:
            out.append(Violation("req_to_token", "K5", "leaked req_to_token rows: owned by nobody", shown(lost)))
        for s in snap.sessions:
            if s.is_active and s.row is not None:
                borrowers = [r.rid for r in snap.live() if r.session_id == s.session_id and r.row == s.row]
                if len(borrowers) > 1:
                    out.append(
                        Violation("req_to_token", "K5", f"session {s.session_id} row lent twice", tuple(borrowers))
                    )
        for r in snap.live():
            if r.row is not None and not _same(r.row_entries, r.indices):
                diff: Sequence[int] | np.ndarray = (
                    np.flatnonzero(r.row_entries != r.indices) if len(r.row_entries) == len(r.indices) else []
                )
                out.append(
                    Violation(
                        "req_to_token",
                        "K5",
                        f"row {r.row} of request {r.rid} does not point at the request's token indices",
                        shown(diff),
                    )
                )
        if snap.idle:
            session_rows = sum(1 for s in snap.sessions if s.row is not None)
            if len(snap.free_rows) + session_rows != snap.rows_total:
                out.append(
                    Violation(
                        "req_to_token",
                        "K2",
                        f"idle: free_rows {len(snap.free_rows)} + session_rows {session_rows} != {snap.rows_total}",
                    )
                )
        return out


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """``np.array_equal``, by raw bytes when both are int64 of one shape (equal ints, equal bytes)."""
    if a.dtype == b.dtype == np.int64 and a.shape == b.shape:
        return a.tobytes() == b.tobytes()
    return bool(np.array_equal(a, b))
