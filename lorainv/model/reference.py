"""The reference model: an abstract state machine that validates every event the runtime
reports and predicts what every pool must hold. Pure Python; it imports no torch.

Three layers, each with its own violations:

* refinement (pool ``model``): each reported event must be *allowed* in the current
  abstract state (trace validation, as in TLA+), then the state is updated. An event kind
  without an ``_on_`` handler is a violation (``unhandled-event``).
* obligations (pool ``obligation``, `lorainv.model.obligations`): before the events are
  read, the model predicts accept or reject, the error class and the immediate effect.
* policy (pool ``policy``, `lorainv.model.policy`): lorainv's documented choices (victims,
  admission order, budgets), each switchable off.

Memory it derives on its own: a running request holds ``pages(kv) * page_size`` tokens
minus what it borrows from the prefix cache; a session holds ``pages(kv)`` pages of its
last turn; a retracted, finished or aborted request holds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lorainv import events as E
from lorainv.config import RuntimeConfig
from lorainv.errors import Violation
from lorainv.model.obligations import judge, predict
from lorainv.model.policy import POLICY_CHECKS, Policy
from lorainv.ops import Op

LIVE = ("waiting", "prefilling", "decoding")


@dataclass
class Req:
    adapter: str | None
    session: str | None
    fill: int  # history + prompt + output
    max_new: int
    state: str = "waiting"
    kv: int = 0
    cached: int = 0  # tokens borrowed from the prefix cache
    out: int = 0
    admit_out: int = 0  # outputs when last admitted (a drain may retract only after progress)
    drain_retracts: int = 0
    prompt_len: int = 0
    seq: int = 0  # arrival order (the order of `Queued` events)
    queued_at: float = 0.0  # the clock when it last entered the queue (`Queued` or `Retracted`)
    admitted_at: float = 0.0  # the clock when it was last admitted (its first chunk scheduled)
    end_no: int = 0  # 1, 2, ... in the order requests ended; 0 while live

    @property
    def live(self) -> bool:
        return self.state in LIVE

    @property
    def running(self) -> bool:
        """Holds KV and a place in the running set: prefilling (the staged chunk) or decoding."""
        return self.state in ("prefilling", "decoding")


@dataclass
class Session:
    kv: int = 0  # committed KV tokens of the last finished turn
    fill: int = 0  # tokens of the last finished turn (history for the next)
    adapter: str | None = None
    active: str | None = None


@dataclass
class ModelState:
    reqs: dict[str, Req] = field(default_factory=dict)  # live and retained ended requests
    used: set[str] = field(default_factory=set)  # every request id ever queued
    registered: dict[str, int] = field(default_factory=dict)
    pinned: set[str] = field(default_factory=set)
    slots: dict[int, Any] = field(default_factory=dict)  # slot -> uid (occupied slots)
    loading: set[Any] = field(default_factory=set)
    sessions: dict[str, Session] = field(default_factory=dict)
    marks: dict[Any, Any] = field(default_factory=dict)
    reserved: set[Any] = field(default_factory=set)
    cache_tokens: int = 0
    now: float = 0.0  # the simulated clock
    ends: int = 0  # requests ended so far (the last `end_no` handed out)
    tick: int = 0  # logical time of slot use: a load or a batch
    used_at: dict[Any, int] = field(default_factory=dict)  # resident uid -> tick of its load or last batch
    loaded_at: dict[Any, int] = field(default_factory=dict)  # resident uid -> tick of its load
    load_failures: dict[Any, int] = field(default_factory=dict)  # uid -> failed loads since its last landed one
    failures_injected: int = 0  # the sum of n over accepted FailTransfers(n) ops


class ModelError(Exception):
    """Raised internally when an event is not allowed; turned into a `Violation`."""


class ReferenceModel:
    """``observe(op, events)`` validates and applies; ``violations`` collects what was refused.

    ``vocab_size`` / ``max_context_len``: the network's, for the token-range and context
    obligations of ``AddRequest`` (None: those outcomes are left open). ``policy``: the names
    of `POLICY_CHECKS` to run (None: all; ``frozenset()``: none).
    """

    def __init__(
        self,
        config: RuntimeConfig,
        *,
        vocab_size: int | None = None,
        max_context_len: int | None = None,
        policy: frozenset[str] | None = None,
    ) -> None:
        self.cfg = config
        self.ps = config.page_size
        self.vocab_size = vocab_size
        self.max_context_len = max_context_len
        self.s = ModelState()
        self.violations: list[Violation] = []
        self.policy = Policy(self, policy)
        self._batch: set[str] = set()
        self._cleared: dict[Any, Any] = {}  # this op's cleared marks: starving adapter -> victim
        self._prev: E.Event | None = None
        self._label = ""  # the op being observed
        self._exhausted: set[Any] = set()  # adapters whose load retries ran out in this op

    # -- predictions --------------------------------------------------------------------------
    def pages(self, tokens: int) -> int:
        return -(-tokens // self.ps) * self.ps

    def held(self, rid: str) -> int:
        r = self.s.reqs[rid]
        return self.pages(r.kv) - r.cached if r.state in ("prefilling", "decoding") else 0

    def session_held(self) -> int:
        return sum(self.pages(x.kv) for x in self.s.sessions.values() if x.active is None)

    def live(self) -> set[str]:
        return {rid for rid, r in self.s.reqs.items() if r.state in LIVE}

    def active_adapters(self) -> set[Any]:
        """Adapters that must keep their slot: those of running requests and loads in flight."""
        return self._running() | self.s.loading

    def resident(self) -> dict[Any, int]:
        return {uid: slot for slot, uid in self.s.slots.items()}

    def expected_available(self) -> int:
        held = sum(self.held(rid) for rid in self.live())
        return self.cfg.max_total_tokens - self.s.cache_tokens - self.session_held() - held

    # -- observation ----------------------------------------------------------------------------
    def observe(self, op: Op, events: list[E.Event]) -> list[Violation]:
        """Predict ``op``'s obligations, then validate and apply ``events`` (caused by
        ``op``) and run the policy checks; returns the new violations (mutates the model)."""
        want = predict(self, op)
        self.policy.begin(op.kind)
        new = self._apply(op.kind, events)
        if op.kind == "FailTransfers" and want.verdict == "accept" and not any(e.kind == "Rejected" for e in events):
            self.s.failures_injected += op.n  # type: ignore[attr-defined]
        new += judge(op, want, events)
        new += self.policy.end()
        self.violations.extend(new)
        return new

    def observe_events(self, events: list[E.Event], label: str = "events") -> list[Violation]:
        """Validate and apply ``events`` with no op: refinement only, no obligations and no
        policy (for hand-made streams and targets that report events without ops)."""
        self.policy.begin(label)
        on, self.policy.on = self.policy.on, frozenset()
        try:
            new = self._apply(label, events)
        finally:
            self.policy.on = on
        self.violations.extend(new)
        return new

    def _apply(self, label: str, events: list[E.Event]) -> list[Violation]:
        new: list[Violation] = []
        self._batch, self._cleared, self._prev = set(), {}, None
        self._label, self._exhausted = label, set()
        for ev in events:
            handler = getattr(self, f"_on_{ev.kind}", None)
            if handler is None:
                new.append(Violation("model", "unhandled-event", f"{label}: no rule for event {ev}", (ev.kind,)))
                break
            try:
                handler(ev)
            except ModelError as e:
                # later events of this op are consequences of the refused one: report the first
                new.append(Violation("model", "refinement", f"{label}: {ev} not allowed: {e}", _ids(ev)))
                break
            self._prev = ev
        else:
            new += self._exhausted_still_wait(label)
        self._retire()
        return new

    def _exhausted_still_wait(self, label: str) -> list[Violation]:
        """Past ``max_load_retries`` failed loads, every waiting request of the adapter ends in
        that op (aborted)."""
        left = [rid for rid, r in self.s.reqs.items() if r.state == "waiting" and r.adapter in self._exhausted]
        if not left:
            return []
        why = f"load retries of {sorted(self._exhausted, key=repr)} are exhausted, yet {left} still wait"
        return [Violation("model", "refinement", f"{label}: {why}", tuple(left))]

    def _abort_justified(self, r: Req) -> str | None:
        """Why the engine may end waiting ``r`` with ``reason="abort"`` unasked (no ``Abort``
        op), or None. Reasons: it can never fit in the pool; its adapter's load retries were
        exhausted in this op; or, in a ``Step`` with nothing running or loading (a stall), it
        cannot be admitted: its tokens exceed the free plus cached KV, or no slot can be had
        (none free, every occupant pinned, or the drainer's reservations fill the rest)."""
        if self._never_fits(r):
            return "never fits"
        if r.adapter in self._exhausted:
            return "load retries exhausted"
        if self._label != "Step" or self.s.loading or any(x.running for x in self.s.reqs.values()):
            return None
        if self.pages(r.fill) > self.expected_available() + self.s.cache_tokens:
            return "stall: KV"
        if self._ready(r.adapter):
            return None
        slots = self.cfg.max_loras_per_batch
        free = len(self.s.slots) < slots
        evictable = [u for u in self.resident() if u not in self.s.pinned and u not in self.s.reserved]
        if len(self.s.reserved | {r.adapter}) > slots or not (free or evictable):
            return "stall: slots"
        return None

    def _never_fits(self, r: Req) -> bool:
        """``r`` at its longest (every token it may still emit but the last, whose KV is never
        written) needs more KV than the whole pool."""
        return self.pages(r.fill - r.out + r.max_new - 1) > self.cfg.max_total_tokens

    def _retire(self) -> None:
        """Forget ended requests beyond ``max_finished_requests``: an ended request is kept
        while fewer than ``limit`` requests ended after it (``end_no`` counts endings)."""
        limit = self.cfg.max_finished_requests
        if limit > 0:
            gone = [rid for rid, r in self.s.reqs.items() if 0 < r.end_no <= self.s.ends - limit]
            for rid in gone:
                del self.s.reqs[rid]

    def _req(self, rid: str, *states: str) -> Req:
        r = self.s.reqs.get(rid)
        if r is None:
            raise ModelError(f"unknown request {rid}")
        if states and r.state not in states:
            raise ModelError(f"{rid} is {r.state}, expected {'/'.join(states)}")
        return r

    def _ready(self, uid: Any) -> bool:
        return uid in self.resident() and uid not in self.s.loading

    def _running(self) -> set[Any]:
        return {r.adapter for r in self.s.reqs.values() if r.running}

    def _census(self, uid: Any) -> set[str]:
        """The states of ``uid``'s live requests."""
        return {r.state for r in self.s.reqs.values() if r.adapter == uid and r.live}

    def _waits(self, uid: Any) -> bool:
        return "waiting" in self._census(uid)

    def _hungry(self, uid: Any) -> bool:
        """Starving: its live requests all wait (at least one does) and it has no load in flight."""
        return self._census(uid) == {"waiting"} and uid not in self.s.loading

    def _check_slots(self, adapters: set[Any], what: str) -> None:
        """A batch's adapters plus the running and loading ones fit in the slots (L2)."""
        need = adapters | self.active_adapters()
        if len(need) > self.cfg.max_loras_per_batch:
            raise ModelError(f"{what} needs {len(need)} slots")

    def _on_Queued(self, ev: E.Queued) -> None:
        if ev.rid in self.s.used:
            raise ModelError("request id reused")
        hist = 0
        if ev.session_id is not None:
            sess = self.s.sessions.get(ev.session_id)
            if sess is None:
                raise ModelError(f"session {ev.session_id} is not open")
            turns = [rid for rid, r in self.s.reqs.items() if r.session == ev.session_id and r.state in LIVE]
            if turns:
                raise ModelError(f"session {ev.session_id} already has a live turn {turns[0]}")
            hist = sess.fill
        if ev.adapter is not None and ev.adapter not in self.s.registered:
            raise ModelError(f"adapter {ev.adapter} is not registered")
        seq = len(self.s.used)
        self.s.reqs[ev.rid] = Req(ev.adapter, ev.session_id, hist + ev.prompt_len, ev.max_new_tokens)
        self.s.reqs[ev.rid].prompt_len, self.s.reqs[ev.rid].seq = ev.prompt_len, seq
        self.s.reqs[ev.rid].queued_at = self.s.now
        self.s.used.add(ev.rid)

    def _on_PrefixHit(self, ev: E.PrefixHit) -> None:
        r = self._req(ev.rid, "waiting")
        if ev.source != "cache" or ev.tokens % self.ps or ev.tokens >= r.fill:
            raise ModelError(f"bad cache hit of {ev.tokens} tokens for fill {r.fill}")
        if ev.tokens > self.s.cache_tokens:
            raise ModelError("hit larger than the cache")
        r.kv = r.cached = ev.tokens

    def _on_SessionRestored(self, ev: E.SessionRestored) -> None:
        r = self._req(ev.rid, "waiting")
        sess = self.s.sessions.get(ev.session_id)
        if sess is None or r.session != ev.session_id or sess.kv != ev.tokens:
            raise ModelError(f"session {ev.session_id} cannot lend {ev.tokens} tokens to {ev.rid}")
        r.kv = ev.tokens
        self.s.sessions[ev.session_id].active = ev.rid

    def _on_BatchFormed(self, ev: E.BatchFormed) -> None:
        if len(set(ev.adapters)) > self.cfg.max_loras_per_batch:
            raise ModelError(f"{len(set(ev.adapters))} adapters in a batch > {self.cfg.max_loras_per_batch} slots")
        runs = sum(1 for i, a in enumerate(ev.adapters) if i == 0 or ev.adapters[i - 1] != a)
        if ev.num_segments != runs:
            raise ModelError(f"{ev.num_segments} LoRA segments for {runs} runs of consecutive adapters")
        want = ("decoding",) if ev.mode == "decode" else ("waiting", "prefilling")
        for rid, uid in zip(ev.rids, ev.adapters):
            r = self._req(rid, *want)
            if r.adapter != uid:
                raise ModelError(f"{rid} ran on {uid!r}, not its adapter {r.adapter!r}")
            if not self._ready(uid):
                raise ModelError(f"{rid} scheduled on adapter {uid!r} that is not loaded and waited on")
        self._check_slots(set(ev.adapters), "the batch")
        self.policy.on_batch(ev)
        self._batch = set(ev.rids)
        self.s.tick += 1
        for uid in set(ev.adapters):
            self.s.used_at[uid] = self.s.tick
        if ev.mode == "decode":
            for rid in ev.rids:
                self.s.reqs[rid].kv += 1

    def _on_Scheduled(self, ev: E.Scheduled) -> None:
        r = self._req(ev.rid, "waiting", "prefilling")
        if ev.rid not in self._batch or ev.chunk_tokens < 1 or ev.chunk_tokens > self.cfg.chunked_prefill_size:
            raise ModelError(f"chunk of {ev.chunk_tokens} outside a batch or over chunked_prefill_size")
        self.policy.on_scheduled(ev, r)
        if r.state == "waiting":
            if self._never_fits(r):
                raise ModelError(f"admitted {ev.rid}, which can never fit in {self.cfg.max_total_tokens} tokens")
            r.admit_out, r.admitted_at = r.out, self.s.now
            if r.session is not None:
                if r.session not in self.s.sessions:
                    raise ModelError(f"session {r.session} is not open")
                self.s.sessions[r.session].active = ev.rid
        r.kv += ev.chunk_tokens
        if r.kv > r.fill or ev.done != (r.kv == r.fill):
            raise ModelError(f"chunk reaches {r.kv} of {r.fill} tokens but done={ev.done}")
        r.state = "decoding" if ev.done else "prefilling"

    def _on_Decoded(self, ev: E.Decoded) -> None:
        r = self._req(ev.rid, "decoding")
        if ev.rid not in self._batch or r.out >= r.max_new:
            raise ModelError("token outside the batch or past max_new_tokens")
        r.out += 1
        r.fill += 1

    def _end(self, rid: str, state: str) -> None:
        r = self.s.reqs[rid]
        sess = self.s.sessions.get(r.session) if r.session is not None else None
        if sess is not None and sess.active == rid:
            sess.active = None
        r.state, r.kv, r.cached = state, 0, 0
        if state != "waiting":
            self.s.ends += 1
            r.end_no = self.s.ends

    def _on_Retracted(self, ev: E.Retracted) -> None:
        r = self._req(ev.rid, "prefilling", "decoding")
        if ev.output_len != r.out:
            raise ModelError(f"retracted with {ev.output_len} outputs, model has {r.out}")
        if ev.reason == "drain":
            if self.cfg.lora_drain_policy != "preempt" or r.adapter not in self.s.marks:
                raise ModelError(f"drain retraction of {ev.rid}: its adapter {r.adapter!r} does not drain")
            if r.state != "decoding" or r.out <= r.admit_out:
                raise ModelError(f"drain retraction of {ev.rid} before it produced a token since admission")
            if r.drain_retracts >= self.cfg.lora_drain_max_preemptions:
                raise ModelError(f"{ev.rid} drain-retracted more than {self.cfg.lora_drain_max_preemptions} times")
            r.drain_retracts += 1
        elif ev.reason != "kv":
            raise ModelError(f"unknown retraction reason {ev.reason!r}")
        self.policy.on_retracted(ev, r)
        self._end(ev.rid, "waiting")
        r.queued_at = self.s.now

    def _on_Finished(self, ev: E.Finished) -> None:
        r = self._req(ev.rid, *LIVE)
        if ev.reason == "length" and r.out != r.max_new:
            raise ModelError(f"finished by length with {r.out} of {r.max_new} tokens")
        if ev.reason not in ("length", "abort"):
            raise ModelError(f"unknown finish reason {ev.reason!r}")
        if ev.reason == "abort" and r.state == "waiting" and self._abort_justified(r) is None:
            need, room = self.pages(r.fill), self.expected_available() + self.s.cache_tokens
            raise ModelError(
                f"aborted waiting {ev.rid} unasked, yet it fits ({need} tokens; {room} free or cached), "
                f"no load of {r.adapter!r} ran out of retries, and a slot can be had"
            )
        self.policy.on_finished(ev, r)
        self._end(ev.rid, "finished")

    def _on_SessionSaved(self, ev: E.SessionSaved) -> None:
        r = self._req(ev.rid, "decoding")
        sess = self.s.sessions.get(ev.session_id)
        if sess is None or r.session != ev.session_id or ev.tokens != r.kv:
            raise ModelError(f"session {ev.session_id} cannot take {ev.tokens} tokens from {ev.rid}")
        sess.kv, sess.fill, sess.adapter, sess.active = r.kv, r.fill, r.adapter, None

    def _on_CacheInserted(self, ev: E.CacheInserted) -> None:
        r = self._req(ev.rid, "decoding")
        if ev.tokens % self.ps or not 0 < ev.tokens <= r.kv - r.cached:
            raise ModelError(f"inserted {ev.tokens} tokens; the request had {r.kv - r.cached} of its own")
        self.s.cache_tokens += ev.tokens

    def _on_CacheEvicted(self, ev: E.CacheEvicted) -> None:
        if ev.tokens > self.s.cache_tokens:
            raise ModelError(f"evicted {ev.tokens} tokens from a cache of {self.s.cache_tokens}")
        self.s.cache_tokens -= ev.tokens

    def _on_Aborted(self, ev: E.Aborted) -> None:
        r = self._req(ev.rid, *LIVE)
        if ev.state != r.state:
            raise ModelError(f"aborted in state {ev.state}, model has {r.state}")
        self._end(ev.rid, "aborted")

    # -- adapters -------------------------------------------------------------------------------
    def _on_AdapterRegistered(self, ev: E.AdapterRegistered) -> None:
        if ev.name in self.s.registered or not 0 < ev.rank <= self.cfg.max_lora_rank:
            raise ModelError(f"adapter {ev.name} registered twice or with rank {ev.rank}")
        self.s.registered[ev.name] = ev.rank

    def _on_AdapterUnregistered(self, ev: E.AdapterUnregistered) -> None:
        if any(r.adapter == ev.name for r in self.s.reqs.values() if r.state in LIVE):
            raise ModelError(f"adapter {ev.name} unregistered while live requests use it")
        if ev.name in self.resident() or ev.name in self.s.pinned:
            raise ModelError(f"adapter {ev.name} unregistered while resident or pinned")
        self.s.registered.pop(ev.name, None)

    def _on_Pinned(self, ev: E.Pinned) -> None:
        if ev.name not in self.resident() or len(self.s.pinned | {ev.name}) > self.cfg.max_loras_per_batch - 1:
            raise ModelError(f"pin of {ev.name}: not resident or more than P-1 pins")
        self.s.pinned.add(ev.name)

    def _on_Unpinned(self, ev: E.Unpinned) -> None:
        if ev.name not in self.s.pinned:
            raise ModelError(f"unpin of {ev.name}, which is not pinned")
        self.s.pinned.discard(ev.name)

    def _on_LoadStarted(self, ev: E.LoadStarted) -> None:
        if not 0 <= ev.slot < self.cfg.max_loras_per_batch or ev.slot in self.s.slots:
            raise ModelError(f"load into slot {ev.slot} that is occupied or out of range")
        if ev.adapter in self.resident() or (ev.adapter is not None and ev.adapter not in self.s.registered):
            raise ModelError(f"load of {ev.adapter!r}: already resident or not registered")
        self.policy.on_load_started(ev, self._prev)
        self.s.slots[ev.slot] = ev.adapter
        self.s.loading.add(ev.adapter)
        self.s.tick += 1
        self.s.used_at[ev.adapter] = self.s.loaded_at[ev.adapter] = self.s.tick

    def _on_LoadCompleted(self, ev: E.LoadCompleted) -> None:
        if self.s.slots.get(ev.slot, object()) != ev.adapter or ev.adapter not in self.s.loading:
            raise ModelError(f"{ev.adapter!r} was not loading into slot {ev.slot}")
        self.policy.on_load_completed(ev)
        self.s.loading.discard(ev.adapter)
        self.s.load_failures.pop(ev.adapter, None)

    def _on_LoadFailed(self, ev: E.LoadFailed) -> None:
        if self.s.slots.get(ev.slot, object()) != ev.adapter or ev.adapter not in self.s.loading:
            raise ModelError(f"{ev.adapter!r} was not loading into slot {ev.slot}")
        self.s.loading.discard(ev.adapter)
        self._unmap(ev.slot)
        n = self.s.load_failures[ev.adapter] = self.s.load_failures.get(ev.adapter, 0) + 1
        if n > self.cfg.max_load_retries:
            self.s.load_failures[ev.adapter] = 0
            self._exhausted.add(ev.adapter)

    def _unmap(self, slot: int) -> None:
        uid = self.s.slots.pop(slot)
        self.s.used_at.pop(uid, None)
        self.s.loaded_at.pop(uid, None)
        self.s.pinned.discard(uid)

    def _on_Evicted(self, ev: E.Evicted) -> None:
        if self.s.slots.get(ev.slot, object()) != ev.adapter:
            raise ModelError(f"{ev.adapter!r} is not in slot {ev.slot}")
        if ev.adapter in self.s.pinned:
            raise ModelError(f"evicted pinned adapter {ev.adapter!r}")
        users = [rid for rid, r in self.s.reqs.items() if r.adapter == ev.adapter and r.state != "waiting"]
        users = [rid for rid in users if self.s.reqs[rid].state in LIVE]
        if users or ev.adapter in self.s.loading:
            raise ModelError(f"evicted {ev.adapter!r} while running requests {users} use it or it loads")
        self.policy.on_evicted(ev)
        self._unmap(ev.slot)

    def _on_DrainMarked(self, ev: E.DrainMarked) -> None:
        if ev.adapter not in self._running() or ev.adapter in self.s.marks or ev.for_adapter in self.s.marks.values():
            raise ModelError(f"drain mark on {ev.adapter!r}: not running, or already draining / drained for")
        if not self._hungry(ev.for_adapter) or ev.for_adapter in self.s.reserved:
            raise ModelError(f"drain for {ev.for_adapter!r}, which does not starve (or has a slot reserved)")
        if self.cfg.lora_drain_policy == "preempt" and (self.s.marks or self.s.reserved):
            raise ModelError("a second drain while one is in progress (preempt policy: one at a time)")
        self.policy.on_drain_marked(ev)
        self.s.marks[ev.adapter] = ev.for_adapter

    def _on_DrainCleared(self, ev: E.DrainCleared) -> None:
        if ev.adapter not in self.s.marks:
            raise ModelError(f"{ev.adapter!r} was not draining")
        self._cleared[self.s.marks.pop(ev.adapter)] = ev.adapter

    def _on_SlotReserved(self, ev: E.SlotReserved) -> None:
        victim = self._cleared.get(ev.adapter, "none")
        if victim == "none" or victim in self._running():
            raise ModelError(f"slot reserved for {ev.adapter!r} without a drain that freed one")
        if not self._hungry(ev.adapter) or ev.adapter in self.s.reserved:
            raise ModelError(f"slot reserved for {ev.adapter!r}, which does not starve or has one")
        self.s.reserved.add(ev.adapter)

    def _on_ReservationEnded(self, ev: E.ReservationEnded) -> None:
        if ev.adapter not in self.s.reserved or ev.reason not in ("admitted", "gone"):
            raise ModelError(f"reservation of {ev.adapter!r} ended ({ev.reason}) but it had none")
        if ev.reason == "gone" and self._waits(ev.adapter):
            raise ModelError(f"reservation of {ev.adapter!r} ended as gone while its requests wait")
        self.s.reserved.discard(ev.adapter)

    # -- op outcomes, transfers, clock -------------------------------------------------------------
    def _on_Rejected(self, ev: E.Rejected) -> None:
        """A refusal changes nothing; whether the op deserved it is an obligation (`judge`)."""

    def _on_TransfersCompleted(self, ev: E.TransfersCompleted) -> None:
        if ev.completed < 0 or ev.failed < 0:
            raise ModelError(f"negative transfer counts {ev.completed}, {ev.failed}")

    def _on_ClockAdvanced(self, ev: E.ClockAdvanced) -> None:
        if not ev.now >= self.s.now:
            raise ModelError(f"the clock went from {self.s.now} back to {ev.now}")
        self.s.now = ev.now

    def _on_Idle(self, ev: E.Idle) -> None:
        """Nothing happened; a Step that did something must not say so (`judge`)."""

    # -- sessions ---------------------------------------------------------------------------------
    def _on_SessionOpened(self, ev: E.SessionOpened) -> None:
        if ev.session_id in self.s.sessions:
            raise ModelError(f"session {ev.session_id} opened twice")
        self.s.sessions[ev.session_id] = Session()

    def _on_SessionClosed(self, ev: E.SessionClosed) -> None:
        sess = self.s.sessions.pop(ev.session_id, None)
        if sess is None or sess.active is not None:
            raise ModelError(f"session {ev.session_id} closed while unknown or lent")
        turns = [rid for rid, r in self.s.reqs.items() if r.session == ev.session_id and r.state in LIVE]
        if turns:
            raise ModelError(f"session {ev.session_id} has a live turn {turns[0]}")
        if ev.freed_tokens != self.pages(sess.kv):
            raise ModelError(f"session {ev.session_id} freed {ev.freed_tokens}, held {self.pages(sess.kv)}")


def _ids(ev: E.Event) -> tuple[Any, ...]:
    for name in ("rid", "adapter", "name", "session_id"):
        if hasattr(ev, name):
            return (getattr(ev, name),)
    return ()


__all__ = ["POLICY_CHECKS", "ModelError", "ModelState", "ReferenceModel", "Req", "Session"]
