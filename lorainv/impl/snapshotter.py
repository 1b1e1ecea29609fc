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
from lorainv.snapshot import (
    EMPTY_NAME,
    DrainSnap,
    LoadSnap,
    LoraSnap,
    PinnedEntrySnap,
    PinnedSnap,
    PrefixNodeSnap,
    ReqSnap,
    SessionSnap,
    SlotContentSnap,
    Snapshot,
)


def _uid(u: Any) -> Any:
    return EMPTY_NAME if u is EMPTY else u


def _lora(engine: Any) -> LoraSnap:
    pool, loader = engine.pool, engine.loader
    tracked = loader.tracked() if loader is not None else ()
    mapped = set(pool.uid_to_slot)
    ready = frozenset(u for u in mapped if (loader.is_ready(u) if loader is not None else True))
    return LoraSnap(
        num_slots=pool.num_slots,
        slot_to_uid=tuple(_uid(u) for u in pool.slot_to_uid),
        uid_to_slot=tuple(sorted(pool.uid_to_slot.items(), key=lambda kv: kv[1])),
        pinned=frozenset(pool.pinned),
        loads=tuple(LoadSnap(t.uid, t.slot, t.done, t.failed) for t in tracked),
        ready=ready,
        ranks=tuple(int(r) for r in pool.buffers.ranks.tolist()),
        registered=tuple(sorted((n, a.rank) for n, a in engine.registry.items())),
        last_batch=engine.last_batch,
        last_batch_slots=engine.last_batch_slots,
        evictions=tuple(engine.scheduler.evictions),
        contents=_contents(engine, {t.uid for t in tracked}),
    )


def _contents(engine: Any, loading: set[Any]) -> tuple[SlotContentSnap, ...]:
    """Digests of every readable slot (resident, its load reaped) on every TP rank, next to
    the digests its registered adapter calls for. Never cached: a later corruption shows."""
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
        held = slot_digests(pool.buffers, [slot for _, slot in judged])
        for uid, slot in judged:
            adapter = None if uid is None else engine.registry[uid]
            want = expected_digests(
                adapter, engine.dims, tp_rank=tp_rank, tp_size=cfg.tp_size, max_rank=pool.max_rank, dtype=pool.dtype
            )
            out.append(SlotContentSnap(tp_rank, slot, uid, held[slot], want))
    return tuple(out)


def _pinned(engine: Any) -> PinnedSnap:
    """The pinned host cache as plain values; ``current`` compares tensor identity only."""
    cache = engine.pool.host_cache
    view = cache.view()
    sources: dict[str, set[int]] = {}
    for name in {adapter for _, adapter, _, _ in view}:
        a = engine.registry.get(name)
        sources[name] = set() if a is None else {id(t) for layer in a.weights for ab in layer.values() for t in ab}
    entries = tuple(
        PinnedEntrySnap(key, adapter, nbytes, id(src) in sources[adapter]) for key, adapter, nbytes, src in view
    )
    need = tuple(sorted((n, a.nbytes()) for n, a in engine.registry.items()))
    return PinnedSnap(entries, cache.nbytes(), need, engine.cfg.tp_size)


def take_snapshot(engine: Any) -> Snapshot:
    s = engine.scheduler
    alloc = engine.allocator
    reqs = []
    r2t = engine.rows.req_to_token
    for r in engine.requests.values():
        fill = r.fill
        entries = r2t[r.row, : r.alloc_len].cpu().numpy().copy() if r.row is not None else np.zeros(0, np.int64)
        reqs.append(
            ReqSnap(
                rid=r.rid,
                state=r.state.value,
                adapter=r.adapter,
                session_id=r.session_id,
                row=r.row,
                indices=np.asarray(r.indices, dtype=np.int64).copy(),
                kv_len=r.kv_len,
                cache_len=r.cache_len,
                session_alloc=r.session_alloc if r.session_lent else 0,
                own_row=r.own_row,
                output_len=len(r.output),
                max_new_tokens=r.max_new_tokens,
                fill_len=len(fill),
                row_entries=entries,
                cache_node=None if r.cache_node is None or r.cache_node.parent is None else r.cache_node.id,
                fill=tuple(fill),
            )
        )
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
    held = sum(r.held_tokens for r in engine.requests.values() if r.state.live)
    drainer = engine.drainer
    return Snapshot(
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
        lora=_lora(engine),
        drainer=DrainSnap(
            drainer.enabled,
            tuple(sorted(drainer.marks.items(), key=repr)),
            tuple(sorted(drainer.reserved, key=repr)),
        ),
        max_loras_per_batch=engine.cfg.max_loras_per_batch,
        idle=engine.is_idle(),
        finished=tuple(r.rid for r in engine.requests.values() if not r.state.live),
        pinned=_pinned(engine),
    )
