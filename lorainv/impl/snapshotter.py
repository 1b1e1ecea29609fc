"""Builds the tensor-free `Snapshot` of an engine (the only thing checkers read).

A pure read: it calls only documented, non-mutating accessors (``OverlapLoader.tracked``,
``is_ready``, ``Engine.is_idle``, ``LoraPool.rank_pools``/``host_cache``, the allocators'
size and free-list views, ``PrefixCache.iter_nodes``), never reaps a load, never writes into
the engine, and reads no private state. Taking a snapshot or not leaves the event stream
unchanged (``tests/stateful/test_snapshot_purity.py``). The only cache is the slot oracle's
memo of expected digests, keyed by the adapter object and its tensors' versions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lorainv.checkers.slot_oracle import expected_digests, slot_digests
from lorainv.impl.lora_pool import EMPTY
from lorainv.impl.request import ReqState
from lorainv.snapshot import (
    EMPTY_NAME,
    DrainSnap,
    LoadSnap,
    LoraSnap,
    PinnedEntrySnap,
    PinnedSnap,
    PrefixNodeSnap,
    ReqSnap,
    SegmentsSnap,
    SessionSnap,
    SlotContentSnap,
    Snapshot,
    build,
)


def _uid(u: Any) -> Any:
    return EMPTY_NAME if u is EMPTY else u


def _lora(engine: Any, idle: bool) -> LoraSnap:
    pool, loader = engine.pool, engine.loader
    tracked = loader.tracked() if loader is not None else ()
    mapped = set(pool.uid_to_slot)
    ready = frozenset(u for u in mapped if (loader.is_ready(u) if loader is not None else True))
    return build(
        LoraSnap,
        num_slots=pool.num_slots,
        slot_to_uid=tuple(_uid(u) for u in pool.slot_to_uid),
        uid_to_slot=tuple(sorted(pool.uid_to_slot.items(), key=lambda kv: kv[1])),
        pinned=frozenset(pool.pinned),
        loads=tuple(LoadSnap(t.uid, t.slot, t.done, t.failed) for t in tracked),
        ready=ready,
        ranks=tuple(pool.buffers.ranks.tolist()),  # a long tensor: Python ints
        registered=tuple(sorted((n, a.rank) for n, a in engine.registry.items())),
        last_batch=engine.last_batch,
        last_batch_slots=engine.last_batch_slots,
        last_batch_lens=engine.last_batch_lens,
        segments=_segments(engine.last_batch_info),
        evictions=tuple(engine.scheduler.evictions),
        contents=_contents(engine, {t.uid for t in tracked}, cached=not idle),
    )


def _segments(info: Any) -> SegmentsSnap | None:
    """The last batch's segment metadata as plain ints (a host copy of three small tensors)."""
    if info is None:
        return None
    return SegmentsSnap(
        tuple(info.seg_lens.tolist()), tuple(info.seg_indptr.tolist()), tuple(info.weight_indices.tolist())
    )


def _contents(engine: Any, loading: set[Any], *, cached: bool) -> tuple[SlotContentSnap, ...]:
    """Digests of every readable slot (resident, its load reaped) on every TP rank, next to
    the digests its registered adapter calls for. A slot's digest is reused only while its
    buffer tensor's version counter shows no write since (`slot_digests`), so a later
    corruption through torch shows on the op that made it; ``cached=False`` (at idle) rehashes
    every region."""
    out = []
    cfg = engine.cfg
    for tp_rank, pool in enumerate(engine.pool.rank_pools):
        judged = []
        for uid, slot in sorted(pool.uid_to_slot.items(), key=lambda kv: kv[1]):
            if uid in loading:
                continue  # copies in flight: the slot reads as poison until reaped
            if uid is not None and uid not in engine.registry:
                continue  # resident but unregistered: the lora/pinned checkers report it
            judged.append((uid, slot))
        held = slot_digests(pool.buffers, [slot for _, slot in judged], cached=cached)
        for uid, slot in judged:
            adapter = None if uid is None else engine.registry[uid]
            want = expected_digests(
                adapter, engine.dims, tp_rank=tp_rank, tp_size=cfg.tp_size, max_rank=pool.max_rank, dtype=pool.dtype
            )
            out.append(_content_snap(tp_rank, slot, uid, held[slot], want))
    return tuple(out)


