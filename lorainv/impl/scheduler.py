"""The scheduler: FCFS admission, chunked prefill, decode, retraction, abort, sessions and
LoRA admission. It owns the request queues and moves memory between pools; the engine
runs the forward passes it plans.

Invariants it maintains (checked by ``lorainv.checkers``):
* a live request is in exactly one of ``waiting`` (holds nothing), ``staged`` (a chunked
  prefill in progress; holds its row and KV) or ``running`` (decoding);
* every token a request allocates is freed exactly once — on finish (inserted into the
  prefix cache or saved to its session, the rest freed), abort or retraction;
* LoRA admission (L2): the distinct adapters of running ∪ staged ∪ loads in flight ∪ the
  candidate (the base model counts) never exceed ``max_loras_per_batch``;
* a request is scheduled only once its adapter is resident and its load waited on (L3).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from lorainv.config import RuntimeConfig
from lorainv.errors import RequestError
from lorainv.events import (
    Aborted,
    CacheEvicted,
    CacheInserted,
    Event,
    Finished,
    LoadCompleted,
    LoadFailed,
    PrefixHit,
    Retracted,
    SessionRestored,
    SessionSaved,
)
from lorainv.impl import faults
from lorainv.impl.clock import Clock
from lorainv.impl.drainer import Drainer, ReqInfo
from lorainv.impl.kv_pool import ReqToTokenPool, TokenAllocator
from lorainv.impl.lora_pool import LoraPool
from lorainv.impl.overlap_loader import LoadStatus, OverlapLoader
from lorainv.impl.prefix_cache import PrefixCache
from lorainv.impl.request import ReqState, Request
from lorainv.impl.sessions import SessionManager


class Scheduler:
    """Plans each round; see the module docstring for the invariants."""

    def __init__(
        self,
        cfg: RuntimeConfig,
        allocator: TokenAllocator,
        rows: ReqToTokenPool,
        cache: PrefixCache,
        sessions: SessionManager,
        pool: LoraPool,
        loader: OverlapLoader | None,
        drainer: Drainer,
        registry: Mapping[str, Any],
        device: Any,
        clock: Clock,
    ) -> None:
        self.cfg = cfg
        self.allocator = allocator
        self.rows = rows
        self.cache = cache
        self.sessions = sessions
        self.pool = pool
        self.loader = loader
        self.drainer = drainer
        self.registry = registry
        self.device = device
        self.clock = clock
        self.waiting: list[Request] = []
        self.staged: Request | None = None
        self.running: list[Request] = []
        self.evictions: list[tuple[Any, int, frozenset[Any]]] = []
        self.load_failures: dict[str | None, int] = {}
        self.round_loads: set[str | None] = set()

    # -- adapters ---------------------------------------------------------------------------
    def reap_loads(self, ev: list[Event]) -> None:
        """Land completed loads (in event order); past ``max_load_retries`` failures of an
        adapter, its waiting requests end with ``reason="abort"``."""
        if self.loader is None:
            return
        for e in self.loader.reap():
            ev.append(e)
            if isinstance(e, LoadFailed):
                n = self.load_failures.get(e.adapter, 0) + 1
                self.load_failures[e.adapter] = n
                if n > self.cfg.max_load_retries:
                    self.load_failures[e.adapter] = 0
                    why = f"adapter load failed {n} time(s), retries exhausted (max_load_retries="
                    why += f"{self.cfg.max_load_retries}): {e.detail}"
                    for r in [r for r in self.waiting if r.adapter == e.adapter]:
                        self.waiting.remove(r)
                        self.finish(r, "abort", why, ev)
            elif isinstance(e, LoadCompleted):
                self.load_failures.pop(e.adapter, None)

    def active_adapters(self) -> set[str | None]:
        """Adapters that must stay resident: running ∪ staged ∪ loads in flight (L2). Pure."""
        active = {r.adapter for r in self.running}
        if self.staged is not None:
            active.add(self.staged.adapter)
        if self.loader is not None:
            active |= self.loader.in_flight()
        return active

    def adapter_ready(self, uid: str | None) -> bool:
        """May a batch read ``uid``'s slot now (resident and its load waited on)? Pure: loads
        are reaped by `reap_loads`, which every op runs first."""
        if self.loader is not None:
            return self.loader.is_ready(uid)
        return uid in self.pool.uid_to_slot

    def _admit_adapter(self, uid: str | None, batch_adapters: set[str | None], ev: list[Event]) -> bool:
        """True when ``uid`` may join this round's batch. Mutates: reaps completed loads, may
        start ``uid``'s load (evicting a victim) or, without overlap loading, load it now."""
        self.reap_loads(ev)
        if faults.on(self.cfg, "admission_ignores_staged_chunk"):
            # the historic check: running requests only, not this round's batch, the staged
            # chunk or the loads in flight
            need = {r.adapter for r in self.running} | {uid}
        else:
            need = self.active_adapters() | batch_adapters
            if uid not in need:  # a new slot: the slots a drain freed for starving adapters are theirs
                need |= self.drainer.reserved
            need.add(uid)
        if uid is None and faults.on(self.cfg, "nonresident_falls_back_to_slot0"):
            return True  # the historic base-model path: "no adapter" was assumed to need no slot
        if len(need) > self.cfg.max_loras_per_batch:
            return False
        adapter = None if uid is None else self.registry[uid]
        protected = need | self.round_loads
        if self.loader is not None:
            if self.loader.is_ready(uid):
                return True
            if self.loader.status(uid) is not LoadStatus.NOT_LOADED:
                return False
            started = self.loader.start_load(uid, adapter, protected=protected)
            if started is None:
                return False
            self._note_evictions(started, protected)
            ev.extend(started)
            ev.extend(self.drainer.end_reservation(uid, "admitted"))
            self.round_loads.add(uid)  # no thrashing: nothing loaded this round is evicted this round
            self.reap_loads(ev)
            return self.loader.is_ready(uid)
        if uid in self.pool.uid_to_slot:
            return True
        choice = self.pool.choose_slot(uid, protected=protected)
        if choice is None:
            return False
        slot = choice[0]
        loaded = self.pool.load(uid, adapter, slot, self.device.current_stream())
        self._note_evictions(loaded, protected)
        ev.extend(loaded)
        ev.append(LoadCompleted(uid, slot))
        return True

    def _note_evictions(self, events: list[Event], protected: set[Any]) -> None:
        from lorainv.events import Evicted

        for e in events:
            if isinstance(e, Evicted):
                self.evictions.append((e.adapter, e.slot, frozenset(protected)))

    # -- KV ---------------------------------------------------------------------------------
    def _alloc(self, n: int, ev: list[Event]) -> np.ndarray | None:
        """``n`` tokens (page multiple), evicting prefix-cache leaves first if needed."""
        if n <= 0:
            return np.zeros(0, dtype=np.int64)
        if self.allocator.available_size() < n:
            freed = self.cache.evict(n - self.allocator.available_size())
            if freed:
                ev.append(CacheEvicted(freed))
        return self.allocator.alloc(n)

    def _grow(self, req: Request, kv_target: int, ev: list[Event]) -> bool:
        """Make ``req`` hold room for ``kv_target`` tokens of KV (whole pages)."""
        ps = self.allocator.page_size
        need = -(-kv_target // ps) * ps - req.alloc_len
        if need <= 0:
            return True
        idx = self._alloc(need, ev)
        if idx is None:
            return False
        assert req.row is not None
        self.rows.write(req.row, req.alloc_len, idx)
        req.indices = np.concatenate([req.indices, idx])
        return True

    def release(self, req: Request, mode: str, ev: list[Event]) -> None:
        """Give back everything ``req`` holds. ``mode``: finish | abort | retract."""
        ps = self.allocator.page_size
        if req.session_id is not None and req.session_lent:
            if mode == "finish":
                assert req.row is not None
                self.sessions.save(req.session_id, req.row, req.fill, req.indices, req.kv_len, req.adapter)
                ev.append(SessionSaved(req.session_id, req.rid, req.kv_len))
            else:
                self.allocator.free(req.indices[req.session_alloc :])
                if req.own_row and req.row is not None:
                    self.rows.free(req.row)
                self.sessions.release(req.session_id)
            req.reset_memory()
            return
        if req.row is None:
            return
        own = req.indices[req.cache_len :]
        if mode == "finish" and self.cache.enabled:
            aligned = req.kv_len - req.kv_len % ps
            cached = self.cache.insert(req.adapter, req.fill[:aligned], req.indices[:aligned])
            if aligned > cached:
                ev.append(CacheInserted(req.rid, aligned - cached))
            self.allocator.free(req.indices[req.cache_len : max(cached, req.cache_len)])
            self.allocator.free(req.indices[aligned:])
        elif mode == "retract" and faults.on(self.cfg, "retract_leaks_tail"):
            self.allocator.free(req.indices[req.cache_len : max(req.cache_len, req.kv_len - req.kv_len % ps)])
        else:
            self.allocator.free(own)
        if req.cache_node is not None:
            self.cache.dec_lock_ref(req.cache_node)
        if req.own_row:
            self.rows.free(req.row)
        req.reset_memory()

    # -- admission --------------------------------------------------------------------------
    def _bind(self, req: Request, ev: list[Event]) -> bool:
        """Give a waiting request its row and borrowed prefix (cache hit or session KV)."""
        if req.session_id is not None:
            slot = self.sessions.get(req.session_id)
            row = slot.row
            own_row = row is None
            if own_row:
                row = self.rows.alloc()
                if row is None:
                    return False
            self.sessions.restore_to_req(req.session_id, req.rid)
            req.row, req.own_row, req.session_lent = row, own_row, True
            req.indices = slot.indices.copy()
            req.session_alloc = slot.alloc_len
            req.kv_len = slot.kv_len
            if slot.kv_len:
                ev.append(SessionRestored(req.session_id, req.rid, slot.kv_len))
            return True
        row = self.rows.alloc()
        if row is None:
            return False
        fill = req.fill
        match = self.cache.match_prefix(req.adapter, fill[: len(fill) - 1])
        self.cache.inc_lock_ref(match.node)
        req.row, req.own_row = row, True
        req.cache_node = match.node
        req.indices = match.indices.copy()
        req.cache_len = req.kv_len = match.length
        if match.length:
            self.rows.write(row, 0, match.indices)
            ev.append(PrefixHit(req.rid, match.length, "cache"))
        return True

    def _fits_ever(self, req: Request) -> bool:
        ps = self.allocator.page_size
        need = len(req.history) + len(req.prompt) + req.max_new_tokens - 1
        return -(-need // ps) * ps <= self.allocator.size

    def schedule_prefill(self, ev: list[Event]) -> list[tuple[Request, int]]:
        """Choose and prepare this round's prefill batch: the staged chunk first, then FCFS
        waiting requests. Returns ``(request, chunk tokens)`` pairs for the forward.

        Not a dry run; it mutates the pools and queues to make the batch runnable: it
        allocates KV and ``req_to_token`` rows (evicting prefix-cache leaves), locks prefix
        nodes, restores session KV, starts or does adapter loads (evicting slots), updates
        drain marks and retracts drain victims, aborts requests that can never fit, moves
        admitted requests out of ``waiting`` and may stage a chunked one; events go to ``ev``.
        """
        budget = self.cfg.chunked_prefill_size
        self.round_loads = set()
        batch: list[tuple[Request, int]] = []
        adapters: set[str | None] = set()
        staged = self.staged
        if staged is not None:
            chunk = min(len(staged.fill) - staged.kv_len, budget)
            if not self.adapter_ready(staged.adapter) or not self._grow(staged, staged.kv_len + chunk, ev):
                return batch
            batch.append((staged, chunk))
            adapters.add(staged.adapter)
            budget -= chunk
            if staged.kv_len + chunk < len(staged.fill):
                return batch
        if self.drainer.enabled:
            ev.extend(self.drain_update(full=True))
            due = self.drainer.preempt_due()
            for adapter in due:
                for r in [r for r in self.running if r.adapter == adapter and self._drain_preemptible(r)]:
                    self.retract(r, ev, reason="drain")
            if due:  # a victim that stopped running has its mark cleared and its slot reserved now
                ev.extend(self.drain_update(full=True))
        for req in list(self.waiting):
            if budget <= 0 or len(self.running) + len(batch) >= self.cfg.max_running_requests:
                break
            if not self._fits_ever(req):
                self.waiting.remove(req)
                self.finish(req, "abort", "does not fit: needs more KV than max_total_tokens", ev)
                continue
            if self.drainer.enabled and not self.drainer.admits(req.adapter, req.max_new_tokens):
                continue
            if not self._admit_adapter(req.adapter, adapters, ev):
                continue
            bind_ev: list[Event] = []
            if not self._bind(req, bind_ev):
                break
            chunk = min(len(req.fill) - req.kv_len, budget)
            if not self._grow(req, req.kv_len + chunk, bind_ev):
                self.release(req, "retract", ev)
                ev.extend(e for e in bind_ev if isinstance(e, CacheEvicted))
                break
            ev.extend(bind_ev)
            if self.loader is not None and faults.on(self.cfg, "stale_overlap_event"):
                self.loader.reap_completed(only=(req.adapter,))  # the historic bug's only reaping
            self.waiting.remove(req)
            req.admitted_output, req.admitted_at = len(req.output), self.clock.now()
            ev.extend(self.drainer.end_reservation(req.adapter, "admitted"))
            batch.append((req, chunk))
            adapters.add(req.adapter)
            budget -= chunk
            if req.kv_len + chunk < len(req.fill):
                req.state = ReqState.PREFILLING
                self.staged = req
                break
        return batch

    def _running_all(self) -> list[Request]:
        return self.running + ([self.staged] if self.staged is not None else [])

    def drain_update(self, full: bool) -> list[Event]:
        """One drainer update from the queues; ``full``: may it mark new drains (slots full)?
        Mutates the drainer's marks and reservations; returns their events."""
        loading = self.loader.in_flight() if self.loader is not None else set()
        infos = self._infos(self.waiting), self._infos(self._running_all())
        return self.drainer.update(*infos, full and self._full(), loading)

    def _infos(self, reqs: list[Request]) -> list[ReqInfo]:
        return [
            ReqInfo(
                r.rid,
                r.adapter,
                r.queued_at if r.state is ReqState.WAITING else r.admitted_at,
                r.remaining,
                self._drain_preemptible(r),
            )
            for r in reqs
        ]

    def _drain_preemptible(self, r: Request) -> bool:
        """A drain may retract ``r``: decoding, a token produced since its last admission (so
        each preemption is progress), and under the per-request preemption budget."""
        return (
            r.state is ReqState.DECODING
            and len(r.output) > r.admitted_output
            and r.drain_retractions < self.cfg.lora_drain_max_preemptions
        )

    def _full(self) -> bool:
        return len(self.active_adapters() | self.drainer.reserved) >= self.cfg.max_loras_per_batch

    # -- decode -----------------------------------------------------------------------------
    def schedule_decode(self, ev: list[Event]) -> list[Request]:
        """Give every decoding request room for one more token; returns the decoders.
        Mutates: allocates KV, evicts prefix-cache leaves, retracts or aborts under pressure."""
        decoders = list(self.running)
        ps = self.allocator.page_size
        while decoders:
            short = [r for r in decoders if r.kv_len + 1 > r.alloc_len]
            need = len(short) * ps
            avail = self.allocator.available_size()
            if avail < need:
                freed = self.cache.evict(need - avail)
                if freed:
                    ev.append(CacheEvicted(freed))
                    avail = self.allocator.available_size()
            if avail >= need:
                for r in short:
                    self._grow(r, r.kv_len + 1, ev)
                return decoders
            if len(decoders) == 1 and self.staged is None:
                victim = decoders[0]
                self.running.remove(victim)
                self.finish(victim, "abort", "does not fit: no KV left for the next token", ev)
                return []
            if len(decoders) == 1:
                assert self.staged is not None  # the branch above took staged is None
                self.retract(self.staged, ev)
                continue
            victim = min(decoders, key=lambda r: (len(r.output), -len(r.prompt), -r.seq))
            decoders.remove(victim)
            self.retract(victim, ev)
        return decoders

    def retract(self, req: Request, ev: list[Event], reason: str = "kv") -> None:
        """Preempt ``req``: free all it holds; it re-queues and recomputes, output kept."""
        if req is self.staged:
            self.staged = None
        else:
            self.running.remove(req)
        self.release(req, "retract", ev)
        req.state = ReqState.WAITING
        req.retractions += 1
        req.drain_retractions += reason == "drain"
        req.queued_at = self.clock.now()
        self.waiting.append(req)
        self.waiting.sort(key=lambda r: r.seq)
        ev.append(Retracted(req.rid, len(req.output), reason))

    def stuck_staged(self, ev: list[Event]) -> bool:
        """Nothing runs and the staged chunk cannot grow: end it rather than stall."""
        if self.staged is None or self.running:
            return False
        req = self.staged
        self.staged = None
        self.finish(req, "abort", "does not fit: no KV left for the next chunk", ev)
        return True

    # -- endings ----------------------------------------------------------------------------
    def finish(self, req: Request, reason: str, detail: str, ev: list[Event]) -> None:
        self.release(req, "finish" if reason == "length" else "abort", ev)
        req.state = ReqState.FINISHED
        req.finish_reason, req.finish_detail = reason, detail
        req.finish_time = self.clock.now()
        ev.append(Finished(req.rid, reason, detail))

    def abort(self, req: Request, ev: list[Event]) -> None:
        if not req.state.live:
            raise RequestError(f"request {req.rid} already ended ({req.state.value}); nothing to abort")
        state = req.state
        if state is ReqState.WAITING:
            self.waiting.remove(req)
        elif state is ReqState.PREFILLING:
            self.staged = None
        else:
            self.running.remove(req)
        if state is ReqState.PREFILLING and faults.on(self.cfg, "abort_chunked_leaks_kv"):
            if req.session_lent and req.session_id is not None:
                self.sessions.release(req.session_id)
            req.reset_memory()
        else:
            self.release(req, "abort", ev)
        req.state = ReqState.ABORTED
        req.finish_reason, req.finish_time = "abort", self.clock.now()
        ev.append(Aborted(req.rid, state.value))
