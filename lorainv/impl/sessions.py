"""Streaming sessions: a slot keeps a finished turn's KV (its row and token indices) so
the next turn of the session extends it instead of recomputing.

Lifecycle of a slot: open (holds nothing) → ``save`` after a turn finishes (holds the
turn's row and KV) → ``restore_to_req`` lends that KV to the next turn's request *without
clearing the slot* (``is_active``), so a retried chunk or an aborted/retracted turn finds
it intact → ``release`` (abort/retract: the lend ends, the KV stays) or ``save`` (the turn
finished: the slot now holds the extended KV) → ``close`` frees everything.

Invariants:
* an inactive slot owns its row and ``indices`` exclusively;
* an active slot's row and indices are counted as the borrowing request's, never also as
  session-held (``session_held_tokens`` excludes active slots — the fix for the historic
  double count; fault ``session_double_count`` re-creates the bug here);
* ``close`` frees exactly the row and indices the slot holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lorainv.errors import RequestError
from lorainv.impl import faults
from lorainv.impl.kv_pool import ReqToTokenPool, TokenAllocator

_NONE = np.zeros(0, dtype=np.int64)


@dataclass
class SessionSlot:
    """KV kept between turns: ``tokens`` are the ids whose KV sits at ``indices[:kv_len]``.

    ``indices`` has ``alloc_len`` entries (whole pages); ``kv_len <= alloc_len``.
    """

    session_id: str
    row: int | None = None
    tokens: tuple[int, ...] = ()
    indices: np.ndarray = field(default_factory=lambda: _NONE)
    kv_len: int = 0
    adapter: str | None = None
    is_active: bool = False
    active_rid: str | None = None

    @property
    def alloc_len(self) -> int:
        return len(self.indices)

    @property
    def history(self) -> tuple[int, ...]:
        """Every token of the finished turns (prompt + outputs); KV covers the first ``kv_len``."""
        return self.tokens


class SessionManager:
    """Owns the session slots; frees through the shared allocator and row pool."""

    def __init__(self, allocator: TokenAllocator, rows: ReqToTokenPool, max_sessions: int, cfg: object) -> None:
        self.allocator = allocator
        self.rows = rows
        self.max_sessions = max_sessions
        self.cfg = cfg
        self.slots: dict[str, SessionSlot] = {}

    def get(self, session_id: str) -> SessionSlot:
        slot = self.slots.get(session_id)
        if slot is None:
            raise RequestError(f"unknown session {session_id!r}; open it with open_session first")
        return slot

    def check_can_open(self, session_id: str) -> None:
        if not isinstance(session_id, str) or not session_id:
            raise RequestError(f"session_id must be a non-empty string, got {session_id!r}")
        if session_id in self.slots:
            raise RequestError(f"session {session_id!r} is already open")
        if len(self.slots) >= self.max_sessions:
            raise RequestError(f"cannot open session {session_id!r}: max_sessions={self.max_sessions} are open")

    def open(self, session_id: str) -> SessionSlot:
        self.check_can_open(session_id)
        slot = SessionSlot(session_id)
        self.slots[session_id] = slot
        return slot

    def restore_to_req(self, session_id: str, rid: str) -> SessionSlot:
        """Lend the slot's KV to request ``rid``; the slot keeps its fields (idempotent retry)."""
        slot = self.get(session_id)
        if slot.is_active and slot.active_rid != rid:
            raise RequestError(f"session {session_id!r} already has an active turn {slot.active_rid}")
        slot.is_active = True
        slot.active_rid = rid
        return slot

    def release(self, session_id: str) -> None:
        """End a lend without saving (abort or retraction): the slot's previous KV is intact."""
        slot = self.get(session_id)
        slot.is_active = False
        slot.active_rid = None

    def save(
        self, session_id: str, row: int, tokens: tuple[int, ...], indices: np.ndarray, kv_len: int, adapter: str | None
    ) -> None:
        """A turn finished: the slot takes over its row and KV (which extend the old ones)."""
        slot = self.get(session_id)
        slot.row, slot.tokens, slot.indices, slot.kv_len = row, tokens, np.asarray(indices), kv_len
        slot.adapter = adapter
        slot.is_active = False
        slot.active_rid = None

    def close(self, session_id: str) -> int:
        """Free the slot's row and tokens; returns the number of tokens freed."""
        slot = self.get(session_id)
        if slot.is_active:
            raise RequestError(f"session {session_id!r} has an active turn {slot.active_rid}; abort it first")
        freed = slot.alloc_len
        if freed:
            self.allocator.free(slot.indices)
        if slot.row is not None:
            self.rows.free(slot.row)
        del self.slots[session_id]
        return freed

    def session_held_tokens(self) -> int:
        """Tokens held by inactive slots (an active slot's KV is counted by its request)."""
        if faults.on(self.cfg, "session_double_count"):
            return sum(s.alloc_len for s in self.slots.values())
        return sum(s.alloc_len for s in self.slots.values() if not s.is_active)

    def session_rows(self) -> list[int]:
        return [s.row for s in self.slots.values() if s.row is not None and not s.is_active]