def _content_snap(tp_rank: int, slot: int, uid: Any, held: Any, want: Any) -> SlotContentSnap:
    """A `SlotContentSnap`, reused when made from the very same digest tuples (immutable)."""
    key = (tp_rank, slot, uid, id(held), id(want))
    hit = _CONTENT_MEMO.get(key)
    if hit is not None and hit.held is held and hit.want is want:
        return hit
    if len(_CONTENT_MEMO) >= 1024:
        _CONTENT_MEMO.pop(next(iter(_CONTENT_MEMO)))
    snap = _CONTENT_MEMO[key] = SlotContentSnap(tp_rank, slot, uid, held, want)
    return snap


# (tp rank, slot, uid, id(held), id(want)) -> the snapshot, which holds both tuples (no id reuse)
_CONTENT_MEMO: dict[tuple[Any, ...], SlotContentSnap] = {}


def _pinned(engine: Any) -> PinnedSnap:
    """The pinned host cache as plain values; ``current`` compares tensor identity only.

    The entries and ``need`` are derived from (the cache's entry objects, the registered
    adapter objects); they are reused while every one of those is the same object (the memo
    holds them, so no id is reused). An adapter object always holds the same tensor objects
    (`LoraAdapter` is frozen, its layer maps read-only), so its identity stands for theirs. So
    is the cache's own byte count (`PinnedHostCache.nbytes` reads nothing but its entries),
    asked again on any change."""
    cache = engine.pool.host_cache
    items = tuple(cache.entries.items())
    adapters = tuple(engine.registry.items())
    sig = (tuple((k, id(v)) for k, v in items), tuple((n, id(a)) for n, a in adapters))
    hit = _PINNED_MEMO.get(id(cache))
    if hit is not None and hit[0] is cache and hit[2] == sig:
        entries, need, nbytes = hit[3], hit[4], hit[5]
    else:
        nbytes = cache.nbytes()
        view = cache.view()
        ids = {n: {id(t) for layer in a.weights for ab in layer.values() for t in ab} for n, a in adapters}
        entries = tuple(
            PinnedEntrySnap(key, adapter, nbytes, id(src) in ids.get(adapter, ())) for key, adapter, nbytes, src in view
        )
        need = tuple(sorted((n, a.nbytes()) for n, a in adapters))
        if hit is None and len(_PINNED_MEMO) >= 64:
            _PINNED_MEMO.pop(next(iter(_PINNED_MEMO)))
        _PINNED_MEMO[id(cache)] = (cache, (items, adapters), sig, entries, need, nbytes)
    return PinnedSnap(entries, nbytes, need, engine.cfg.tp_size)


# id(cache) -> (cache, the objects the signature names, signature, entries, need, the cache's
# own byte count)
_PINNED_MEMO: dict[int, tuple[Any, Any, Any, tuple[PinnedEntrySnap, ...], tuple[tuple[str, int], ...], int]] = {}


