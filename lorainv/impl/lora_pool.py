"""The LoRA slot pool: which adapter (uid) lives in which of the ``P`` device slots.

Invariants (checked by the lora checkers and the stateful tests):

* L1: ``uid_to_slot`` and ``slot_to_uid`` are inverse over occupied slots; every other slot
  holds `EMPTY`; occupied + free == ``P``. ``None`` is the base model, a valid occupant.
* L4: every pinned uid is resident, and at most ``P - 1`` are pinned.
* L5: `choose_slot` / `prepare_batch` never pick a victim in ``protected`` (the batch) or pinned.
* L6: after `load`, the slot holds exactly the adapter's weights in the `LoraBuffers`
  layout; its rank tail and the groups it lacks are zero (see `hygiene_violations`).

Mutating calls: `load`, `evict`, `unmap_failed`, `touch`, `pin`, `unpin`, `prepare_batch`,
`release_host_copies`. Pure: `slot_of`, `can_fit`, `choose_slot`, `state`, `hygiene_violations`,
`loaded_at`, `host_cache`. A call that raises
leaves the pool unchanged. Callers keep loads in flight out of reach of eviction by passing
them in ``protected`` (`OverlapLoader.start_load` does this itself).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

import torch

from lorainv.config import RuntimeConfig
from lorainv.errors import AdapterError, AdapterNotFoundError, AdapterNotResidentError, AdapterRankError, PoolError
from lorainv.events import Event, Evicted, LoadStarted
from lorainv.impl import faults
from lorainv.impl.adapters import LoraAdapter
from lorainv.impl.dims import GROUPS, ModelDims
from lorainv.impl.lora_buffers import LoraBuffers
from lorainv.impl.pinned import PinnedHostCache, PinnedPipeline, copy_weight_into_buffer, shard_dims, tp_slice


class _Empty:
    """The free-slot marker: a singleton that survives copy and pickle."""

    _instance: _Empty | None = None

    def __new__(cls) -> _Empty:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "EMPTY"

    def __reduce__(self) -> str:
        return "EMPTY"


EMPTY: Final = _Empty()
Uid = str | None


def _uid_key(u: Uid) -> tuple[bool, str]:
    """Deterministic order over uids with the base model (None) first."""
    return (u is not None, u or "")


class LoraPool:
    """``P = max_loras_per_batch`` slots of rank ``R = max_lora_rank`` over `LoraBuffers`."""

    def __init__(
        self,
        cfg: RuntimeConfig,
        dims: ModelDims,
        device: Any,
        dtype: torch.dtype,
        *,
        host_cache: PinnedHostCache | None = None,
    ) -> None:
        self.cfg = cfg
        self.dims = dims
        self.device = device
        self.dtype = dtype
        self.num_slots = cfg.max_loras_per_batch
        self.max_rank = cfg.max_lora_rank
        self.local_dims = shard_dims(dims, cfg.tp_size)
        self.buffers = LoraBuffers.allocate(self.local_dims, self.num_slots, self.max_rank, dtype, device.torch_device)
        self.uid_to_slot: dict[Uid, int] = {}
        self.slot_to_uid: list[Uid | _Empty] = [EMPTY] * self.num_slots
        self.pinned: set[str] = set()
        self.tenants: dict[Uid, LoraAdapter | None] = {}  # what each mapped uid was loaded from
        self.pipeline = PinnedPipeline(device, dims, cfg, host_cache)
        self._tick = 0  # logical time for LRU/FIFO: never wall time
        self._last_used: dict[Uid, int] = {}
        self._loaded_at: dict[Uid, int] = {}
        self._staging: dict[int, list[torch.Tensor]] = {}  # keeps cast staging alive while copies run

    # ---- pure queries -------------------------------------------------------------------

    @property
    def rank_pools(self) -> tuple[LoraPool, ...]:
        """The pool of each simulated TP rank (just this one without tensor parallelism)."""
        return (self,)

    @property
    def host_cache(self) -> PinnedHostCache:
        """The pinned host cache this pool loads through (shared by the ranks of one host)."""
        return self.pipeline.cache

    def loaded_at(self, uid: Uid) -> int | None:
        """The logical tick at which resident ``uid`` was loaded; None when not resident."""
        return self._loaded_at.get(uid)

    def slot_of(self, uid: Uid) -> int:
        """The slot of a resident ``uid``; `AdapterNotResidentError` otherwise (never slot 0)."""
        slot = self.uid_to_slot.get(uid)
        if slot is None:
            if faults.on(self.cfg, "nonresident_falls_back_to_slot0"):
                return 0
            raise AdapterNotResidentError(f"adapter {uid!r} is not resident in the LoRA pool; load it first")
        return slot

    def free_slots(self) -> list[int]:
        return [s for s, o in enumerate(self.slot_to_uid) if o is EMPTY]

    def can_fit(self, adapters: Iterable[Uid], protected: Iterable[Uid] = frozenset()) -> bool:
        """Could all of ``adapters`` be resident at once, evicting only unpinned, unprotected others?"""
        want = set(adapters)
        keep = set(protected)
        fixed = [u for u in self.uid_to_slot if u not in want and (u in self.pinned or u in keep)]
        return len(want) <= self.num_slots - len(fixed)

    def choose_slot(self, uid: Uid, protected: Iterable[Uid]) -> tuple[int, Uid | _Empty] | None:
        """Where ``uid`` would go: ``(slot, occupant)``; the lowest free slot first, else a victim.

        The victim is the least recently used (``lru``) or earliest loaded (``fifo``) occupant
        that is neither in ``protected`` nor pinned, ties by slot id; the base model only when
        it is the sole candidate. None when there is no room.
        """
        if uid in self.uid_to_slot:
            raise PoolError(f"adapter {uid!r} is already resident in slot {self.uid_to_slot[uid]}")
        free = self.free_slots()
        if free:
            return free[0], EMPTY
        keep = set(protected)
        if faults.on(self.cfg, "evict_in_batch_adapter"):
            cands = list(self.uid_to_slot)
        else:
            cands = [u for u in self.uid_to_slot if u not in keep and u not in self.pinned]
        cands = [u for u in cands if u is not None] or cands
        if not cands:
            return None
        order = self._last_used if self.cfg.lora_eviction_policy == "lru" else self._loaded_at
        victim = min(cands, key=lambda u: (order[u], self.uid_to_slot[u]))
        return self.uid_to_slot[victim], victim

    def state(self) -> dict[str, Any]:
        """A plain snapshot: maps, free slots, pins, per-slot rank/scaling, LRU and FIFO order."""
        by = lambda d: sorted(self.uid_to_slot, key=lambda u: (d[u], self.uid_to_slot[u]))  # noqa: E731
        return {
            "num_slots": self.num_slots,
            "slot_to_uid": list(self.slot_to_uid),
            "uid_to_slot": dict(self.uid_to_slot),
            "free_slots": self.free_slots(),
            "pinned": sorted(self.pinned),
            "ranks": [int(r) for r in self.buffers.ranks.tolist()],
            "scalings": [float(s) for s in self.buffers.scalings.tolist()],
            "lru_order": by(self._last_used),
            "fifo_order": by(self._loaded_at),
        }

    def expected_slot(self, adapter: LoraAdapter | None, layer: int, group: str) -> tuple[torch.Tensor, torch.Tensor]:
        """What slot ``(A, B)`` of ``layer``/``group`` must hold for ``adapter`` (L6), in the pool dtype."""
        s = len(GROUPS[group])
        a = torch.zeros_like(self.buffers.A[layer][group][0])
        b = torch.zeros_like(self.buffers.B[layer][group][0])
        if adapter is not None:
            r, (tr, ts) = adapter.rank, (self.cfg.tp_rank, self.cfg.tp_size)
            ha, hb = (tp_slice(t, self.dims, group, w, tr, ts) for w, t in zip("AB", adapter.weights[layer][group]))
            a.view(s, self.max_rank, -1)[:, :r] = ha.view(s, r, -1).to(self.dtype)
            b[:, :r] = hb.to(self.dtype)
        return a, b

    def hygiene_violations(self, uid: Uid) -> list[str]:
        """L6 for a resident, landed ``uid``: the regions of its slot that differ from its tenant."""
        slot, adapter = self.uid_to_slot[uid], self.tenants[uid]
        bad = []
        want_rank = 0 if adapter is None else adapter.rank
        if int(self.buffers.ranks[slot]) != want_rank:
            bad.append(f"slot {slot}: rank {int(self.buffers.ranks[slot])} != {want_rank}")
        for layer in range(self.dims.num_layers):
            for g in GROUPS:
                want = self.expected_slot(adapter, layer, g)
                got = (self.buffers.A[layer][g][slot], self.buffers.B[layer][g][slot])
                for which, w, x in zip("AB", want, got):
                    if not torch.equal(w, x):
                        bad.append(f"slot {slot}: layer {layer} {g}.{which} differs from {uid!r}")
        return bad

    # ---- mutations ----------------------------------------------------------------------

    def load(self, uid: Uid, adapter: LoraAdapter | None, slot: int, stream: Any) -> list[Event]:
        """Evict ``slot``'s occupant, map ``uid`` there and issue its copies on ``stream``.

        The current stream copies synchronously; a side stream leaves the slot poisoned until
        the copies complete (`OverlapLoader` waits on them). Emits ``Evicted`` then ``LoadStarted``.
        """
        if not 0 <= slot < self.num_slots:
            raise PoolError(f"slot {slot} is out of range [0, {self.num_slots})")
        if uid in self.uid_to_slot:
            raise PoolError(f"adapter {uid!r} is already resident in slot {self.uid_to_slot[uid]}")
        self._check_adapter(uid, adapter)
        occ = self.slot_to_uid[slot]
        if occ in self.pinned and not faults.on(self.cfg, "evict_in_batch_adapter"):
            raise AdapterError(f"slot {slot} holds pinned adapter {occ!r}; unpin it before evicting")
        events: list[Event] = [] if occ is EMPTY else self._unmap(occ)  # type: ignore[arg-type]
        self.uid_to_slot[uid] = slot
        self.slot_to_uid[slot] = uid
        self.tenants[uid] = adapter
        self._tick += 1
        self._last_used[uid] = self._loaded_at[uid] = self._tick
        self.buffers.ranks[slot] = 0 if adapter is None else adapter.rank
        self.buffers.scalings[slot] = 0.0 if adapter is None else adapter.scaling
        self._write_slot(slot, adapter, stream)
        overlap = stream is not self.device.current_stream()
        events.append(LoadStarted(adapter=uid, slot=slot, overlap=overlap))
        return events

    def evict(self, uid: Uid) -> list[Event]:
        """Unmap a resident, unpinned ``uid``; its slot becomes `EMPTY` with rank 0."""
        if uid not in self.uid_to_slot:
            raise AdapterNotResidentError(f"cannot evict adapter {uid!r}: it is not resident")
        if uid in self.pinned:
            raise AdapterError(f"cannot evict adapter {uid!r}: it is pinned; unpin it first")
        return self._unmap(uid)

    def unmap_failed(self, uid: Uid) -> None:
        """After a failed transfer: the slot is `EMPTY` again, zeroed (no poison left), rank 0."""
        slot = self.slot_of(uid)
        self._unmap(uid)
        if uid is not None:
            self.pinned.discard(uid)
        self._zero_slot(slot)

    def touch(self, uids: Iterable[Uid] | Uid) -> None:
        """Mark the resident ones of ``uids`` as used now (one logical tick for the whole call)."""
        if uids is None or isinstance(uids, str):
            uids = [uids]
        self._tick += 1
        for u in uids:
            if u in self.uid_to_slot:
                self._last_used[u] = self._tick

    def pin(self, uid: str) -> None:
        """Keep resident ``uid`` from eviction; at most ``P - 1`` pins so a slot is always free to use."""
        if not isinstance(uid, str):
            raise AdapterError(f"only named adapters can be pinned, got {uid!r}")
        if uid in self.pinned:
            return
        if uid not in self.uid_to_slot:
            raise AdapterNotResidentError(f"cannot pin adapter {uid!r}: it is not resident; load it first")
        limit = self.num_slots - 1
        if len(self.pinned) >= limit:
            raise AdapterError(
                f"cannot pin adapter {uid!r}: at most max_loras_per_batch - 1 = {limit} adapters can be pinned"
            )
        self.pinned.add(uid)

    def unpin(self, uid: str) -> None:
        if uid not in self.pinned:
            raise AdapterError(f"adapter {uid!r} is not pinned")
        self.pinned.remove(uid)

    def prepare_batch(
        self, adapters: Iterable[Uid], registry: Mapping[str, LoraAdapter], protected: Iterable[Uid] = frozenset()
    ) -> list[Event]:
        """Make every uid of ``adapters`` resident now (current stream) and mark them used.

        Victims are never in ``adapters`` or ``protected``. Raises (pool unchanged) when a name
        is not in ``registry`` or they cannot all fit.
        """
        want = set(adapters)
        missing = sorted((u for u in want if u not in self.uid_to_slot), key=_uid_key)
        for u in missing:
            if u is not None and u not in registry:
                raise AdapterNotFoundError(f"adapter {u!r} is not registered")
            self._check_adapter(u, None if u is None else registry[u])
        keep = want | set(protected)
        if not self.can_fit(want, keep):
            held = (u for u in self.uid_to_slot if u not in want and (u in keep or u in self.pinned))
            fixed = sorted(held, key=_uid_key)
            raise AdapterNotResidentError(
                f"cannot make {sorted(want, key=_uid_key)} resident at once: {self.num_slots} slots, "
                f"{fixed} pinned or protected; raise max_loras_per_batch or split the batch"
            )
        events: list[Event] = []
        for u in missing:
            choice = self.choose_slot(u, keep)
            if choice is None:  # can_fit said yes; a miss here is a pool bug
                raise PoolError(f"no slot for {u!r} although can_fit was true")
            events += self.load(u, None if u is None else registry[u], choice[0], self.device.current_stream())
        self.touch(want)
        return events

    def release_host_copies(self, uid: str) -> int:
        """Drop ``uid``'s pinned host slices (on unregister); returns how many were dropped.

        Refused (`PoolError`, nothing dropped) while ``uid`` is mapped: a mapped slot may still
        have copies in flight that read those slices. Callers also keep it out of the loader.
        """
        if uid in self.uid_to_slot:
            raise PoolError(f"adapter {uid!r} is still resident in slot {self.uid_to_slot[uid]}; evict it first")
        return self.host_cache.drop(uid)

    # ---- internals ----------------------------------------------------------------------

    def _check_adapter(self, uid: Uid, adapter: LoraAdapter | None) -> None:
        if (uid is None) != (adapter is None):
            raise PoolError(f"uid {uid!r} and adapter {getattr(adapter, 'name', None)!r} disagree: None is the base")
        if adapter is None:
            return
        if adapter.rank > self.max_rank:
            raise AdapterRankError(f"adapter {uid!r} has rank {adapter.rank} > max_lora_rank={self.max_rank}")
        if len(adapter.weights) != self.dims.num_layers:
            n = len(adapter.weights)
            raise AdapterError(f"adapter {uid!r} has {n} layers; the model has {self.dims.num_layers}")

    def _unmap(self, uid: Uid) -> list[Event]:
        slot = self.uid_to_slot.pop(uid)
        self.slot_to_uid[slot] = EMPTY
        for d in (self._last_used, self._loaded_at, self.tenants):
            d.pop(uid, None)
        self._staging.pop(slot, None)
        self.buffers.ranks[slot] = 0
        self.buffers.scalings[slot] = 0.0
        return [Evicted(adapter=uid, slot=slot)]

    def _zero_slot(self, slot: int, groups: Iterable[str] = GROUPS) -> None:
        for layer in range(self.dims.num_layers):
            for g in groups:
                self.buffers.A[layer][g][slot].zero_()
                self.buffers.B[layer][g][slot].zero_()

    def _write_slot(self, slot: int, adapter: LoraAdapter | None, stream: Any) -> None:
        """Issue ``adapter``'s copies into ``slot``; zero its rank tail and the groups it lacks.

        Pipelined: layer ``i + 1`` is pinned before layer ``i``'s copies are issued.
        """
        keep_stale = faults.on(self.cfg, "stale_slot_tail")
        pipe = self.pipeline
        pipe.log = []
        if adapter is None:
            if not keep_stale:
                self._zero_slot(slot)
            return
        lacking = [g for g, ms in GROUPS.items() if not any(m in adapter.target_modules for m in ms)]
        if lacking and not keep_stale:
            self._zero_slot(slot, lacking)
        present = [g for g in GROUPS if g not in lacking]
        r, staging = adapter.rank, []
        nxt = pipe.host_layer(adapter, 0, present)
        for layer in range(self.dims.num_layers):
            host = nxt
            if layer + 1 < self.dims.num_layers:
                nxt = pipe.host_layer(adapter, layer + 1, present)
            for g in present:
                a_slot = self.buffers.A[layer][g][slot].view(len(GROUPS[g]), self.max_rank, -1)
                b_slot = self.buffers.B[layer][g][slot]
                a_host, b_host = host[g]
                for dst, src in ((a_slot[:, :r], a_host.view(len(GROUPS[g]), r, -1)), (b_slot[:, :r], b_host)):
                    st = copy_weight_into_buffer(dst, src, self.device, stream)
                    if st is not None:
                        staging.append(st)
                if not keep_stale:
                    a_slot[:, r:].zero_()
                    b_slot[:, r:].zero_()
            pipe.log.append(("copy", layer))
        self._staging[slot] = staging
