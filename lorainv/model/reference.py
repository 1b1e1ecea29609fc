"""The reference model: an abstract state machine that validates every event the runtime
reports and predicts what every pool must hold. Pure Python; it imports no torch.

It does not re-implement the scheduling policy. It checks that each reported choice is
*allowed* in the current abstract state (trace validation, as in TLA+), then updates that
state. Memory it derives on its own: a running request holds ``pages(kv) * page_size``
tokens minus what it borrows from the prefix cache; a session holds ``pages(kv)`` pages
of its last turn; a retracted, finished or aborted request holds nothing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from lorainv import events as E
from lorainv.config import RuntimeConfig
from lorainv.errors import Violation
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
    ended: deque[str] = field(default_factory=deque)  # retained ended requests, oldest first
    registered: dict[str, int] = field(default_factory=dict)
    pinned: set[str] = field(default_factory=set)
    slots: dict[int, Any] = field(default_factory=dict)  # slot -> uid (occupied slots)
    loading: set[Any] = field(default_factory=set)
    sessions: dict[str, Session] = field(default_factory=dict)
    marks: dict[Any, Any] = field(default_factory=dict)
    reserved: set[Any] = field(default_factory=set)
    cache_tokens: int = 0


class ModelError(Exception):
    """Raised internally when an event is not allowed; turned into a `Violation`."""


class ReferenceModel:
    """``observe(op, events)`` validates and applies; ``violations`` collects what was refused."""

    def __init__(self, config: RuntimeConfig) -> None:
        self.cfg = config
        self.ps = config.page_size
        self.s = ModelState()
        self.violations: list[Violation] = []
        self._batch: set[str] = set()
        self._cleared: dict[Any, Any] = {}  # this op's cleared marks: starving adapter -> victim

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

    def resident(self) -> dict[Any, int]:
        return {uid: slot for slot, uid in self.s.slots.items()}

    def expected_available(self) -> int:
        held = sum(self.held(rid) for rid in self.live())
        return self.cfg.max_total_tokens - self.s.cache_tokens - self.session_held() - held

    # -- observation ----------------------------------------------------------------------------
    def observe(self, op: Op, events: list[E.Event]) -> list[Violation]:
        """Validate and apply ``events`` (caused by ``op``); returns the new violations."""
        new: list[Violation] = []
        self._batch, self._cleared = set(), {}
        for ev in events:
            try:
                handler = getattr(self, f"_on_{ev.kind}", None)
                if handler is not None:
                    handler(ev)
            except ModelError as e:
                # later events of this op are consequences of the refused one: report the first
                new.append(Violation("model", "refinement", f"{op.kind}: {ev} not allowed: {e}", _ids(ev)))
                break
        self._retire(events)
        self.violations.extend(new)
        return new

    def _retire(self, events: list[E.Event]) -> None:
        """Forget ended requests beyond ``max_finished_requests``, oldest first, as the engine does."""
        limit = self.cfg.max_finished_requests
        if limit <= 0:
            return
        self.s.ended.extend(e.rid for e in events if isinstance(e, (E.Finished, E.Aborted)))
        while len(self.s.ended) > limit:
            self.s.reqs.pop(self.s.ended.popleft(), None)

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
        return {r.adapter for r in self.s.reqs.values() if r.state in ("prefilling", "decoding")}

    def _waits(self, uid: Any) -> bool:
        return any(r.adapter == uid and r.state == "waiting" for r in self.s.reqs.values())

    def _hungry(self, uid: Any) -> bool:
        """Starving candidate: something of it waits, and it neither runs nor loads."""
        return self._waits(uid) and uid not in self._running() and uid not in self.s.loading

    def _check_slots(self, adapters: set[Any], what: str) -> None:
        """Active adapters plus pending reservations never exceed the slots (L11)."""
        need = adapters | self._running() | self.s.loading | self.s.reserved
        if len(need) > self.cfg.max_loras_per_batch:
            raise ModelError(f"{what} needs {len(need)} slots (reserved {sorted(self.s.reserved, key=repr)})")

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
        self.s.reqs[ev.rid] = Req(ev.adapter, ev.session_id, hist + ev.prompt_len, ev.max_new_tokens)
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
        self._batch = set(ev.rids)
        if ev.mode == "decode":
            for rid in ev.rids:
                self.s.reqs[rid].kv += 1

    def _on_Scheduled(self, ev: E.Scheduled) -> None:
        r = self._req(ev.rid, "waiting", "prefilling")
        if ev.rid not in self._batch or ev.chunk_tokens < 1 or ev.chunk_tokens > self.cfg.chunked_prefill_size:
            raise ModelError(f"chunk of {ev.chunk_tokens} outside a batch or over chunked_prefill_size")
        if r.state == "waiting":
            r.admit_out = r.out
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
        self._end(ev.rid, "waiting")

    def _on_Finished(self, ev: E.Finished) -> None:
        r = self._req(ev.rid, *LIVE)
        if ev.reason == "length" and r.out != r.max_new:
            raise ModelError(f"finished by length with {r.out} of {r.max_new} tokens")
        if ev.reason not in ("length", "abort"):
            raise ModelError(f"unknown finish reason {ev.reason!r}")
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
        self.s.slots[ev.slot] = ev.adapter
        self.s.loading.add(ev.adapter)

    def _on_LoadCompleted(self, ev: E.LoadCompleted) -> None:
        if self.s.slots.get(ev.slot, object()) != ev.adapter or ev.adapter not in self.s.loading:
            raise ModelError(f"{ev.adapter!r} was not loading into slot {ev.slot}")
        self.s.loading.discard(ev.adapter)

    def _on_LoadFailed(self, ev: E.LoadFailed) -> None:
        if self.s.slots.get(ev.slot, object()) != ev.adapter or ev.adapter not in self.s.loading:
            raise ModelError(f"{ev.adapter!r} was not loading into slot {ev.slot}")
        self.s.loading.discard(ev.adapter)
        del self.s.slots[ev.slot]

    def _on_Evicted(self, ev: E.Evicted) -> None:
        if self.s.slots.get(ev.slot, object()) != ev.adapter:
            raise ModelError(f"{ev.adapter!r} is not in slot {ev.slot}")
        if ev.adapter in self.s.pinned:
            raise ModelError(f"evicted pinned adapter {ev.adapter!r}")
        users = [rid for rid, r in self.s.reqs.items() if r.adapter == ev.adapter and r.state != "waiting"]
        users = [rid for rid in users if self.s.reqs[rid].state in LIVE]
        if users or ev.adapter in self.s.loading:
            raise ModelError(f"evicted {ev.adapter!r} while running requests {users} use it or it loads")
        del self.s.slots[ev.slot]

    def _on_DrainMarked(self, ev: E.DrainMarked) -> None:
        if ev.adapter not in self._running() or ev.adapter in self.s.marks or ev.for_adapter in self.s.marks.values():
            raise ModelError(f"drain mark on {ev.adapter!r}: not running, or already draining / drained for")
        if not self._hungry(ev.for_adapter) or ev.for_adapter in self.s.reserved:
            raise ModelError(f"drain for {ev.for_adapter!r}, which does not starve (or has a slot reserved)")
        if self.cfg.lora_drain_policy == "preempt" and (self.s.marks or self.s.reserved):
            raise ModelError("a second drain while one is in progress (preempt policy: one at a time)")
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