def _req(r: Any, r2t: np.ndarray, held: tuple[np.ndarray, np.ndarray] | None = None) -> ReqSnap:
    """One request as plain values. A request without a row or tokens (waiting or ended: the
    bulk of a long run) is reused from the last snapshot when every field it is made of is
    equal (its arrays are empty, so sharing them shares nothing mutable). ``held``: copies of
    its indices and of its row's first ``len(indices)`` entries already taken (`_bulk_copies`);
    without it they are copied here."""
    fill = tuple(r.fill)
    node = r.cache_node
    cache_node = None if node is None or node.parent is None else node.id
    session_alloc = r.session_alloc if r.session_lent else 0
    state = r.state._value_  # the member's own attribute: Enum.value is a property call
    row = r.row
    indices = r.indices
    n_out = len(r.output)
    bare = row is None and len(indices) == 0
    if bare:
        key = (
            r.rid,
            state,
            r.adapter,
            r.session_id,
            r.kv_len,
            r.cache_len,
            session_alloc,
            r.own_row,
            n_out,
            r.max_new_tokens,
            cache_node,
            fill,
        )
        hit = _REQ_MEMO.get(id(r))
        if hit is not None and hit[0] is r and hit[1] == key:
            return hit[2]
    if held is not None:
        indices, entries = held
    else:
        indices = np.array(indices, dtype=np.int64)  # a copy
        entries = r2t[row, : len(indices)].copy() if row is not None else np.zeros(0, np.int64)
    # `build` without its field-set comparison (the hottest constructor: one per live request
    # per op); tests/unit/test_snapshot_fields.py checks this literal names exactly ReqSnap's fields
    snap = object.__new__(ReqSnap)
    snap.__dict__.update(
        {
            "rid": r.rid,
            "state": state,
            "adapter": r.adapter,
            "session_id": r.session_id,
            "row": row,
            "indices": indices,
            "kv_len": r.kv_len,
            "cache_len": r.cache_len,
            "session_alloc": session_alloc,
            "own_row": r.own_row,
            "output_len": n_out,
            "max_new_tokens": r.max_new_tokens,
            "fill_len": len(fill),
            "row_entries": entries,
            "cache_node": cache_node,
            "fill": fill,
        }
    )
    if bare:
        if len(_REQ_MEMO) >= _REQ_MEMO_LIMIT:
            _REQ_MEMO.pop(next(iter(_REQ_MEMO)))
        _REQ_MEMO[id(r)] = (r, key, snap)
    return snap


# id(request) -> (the request, the fields its snapshot was made of, the snapshot)
_REQ_MEMO: dict[int, tuple[Any, tuple[Any, ...], ReqSnap]] = {}
_REQ_MEMO_LIMIT = 4096


_LIVE_STATES = frozenset(s.value for s in ReqState if s.live)

# From this many requests holding a row, their arrays are copied in two numpy calls, not two
# per request (the fixed cost of the bulk path, about a dozen numpy calls, pays off above it)
_BULK_FROM = 48


