"""Immutable, tensor-free views of every pool, produced by ``Engine.snapshot()``.

Checkers read these and nothing else. Token-index sets are numpy arrays (never tensors),
so a snapshot costs O(pool size) in vectorised copies. Taking a snapshot mutates nothing in
the engine (a pure read; ``tests/stateful/test_snapshot_purity.py``), and nothing here
mutates a snapshot once built. Every field is documented in ``docs/snapshot.md``.

A request's ``state`` (`ReqSnap.state`) is one of:

* ``"waiting"``: queued, new or retracted (a retraction sends a request back here); holds no
  row and no KV;
* ``"prefilling"``: admitted, some prefill chunks done and more to come; holds a row and KV;
* ``"decoding"``: prefill complete, one token per decode round; holds a row and KV;
* ``"finished"``: ended by reaching ``max_new_tokens``; holds nothing, never live again;
* ``"aborted"``: ended by an abort; holds nothing, never live again.

The first three are *live* (`Snapshot.live`); ended requests stay in ``requests`` until the
engine forgets them (it keeps the ``max_finished_requests`` most recent).
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
    """One request. ``state`` is one of the five values in this module's docstring.

    Token counts, with ``alloc = len(indices)``: ``cache_len <= kv_len <= alloc`` (K4); the first
    ``cache_len`` indices belong to the prefix cache, the first ``session_alloc`` are lent by a
    session slot, and the request itself accounts for ``alloc - cache_len`` (K1). A waiting or
    ended request has ``row is None`` and no indices.
    """

    rid: str
    state: str
    adapter: str | None
    session_id: str | None
    row: int | None
    indices: np.ndarray  # allocated token indices in row order
    kv_len: int  # tokens whose KV has been computed (committed)
    cache_len: int  # protected prefix (owned by the prefix cache)
    session_alloc: int  # leading indices lent by an active session slot
    own_row: bool  # the row was allocated for this request (not lent by a session)
    output_len: int  # tokens generated so far
    max_new_tokens: int
    fill_len: int  # len(fill)
    row_entries: np.ndarray  # req_to_token[row, :alloc_len] as stored
    cache_node: int | None  # id of the locked prefix-cache node, if any
    fill: tuple[int, ...] = ()  # the tokens the request asked the KV for (history + prompt + outputs)


@dataclass(frozen=True)
class PrefixNodeSnap:
    """One node of the radix prefix cache (the root is not listed). ``namespace`` is the adapter
    whose KV it holds (None: the base model); ``lock_ref > 0`` while live requests use it."""

    id: int
    namespace: str | None
    parent: int | None  # None: a child of the root
    indices: np.ndarray  # the token indices holding the edge's KV
    lock_ref: int
    key: tuple[int, ...] = ()  # the token ids on the node's edge (one per index)


@dataclass(frozen=True)
class SessionSnap:
    """One open streaming session: the KV of its finished turns (``indices``, ``kv_len`` of them
    computed) in its own row, lent to ``active_rid`` while a turn runs (``is_active``)."""

    session_id: str
    row: int | None
    indices: np.ndarray
    kv_len: int
    is_active: bool
    active_rid: str | None
    adapter: str | None  # the adapter whose KV the session holds (None: base model or none yet)


@dataclass(frozen=True)
class LoadSnap:
    """An asynchronous adapter load into ``slot`` that has not been reaped yet."""

    uid: str | None
    slot: int
    done: bool  # event.query(): the copy has landed
    failed: bool  # the copy failed (it will be reaped as LoadFailed)


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
class SegmentsSnap:
    """The LoRA segment metadata of one batch, as plain ints: segment ``s`` covers tokens
    ``seg_indptr[s] : seg_indptr[s + 1]`` and reads slot ``weight_indices[s]``."""

    seg_lens: tuple[int, ...]
    seg_indptr: tuple[int, ...]
    weight_indices: tuple[int, ...]


@dataclass(frozen=True)
class LoraSnap:
    """The LoRA slot pool (checkers L1-L8): which adapter (uid) holds which slot, pins, loads in
    flight, and what the last step's batch read and evicted."""

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
    last_batch_lens: tuple[int, ...] = ()  # new tokens of each request of the last batch
    segments: SegmentsSnap | None = None  # the segment metadata the last batch's LoRA kernels read (L9)

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
    """The fairness drainer (checkers L10-L11)."""

    enabled: bool
    marks: tuple[tuple[Any, Any], ...]  # (draining adapter, starving adapter)
    reserved: tuple[Any, ...] = ()  # starving adapters a drain freed a slot for


@dataclass(frozen=True)
class PinnedEntrySnap:
    """One slice in the pinned host cache."""

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
    """Every pool of one engine at one instant. The KV identity K1 reads
    ``available + evictable + protected + session_held + held_by_requests == total_tokens``."""

    step: int  # steps taken so far
    now: float  # the engine clock (simulated seconds)
    total_tokens: int
    page_size: int
    free_indices: np.ndarray  # token indices the allocator can hand out
    available: int  # allocator.available_size()
    evictable: int  # prefix cache's own counters
    protected: int
    session_held: int  # SessionManager.session_held_tokens()
    held_by_requests: int  # tokens live requests account for (sum of len(indices) - cache_len)
    rows_total: int  # rows of req_to_token
    free_rows: tuple[int, ...]
    requests: tuple[ReqSnap, ...]  # live and remembered ended requests
    staged: str | None  # rid of the chunked request staged for the next round
    prefix_nodes: tuple[PrefixNodeSnap, ...]
    sessions: tuple[SessionSnap, ...]
    lora: LoraSnap
    drainer: DrainSnap
    max_loras_per_batch: int
    idle: bool  # no live request and no load in flight
    finished: tuple[str, ...] = field(default=())  # rids that reached a final state (ever)
    pinned: PinnedSnap = field(default_factory=PinnedSnap)
    injected_failures: tuple[int, int] | None = None  # the device's (failed copies, failures still armed)

    @cached_property
    def _live(self) -> tuple[ReqSnap, ...]:
        return tuple(r for r in self.requests if r.state in ("waiting", "prefilling", "decoding"))

    def live(self) -> tuple[ReqSnap, ...]:
        """The requests in a live state (computed once per snapshot)."""
        return self._live


_PLAIN = frozenset({int, str, float, bool, type(None)})


def canonical(value: Any) -> Any:
    """A hashable, comparable plain-value form of a snapshot (or any part of one): dataclasses
    become (field, value) tuples, arrays tuples of ints, sets sorted tuples. Two snapshots are
    equal as values exactly when their canonical forms are equal (numpy arrays make ``==`` on
    the dataclasses ambiguous)."""
    if type(value) in _PLAIN:  # the leaves, most of the values: returned before any other test
        return value
    if isinstance(value, np.ndarray):
        return ("array", tuple(value.reshape(-1).tolist()), value.shape)
    if hasattr(value, "__dataclass_fields__"):
        return (type(value).__name__, tuple((f, canonical(getattr(value, f))) for f in value.__dataclass_fields__))
    if isinstance(value, (set, frozenset)):
        return ("set", tuple(sorted((canonical(v) for v in value), key=repr)))
    if isinstance(value, dict):
        return ("dict", tuple(sorted(((canonical(k), canonical(v)) for k, v in value.items()), key=repr)))
    if isinstance(value, (tuple, list)):
        return tuple(canonical(v) for v in value)
    return value
