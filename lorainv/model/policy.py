"""Policy checks: lorainv's documented scheduling and slot policies, computed from the
reference model's own state and the event stream (never from runtime code).

Safety invariants (docs/design.md §5) hold for any engine; these describe lorainv's engine and can be
switched off one by one (``ReferenceModel(cfg, policy=...)``) for an engine with another
policy. Each is exact for lorainv: where the events leave a fact open, the check assumes
the fact that excuses the engine, so a correct engine never fails one. Violations are in
pool ``"policy"``; the invariant is the check's name:

* ``eviction-victim``: a load goes to the lowest free slot; only when none is free does it
  evict, and the victim is the least recently used (``lru``: loaded or read by a batch) or
  earliest loaded (``fifo``) unpinned, unprotected occupant, ties by slot, the base model
  only when it is the sole candidate. Protected: adapters running or loading, the adapter
  being loaded, and in a Step also the reserved ones, this round's loads and its batch.
* ``fcfs``: newly admitted requests join a batch in queue order, after the staged chunk; a
  waiting request is passed over only if nothing after it is admitted in that round, or its
  adapter is neither the staged chunk's nor that of an admitted request, or its drain blocks
  it, or its adapter's load started or landed in that round (it may land mid-round).
* ``max-running``: at most ``max_running_requests`` requests prefill or decode.
* ``prefill-budget``: a round's chunks, in batch order, are each ``min(tokens left, budget
  left)`` of the ``chunked_prefill_size`` budget; an unfinished chunk ends the batch.
* ``retraction-victim``: under KV pressure the decoding request with the fewest outputs,
  then the longest prompt, then the latest arrival is retracted; the staged chunk only when
  one decoder is left; an abort instead only of the last decoder with nothing staged.
* ``retraction-pressure``: a request is retracted for KV only when the decoders' next
  tokens need more pages than are free (the prefix cache may free more, never less).
* ``drain-tolerance``: a draining adapter admits nothing under ``preempt``; under
  ``admission`` only requests with ``max_new_tokens <= lora_drain_tolerance`` x the longest
  remaining work of its running requests.
* ``drain-threshold``: a drain starts only when every slot is held by an active (running or
  loading) or reserved adapter, and only for an adapter one of whose waiting requests has
  waited longer than ``lora_drain_wait_threshold`` since it last entered the queue (arrival
  or retraction), on the clock of the ``AdvanceClock`` ops.
* ``drain-victim``: the adapter that drains is the running, unmarked one with the least
  demand (running plus waiting requests), under ``preempt`` a ripe one first (a quantum,
  ``lora_drain_quantum`` or else the wait threshold, since its oldest running request's
  admission, and a request a drain may retract), then
  the least remaining work, then the base model, then the name.
* ``no-thrash``: nothing loaded in an op is evicted in the same op (a load round).
* ``max-loras-per-batch``: a batch's adapters plus the running, loading and reserved ones
  fit in ``max_loras_per_batch`` slots (a reservation is the drainer's policy).

`Policy` is driven by the model: ``begin`` per op, the ``on_*`` hooks before the model
applies an event (they read, never mutate, the model), ``end`` after the op.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lorainv import events as E
from lorainv.errors import Violation

if TYPE_CHECKING:
    from lorainv.model.reference import ReferenceModel, Req

POLICY_CHECKS: tuple[str, ...] = (
    "eviction-victim",
    "fcfs",
    "max-running",
    "prefill-budget",
    "retraction-victim",
    "retraction-pressure",
    "drain-tolerance",
    "drain-threshold",
    "drain-victim",
    "no-thrash",
    "max-loras-per-batch",
)


@dataclass
class _Eviction:
    """An eviction that made room for a load, with what the model knew at that moment."""

    victim: Any
    slot: int
    resident: dict[Any, int]  # uid -> slot, the victim included
    order: dict[Any, int]
    protected: set[Any]
    loader: Any = None  # the adapter it made room for


@dataclass
class _Op:
    kind: str = ""
    loaded: set[Any] = field(default_factory=set)
    landed: set[Any] = field(default_factory=set)
    evictions: list[_Eviction] = field(default_factory=list)
    pending: _Eviction | None = None
    batch: set[Any] = field(default_factory=set)
    budget: int = 0
    open_chunk: bool = False


class Policy:
    """The enabled checks of `POLICY_CHECKS`; ``found`` collects this op's violations."""

    def __init__(self, model: ReferenceModel, enabled: frozenset[str] | None) -> None:
        unknown = set(enabled or ()) - set(POLICY_CHECKS)
        if unknown:
            raise ValueError(f"unknown policy checks {sorted(unknown)}; known: {list(POLICY_CHECKS)}")
        self.m = model
        self.on = frozenset(POLICY_CHECKS) if enabled is None else frozenset(enabled)
        self.op = _Op()
        self.found: list[Violation] = []

    def _bad(self, check: str, msg: str, *ids: Any) -> None:
        if check in self.on:
            self.found.append(Violation("policy", check, f"{self.op.kind}: {msg}", ids))

    def begin(self, kind: str) -> None:
        self.op, self.found = _Op(kind), []

    # -- slots --------------------------------------------------------------------------------
    def on_evicted(self, ev: E.Evicted) -> None:
        m = self.m
        if ev.adapter in self.op.loaded:
            self._bad("no-thrash", f"evicted {ev.adapter!r}, loaded in this same op", ev.adapter)
        order = m.s.used_at if m.cfg.lora_eviction_policy == "lru" else m.s.loaded_at
        protected = m.active_adapters() | self.op.loaded | m.s.pinned
        if self.op.kind == "Step":
            protected |= m.s.reserved
        self.op.pending = _Eviction(ev.adapter, ev.slot, m.resident(), dict(order), protected)
        if len(m.s.slots) < m.cfg.max_loras_per_batch:
            free = sorted(set(range(m.cfg.max_loras_per_batch)) - set(m.s.slots))
            if self.op.kind != "UnloadAdapter":
                self._bad("eviction-victim", f"evicted {ev.adapter!r} while slots {free} were free", ev.adapter)

    def on_load_started(self, ev: E.LoadStarted, prev: E.Event | None) -> None:
        m, ev_ = self.m, self.op.pending
        self.op.pending = None
        if isinstance(prev, E.Evicted) and ev_ is not None and prev.slot == ev.slot:
            ev_.loader = ev.adapter
            self.op.evictions.append(ev_)
        else:
            free = sorted(set(range(m.cfg.max_loras_per_batch)) - set(m.s.slots))
            if free and ev.slot != free[0]:
                self._bad("eviction-victim", f"loaded {ev.adapter!r} into slot {ev.slot}, not free {free[0]}", ev.slot)
        self.op.loaded.add(ev.adapter)

    def on_load_completed(self, ev: E.LoadCompleted) -> None:
        self.op.landed.add(ev.adapter)

    def _judge_eviction(self, e: _Eviction) -> None:
        protected = e.protected | {e.loader} | self.op.batch
        cands = [u for u in e.resident if u == e.victim or u not in protected]
        cands = [u for u in cands if u is not None] or cands
        want = min(cands, key=lambda u: (e.order.get(u, 0), e.resident[u]))
        if want != e.victim:
            why = f"{self.m.cfg.lora_eviction_policy} victim for {e.loader!r} is {want!r} (slot {e.resident[want]})"
            self._bad("eviction-victim", f"evicted {e.victim!r} from slot {e.slot}; the {why}", e.victim, want)

    # -- prefill rounds -----------------------------------------------------------------------
    def on_batch(self, ev: E.BatchFormed) -> None:
        m = self.m
        self.op.batch |= set(ev.adapters)
        need = set(ev.adapters) | m.active_adapters() | m.s.reserved
        if len(need) > m.cfg.max_loras_per_batch:
            self._bad("max-loras-per-batch", f"batch, running, loading and reserved adapters need {len(need)} slots")
        if ev.mode != "prefill":
            return
        self.op.budget, self.op.open_chunk = m.cfg.chunked_prefill_size, False
        reqs = [m.s.reqs.get(rid) for rid in ev.rids]
        if any(r is None for r in reqs):
            return  # the model refuses this batch
        fresh = [(rid, r) for rid, r in zip(ev.rids, reqs) if r is not None and r.state == "waiting"]
        staged = [rid for rid, r in zip(ev.rids, reqs) if r is not None and r.state == "prefilling"]
        if staged and ev.rids[0] != staged[0]:
            self._bad("fcfs", f"the staged chunk {staged[0]} is not first in the batch", staged[0])
        seqs = [r.seq for _, r in fresh]
        if seqs != sorted(seqs):
            self._bad("fcfs", f"admitted out of queue order: {[rid for rid, _ in fresh]}", *[rid for rid, _ in fresh])
        for rid, r in fresh:
            if self._blocked(r):
                self._bad("drain-tolerance", f"admitted {rid} although its adapter {r.adapter!r} drains", rid)
        self._passed_over(fresh, {m.s.reqs[s].adapter for s in staged})

    def on_drain_marked(self, ev: E.DrainMarked) -> None:
        m = self.m
        self._judge_drain_victim(ev)
        waits = [
            m.s.now - r.queued_at for r in m.s.reqs.values() if r.adapter == ev.for_adapter and r.state == "waiting"
        ]
        limit = float(m.cfg.lora_drain_wait_threshold)
        if not any(w > limit for w in waits):
            longest = max(waits, default=0.0)
            why = f"its longest wait is {longest:g} s, not over the threshold {limit:g} s"
            self._bad("drain-threshold", f"{ev.adapter!r} drains for {ev.for_adapter!r}, which does not starve: {why}")
        taken = m.active_adapters() | m.s.reserved
        if len(taken) < m.cfg.max_loras_per_batch:
            why = f"only {len(taken)} of {m.cfg.max_loras_per_batch} slots are held by active or reserved adapters"
            self._bad("drain-threshold", f"{ev.adapter!r} drains for {ev.for_adapter!r} with a slot to spare: {why}")

    def _judge_drain_victim(self, ev: E.DrainMarked) -> None:
        """The victim is the running, unmarked adapter with the least demand (its running plus
        waiting requests), then (``preempt``) a ripe one first (running a quantum since its
        oldest running request's admission, with a request a drain may retract), then the
        least remaining work, then the base model, then the name."""
        m = self.m
        running: dict[Any, list[Req]] = {}
        for r in m.s.reqs.values():
            if r.running:
                running.setdefault(r.adapter, []).append(r)
        free = [a for a in running if a not in m.s.marks]
        if ev.adapter not in free:
            return  # refinement refuses a mark on an adapter that does not run
        preempt = m.cfg.lora_drain_policy == "preempt"

        def key(a: Any) -> tuple[Any, ...]:
            rs = running[a]
            remaining = max(r.max_new - r.out for r in rs)
            name = (a is not None, a or "")
            if not preempt:
                return (remaining, name)
            waiting = sum(1 for r in m.s.reqs.values() if r.adapter == a and r.state == "waiting")
            since = min(r.admitted_at for r in rs)
            retractable = any(
                r.state == "decoding" and r.out > r.admit_out and r.drain_retracts < m.cfg.lora_drain_max_preemptions
                for r in rs
            )
            quantum = float(m.cfg.lora_drain_quantum) or float(m.cfg.lora_drain_wait_threshold)  # 0: the threshold
            ripe = m.s.now - since >= quantum and retractable
            return (len(rs) + waiting, not ripe, remaining, name)

        want = min(free, key=key)
        if key(want) != key(ev.adapter):
            self._bad("drain-victim", f"{ev.adapter!r} drains for {ev.for_adapter!r}; the rule picks {want!r}")

    def _blocked(self, r: Req) -> bool:
        """Does the drainer keep ``r`` out (its adapter drains, and the policy's rule says no)?"""
        m = self.m
        if r.adapter not in m.s.marks:
            return False
        if m.cfg.lora_drain_policy == "preempt":
            return True
        work = [x.max_new - x.out for x in m.s.reqs.values() if x.adapter == r.adapter and x.running]
        return r.max_new > float(m.cfg.lora_drain_tolerance) * max(work, default=0)

    def _passed_over(self, fresh: list[tuple[str, Req]], staged: set[Any]) -> None:
        if not fresh:
            return
        last = max(r.seq for _, r in fresh)
        for rid, w in self.m.s.reqs.items():
            if w.state != "waiting" or w.seq > last or any(rid == f for f, _ in fresh) or self._blocked(w):
                continue
            if w.adapter in self.op.loaded | self.op.landed:
                continue  # its load may have landed between w's turn and a later request's
            earlier = staged | {r.adapter for _, r in fresh if r.seq < w.seq}
            later = [f for f, r in fresh if r.seq > w.seq and r.adapter == w.adapter]
            if w.adapter in earlier or later:
                self._bad("fcfs", f"passed over {rid} (adapter {w.adapter!r}) yet admitted later requests", rid)

    def on_scheduled(self, ev: E.Scheduled, r: Req) -> None:
        if self.op.open_chunk:
            self._bad("prefill-budget", f"{ev.rid} scheduled after an unfinished chunk ended the batch", ev.rid)
        want = min(r.fill - r.kv, self.op.budget)
        if ev.chunk_tokens != want:
            left = f"{r.fill - r.kv} tokens left, budget {self.op.budget}"
            self._bad("prefill-budget", f"{ev.rid} got a chunk of {ev.chunk_tokens}, not {want} ({left})", ev.rid)
        self.op.budget -= ev.chunk_tokens
        self.op.open_chunk = r.kv + ev.chunk_tokens < r.fill

    # -- retraction ---------------------------------------------------------------------------
    def on_retracted(self, ev: E.Retracted, r: Req) -> None:
        if ev.reason != "kv":
            return
        decoders = {rid: x for rid, x in self.m.s.reqs.items() if x.state == "decoding"}
        ps = self.m.ps
        need = ps * sum(1 for x in decoders.values() if x.kv % ps == 0)  # decoders whose next token needs a page
        free = self.m.expected_available()
        if need <= free:
            why = f"{need} tokens needed for the decoders' next pages, {free} free"
            self._bad("retraction-pressure", f"retracted {ev.rid} with KV to spare ({why})", ev.rid)
        if r.state == "prefilling":
            if len(decoders) != 1:
                self._bad("retraction-victim", f"retracted the staged {ev.rid} with {len(decoders)} decoders", ev.rid)
            return
        if len(decoders) < 2:
            self._bad("retraction-victim", f"retracted the last decoder {ev.rid}", ev.rid)
            return
        want = min(decoders, key=lambda rid: (decoders[rid].out, -decoders[rid].prompt_len, -decoders[rid].seq))
        if want != ev.rid:
            self._bad("retraction-victim", f"retracted {ev.rid}; the rule picks {want}", ev.rid, want)

    def on_finished(self, ev: E.Finished, r: Req) -> None:
        """A Step aborts a running request only when nothing else runs: the last decoder with
        nothing staged (no KV for its next token), or the staged chunk with no decoder."""
        if ev.reason != "abort" or not r.running or self.op.kind != "Step":
            return
        others = [rid for rid, x in self.m.s.reqs.items() if x.running and rid != ev.rid]
        if others:
            self._bad("retraction-victim", f"aborted {r.state} {ev.rid} instead of retracting; {others} run", ev.rid)

    # -- end of op ----------------------------------------------------------------------------
    def end(self) -> list[Violation]:
        for e in self.op.evictions:
            self._judge_eviction(e)
        running = [rid for rid, r in self.m.s.reqs.items() if r.running]
        if len(running) > self.m.cfg.max_running_requests:
            n = self.m.cfg.max_running_requests
            self._bad("max-running", f"{len(running)} requests prefill or decode > max_running_requests={n}", *running)
        return self.found