def _bulk_copies(reqs: list[Any], r2t: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """id(request) -> (a copy of its ``indices``, a copy of its row's first ``len(indices)``
    entries) for every request that holds a row, when there are at least ``_BULK_FROM``.

    Both copies are views into two fresh arrays made here (one concatenation, one gather), read
    only, so the snapshot holds values nothing else can write. A pure read."""
    rowed = [r for r in reqs if r.row is not None]
    if len(rowed) < _BULK_FROM:
        return {}
    lens = np.fromiter((len(r.indices) for r in rowed), dtype=np.int64, count=len(rowed))
    rows = np.fromiter((r.row for r in rowed), dtype=np.int64, count=len(rowed))
    if rows.min() < 0 or rows.max() >= r2t.shape[0] or lens.max() > r2t.shape[1]:
        return {}  # a row off the table or longer than it: the per-request path shows it as it is
    ends = np.cumsum(lens)
    starts = ends - lens
    flat = np.concatenate([np.asarray(r.indices, dtype=np.int64) for r in rowed])
    # position k of the concatenation reads r2t.flat[row * width + (k - start)] of its request
    width = r2t.shape[1]
    at = np.arange(int(ends[-1]), dtype=np.int64) + np.repeat(rows * width - starts, lens)
    entries = np.ascontiguousarray(r2t).reshape(-1).take(at).astype(np.int64, copy=False)
    flat.flags.writeable = False
    entries.flags.writeable = False
    return {id(r): (flat[a:b], entries[a:b]) for r, a, b in zip(rowed, starts.tolist(), ends.tolist())}


def take_snapshot(engine: Any) -> Snapshot:
    idle = engine.is_idle()
    s = engine.scheduler
    alloc = engine.allocator
    reqs = []
    # one host view of the whole table (no copy on a CPU device); each row's slice is copied
    r2t = engine.rows.req_to_token.detach().cpu().numpy()
    held = 0  # K1's held_by_requests: tokens the live requests account for
    finished = []
    everyone = list(engine.requests.values())
    bulk = _bulk_copies(everyone, r2t)
    for r in everyone:
        snap = _req(r, r2t, bulk.get(id(r)))
        reqs.append(snap)
        if snap.state in _LIVE_STATES:  # == r.state.live, without its property and enum compares
            held += r.held_tokens
        else:
            finished.append(r.rid)
    nodes = tuple(
        PrefixNodeSnap(
            n.id,
            n.namespace,
            None if n.parent is None or n.parent.parent is None else n.parent.id,
            n.value.copy(),
            n.lock_ref,
            tuple(n.key),
        )
        for n in engine.cache.iter_nodes()
    )
    sessions = tuple(
        SessionSnap(x.session_id, x.row, np.asarray(x.indices).copy(), x.kv_len, x.is_active, x.active_rid, x.adapter)
        for x in engine.sessions.slots.values()
    )
    drainer = engine.drainer
    return build(
        Snapshot,
        step=engine.steps,
        now=engine.clock.now(),
        total_tokens=alloc.size,
        page_size=alloc.page_size,
        free_indices=alloc.free_indices(),
        available=alloc.available_size(),
        evictable=engine.cache.evictable_size(),
        protected=engine.cache.protected_size(),
        session_held=engine.sessions.session_held_tokens(),
        held_by_requests=held,
        rows_total=engine.rows.size,
        free_rows=tuple(engine.rows.free_rows()),
        requests=tuple(reqs),
        staged=s.staged.rid if s.staged is not None else None,
        prefix_nodes=nodes,
        sessions=sessions,
        lora=_lora(engine, idle),
        drainer=DrainSnap(
            drainer.enabled,
            tuple(sorted(drainer.marks.items(), key=repr)),
            tuple(sorted(drainer.reserved, key=repr)),
        ),
        max_loras_per_batch=engine.cfg.max_loras_per_batch,
        injected_failures=engine.device.injected_failures(),
        idle=idle,
        finished=tuple(finished),
        pinned=_pinned(engine),
    )


# The `Snapshot` fields whose values can come through a memo of this module or of the slot
# oracle, or through a bulk path (requests: `_REQ_MEMO` and `_bulk_copies`; lora, through its
# contents: `_CONTENT_MEMO` and the slot oracle's; pinned: `_PINNED_MEMO`). Every other field
# is computed afresh on every call, so a memoized snapshot can differ from `fresh_snapshot`
# only in these. A new memo or bulk path must add its field.
MEMOIZED_FIELDS = ("requests", "lora", "pinned")


def fresh_snapshot(engine: Any) -> Snapshot:
    """`take_snapshot` computed with every shortcut off: the memo dicts of this module and of
    the slot oracle are swapped for empty ones, and the bulk copy of many requests' arrays
    (`_bulk_copies`) for the per-request copies, during the call and restored after, so nothing
    but those module globals changes, and only for the call's duration. A snapshot taken the
    usual way must equal this one (`lorainv.snapshot.canonical` compares them)."""
    import sys

    from lorainv.checkers import slot_oracle

    global _BULK_FROM
    here = sys.modules[__name__]
    names = [(here, n) for n in ("_CONTENT_MEMO", "_PINNED_MEMO", "_REQ_MEMO")]
    names += [(slot_oracle, n) for n in ("_MEMO", "_SLOTS", "_BASE")]
    saved = [getattr(mod, n) for mod, n in names]
    bulk_from = _BULK_FROM
    try:
        for mod, n in names:
            setattr(mod, n, {})
        _BULK_FROM = sys.maxsize
        return take_snapshot(engine)
    finally:
        for (mod, n), value in zip(names, saved):
            setattr(mod, n, value)
        _BULK_FROM = bulk_from
