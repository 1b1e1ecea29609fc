"""Immutable, tensor-free views of every pool, produced by ``Engine.snapshot()``.

Checkers read these and nothing else. Token-index sets are numpy arrays (never tensors),
so a snapshot costs O(pool size) in vectorised copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, TypeVar

import numpy as np

_T = TypeVar("_T")


def build(cls: type[_T], **fields: Any) -> _T:
    """``cls(**fields)`` for a frozen snapshot dataclass, without its per-field
    ``object.__setattr__`` calls (the snapshotter builds thousands per second). The result is
    the same value: every field must be given (no defaults are filled in), and these classes
    have no ``__post_init__``."""
    names = cls.__dataclass_fields__.keys()  # type: ignore[attr-defined]
    if fields.keys() != names:
        raise TypeError(f"{cls.__name__}: fields missing {sorted(names - fields.keys())} or unknown")
    obj = object.__new__(cls)
    obj.__dict__.update(fields)
    return obj


@dataclass(frozen=True)
class ReqSnap:
    rid: str
    state: str
    adapter: str | None
    session_id: str | None
    row: int | None
    indices: np.ndarray  # allocated token indices in row order
    kv_len: int
    cache_len: int  # protected prefix (owned by the prefix cache)
    session_alloc: int  # leading indices lent by an active session slot
    own_row: bool
    output_len: int
    max_new_tokens: int
    fill_len: int
    row_entries: np.ndarray  # req_to_token[row, :alloc_len] as stored
    cache_node: int | None  # id of the locked prefix-cache node, if any
    fill: tuple[int, ...] = ()  # the tokens the request asked the KV for (history + prompt + outputs)


@dataclass(frozen=True)
class PrefixNodeSnap:
    id: int
    namespace: str | None
    parent: int | None
    indices: np.ndarray
    lock_ref: int
    key: tuple[int, ...] = ()  # the token ids on the node's edge (one per index)


@dataclass(frozen=True)
class SessionSnap:
    session_id: str
    row: int | None
    indices: np.ndarray
    kv_len: int
    is_active: bool
    active_rid: str | None
    adapter: str | None


@dataclass(frozen=True)
class LoadSnap:
    uid: str | None
    slot: int
    done: bool  # event.query()
    failed: bool


@dataclass(frozen=True)
class SlotContentSnap:
    """A readable slot (resident, load reaped) on one TP rank: digests of what it holds and of
    what its adapter's registered tensors say it must hold (see `lorainv.checkers.slot_oracle`)."""

    tp_rank: int
    slot: int
    uid: str | None
    held: tuple[tuple[str, str], ...]  # (region, digest) read from the slot
    want: tuple[tuple[str, str], ...]  # (region, digest) computed from the registered tensors


@dataclass(frozen=True)
class LoraSnap:
    num_slots: int
    slot_to_uid: tuple[Any, ...]  # EMPTY is rendered as the string "<EMPTY>"
    uid_to_slot: tuple[tuple[Any, int], ...]
    pinned: frozenset[str]
    loads: tuple[LoadSnap, ...]  # tracked (not yet reaped) loads
    ready: frozenset[Any]  # uids the runtime would let a batch use now
    ranks: tuple[int, ...]
    registered: tuple[tuple[str, int], ...]  # host registry: name -> rank
    last_batch: tuple[Any, ...]  # adapters of the last forward batch
    last_batch_slots: tuple[int, ...]  # slot each of them read
    evictions: tuple[tuple[Any, int, frozenset[Any]], ...]  # (victim, slot, protected set) in the last step
    contents: tuple[SlotContentSnap, ...] = ()  # every readable slot of every TP rank (L6)

    @property
    def hygiene(self) -> tuple[tuple[Any, str], ...]:
        """(uid, problem) per readable slot whose contents differ from its registered
        weights (L6); derived from `contents`, kept for readers of the earlier field."""
        out = []
        for c in self.contents:
            want = dict(c.want)
            bad = [r for r, d in c.held if want.get(r) != d]
            if bad:
                out.append((c.uid, f"slot {c.slot}: {', '.join(bad)} differ"))
        return tuple(out)


@dataclass(frozen=True)
class DrainSnap:
    enabled: bool
    marks: tuple[tuple[Any, Any], ...]  # (draining adapter, starving adapter)
    reserved: tuple[Any, ...] = ()  # starving adapters a drain freed a slot for


@dataclass(frozen=True)
class PinnedEntrySnap:
    key: str
    adapter: str
    nbytes: int  # bytes of the pinned slice
    current: bool  # its source is one of the registered adapter's tensors (not a stale copy)


@dataclass(frozen=True)
class PinnedSnap:
    """The pinned host cache (shared by every TP rank of the engine)."""

    entries: tuple[PinnedEntrySnap, ...] = ()
    bytes: int = 0  # the cache's own byte count
    need: tuple[tuple[str, int], ...] = ()  # registered adapter -> host bytes of its tensors
    tp_size: int = 1  # ranks that may each pin a slice of every tensor


EMPTY_NAME = "<EMPTY>"


@dataclass(frozen=True)
class Snapshot:
    step: int
    now: float
    total_tokens: int
    page_size: int
    free_indices: np.ndarray
    available: int  # allocator.available_size()
    evictable: int  # prefix cache's own counters
    protected: int
    session_held: int  # SessionManager.session_held_tokens()
    held_by_requests: int
    rows_total: int
    free_rows: tuple[int, ...]
    requests: tuple[ReqSnap, ...]
    staged: str | None  # rid of the chunked request staged for the next round
    prefix_nodes: tuple[PrefixNodeSnap, ...]
    sessions: tuple[SessionSnap, ...]
    lora: LoraSnap
    drainer: DrainSnap
    max_loras_per_batch: int
    idle: bool
    finished: tuple[str, ...] = field(default=())  # rids that reached a final state (ever)
    pinned: PinnedSnap = field(default_factory=PinnedSnap)

    @cached_property
    def _live(self) -> tuple[ReqSnap, ...]:
        return tuple(r for r in self.requests if r.state in ("waiting", "prefilling", "decoding"))

    def live(self) -> tuple[ReqSnap, ...]:
        """The requests in a live state (computed once per snapshot)."""
        return self._live
