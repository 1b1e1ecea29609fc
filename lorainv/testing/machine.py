"""A reusable Hypothesis `RuleBasedStateMachine` that drives one `Engine` and one
`ReferenceModel` in lockstep (through `Harness`).

Rules are ops, valid and invalid, covering every field and option of the public API:

* requests: short and long prompts over a wide token range (read from the network's vocab)
  mixed with a small hot set so prefixes collide; resubmissions of earlier prompts (or
  extensions of them) under other adapters and in sessions; session turns;
* aborts of live, ended and retired requests; steps; complete or fail transfers; clock steps;
* adapters loaded (pinned or not, reloaded under the same name with other weights, ranks,
  alpha and rsLoRA varied), unloaded, pinned, unpinned; sessions opened and closed;
* ``invalid_op``: one op the engine must refuse (empty prompt, token outside the vocabulary,
  prompt or context too long, ``max_new_tokens < 1``, unknown adapter or session, a session
  turn for another adapter, a duplicate rid, bad sources, unknown names, bad counts and
  clock steps, ...), drawn at the rate of one rule among many so deep valid sequences stay;
* ``rare_scenario``: short scripted sequences with drawn parameters aimed at states random
  ops seldom reach (a prefix hit then a retraction or an abort; a pin or an abort while every
  slot is busy and a chunk is staged or a load in flight; two finished turns in one session at
  ``page_size > 1``); ``abort_reserved`` aborts the requests of an adapter a drain reserved a
  slot for.

Every op is validated by the model and every checker (the ``pools_consistent`` invariant);
teardown runs the liveness check and the idle leak check.

Coverage: ``stats["ops"]`` counts ``(op kind, variant, "rejected" | "accepted")``,
``stats["events"]`` each event kind (``Retracted`` also as ``Retracted:<reason>``), and
``stats["rare"]`` the rare states above, detected from the events and cheap public reads,
not from what a script intended. `OP_VARIANTS` lists every variant the machine can draw.

Configs are drawn per example (tiny KV pool, chunk sizes 1–8, 1–3 slots, overlap on/off,
drainer knobs, retry budget, session limit, page size 1 or 2, ``max_finished_requests``
small sometimes). The first value of each choice is the historic one, so shrinking heads
back to the old configs. Subclass and set the class attributes, or use `make_machine`:

* ``network``: ``"dummy"`` (fast: the fingerprint network, every token judged by the token
  oracle) or ``"tiny"`` (real numerics);
* ``numeric``: judge every token and logit row with the independent numeric oracle;
* ``config_overrides``: fixed `RuntimeConfig` fields (``faults=...`` to hunt a fault).

When an example fails, the final (shrunk) op sequence is saved as a JSON trace under
``LORAINV_TRACE_DIR`` and the replay command is printed.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from typing import Any, ClassVar

from hypothesis import note
from hypothesis import strategies as st
from hypothesis.control import current_build_context
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, precondition, rule

from lorainv import events as E
from lorainv import ops as O
from lorainv.config import RuntimeConfig
from lorainv.errors import Violation
from lorainv.testing.draws import Draws, DrawSource, draws
from lorainv.testing.harness import Harness
from lorainv.trace import Trace, save, trace_dir

# Each name has several sources: a reload under the same name gets other weights (and often
# another rank, alpha or rsLoRA). The first source is the historic one.
ADAPTER_SOURCES: dict[str, tuple[str, ...]] = {
    "a0": ("gen:4:11", "gen:4:21:8", "gen:1:31:1:rs", "gen:2:41"),
    "a1": ("gen:2:12", "gen:2:22:2:rs", "gen:6:32:3", "gen:2:42"),
    "a2": ("gen:8:13", "gen:8:23:16:rs", "gen:3:33:0.5", "gen:5:43"),
    "a3": ("gen:4:14", "gen:5:24:10:rs", "gen:7:34", "gen:1:44"),
}
ADAPTERS: dict[str, str] = {name: sources[0] for name, sources in ADAPTER_SOURCES.items()}


def adapter_sources(name: str) -> tuple[str, ...]:
    """The sources ``name`` may be loaded from: the historic one first, then other weights
    (other ranks, alpha and rsLoRA) that a reload under the same name draws."""
    return ADAPTER_SOURCES[name]


SESSIONS = ("s0", "s1", "s2", "s3")  # one more than max_sessions allows
MAX_LORA_RANK = 8
HOT = 8  # tokens 0..HOT-1 come 3 times in 4: prompts share prefixes
WIDE = 240  # the other tokens span up to this many ids (the network's vocab permitting)
MISSING_DIR = "/nonexistent/lorainv-adapter"

# Every (op kind, variant) the machine draws. "valid" variants are ops the generator means to
# be accepted (the engine may still refuse some for a reason of state the generator does not
# track, e.g. a pin while every slot runs); every other variant is an op it must refuse.
OP_VARIANTS: dict[str, tuple[str, ...]] = {
    "AddRequest": (
        "base",
        "adapter",
        "long",
        "resubmit",
        "resubmit-other-adapter",
        "session-first",
        "session-next",
        "empty-prompt",
        "token-out-of-vocab",
        "prompt-too-long",
        "context-too-long",
        "max-new-lt-1",
        "unknown-adapter",
        "unknown-session",
        "closed-session",
        "session-busy",
        "session-other-adapter",
        "duplicate-rid",
    ),
    "Abort": ("live", "ended", "retired", "unknown"),
    "Step": ("step",),
    "CompleteTransfers": ("all", "some", "zero", "negative"),
    "FailTransfers": ("one", "zero", "negative"),
    "AdvanceClock": ("float", "int", "zero", "negative", "infinite"),
    "LoadAdapter": ("fresh", "pinned", "reload", "duplicate", "missing-dir", "rank-too-big", "bad-gen", "empty-name"),
    "UnloadAdapter": ("idle", "pinned", "in-use", "session-held", "unknown"),
    "PinAdapter": ("valid", "already-pinned", "unknown"),
    "UnpinAdapter": ("valid", "not-pinned", "unknown"),
    "OpenSession": ("valid", "duplicate", "too-many", "empty-id"),
    "CloseSession": ("idle", "live-turn", "unknown"),
}
VALID_VARIANTS: frozenset[tuple[str, str]] = frozenset(
    {("AddRequest", v) for v in ("base", "adapter", "long", "resubmit", "resubmit-other-adapter")}
    | {("AddRequest", "session-first"), ("AddRequest", "session-next"), ("Abort", "live"), ("Step", "step")}
    | {("CompleteTransfers", v) for v in ("all", "some", "zero")}
    | {("FailTransfers", "one"), ("FailTransfers", "zero")}
    | {("AdvanceClock", v) for v in ("float", "int", "zero")}
    | {("LoadAdapter", v) for v in ("fresh", "pinned", "reload")}
    | {("UnloadAdapter", "idle"), ("UnloadAdapter", "pinned"), ("PinAdapter", "valid"), ("UnpinAdapter", "valid")}
    | {("OpenSession", "valid"), ("CloseSession", "idle"), ("CloseSession", "live-turn")}
)
# The rare states of issue 13, detected from events (see `LorainvMachine._observe`).
RARE_STATES = (
    "prefix-hit-then-retract",
    "prefix-hit-then-abort",
    "pin-busy-staged-or-loading",
    "abort-busy-staged-or-loading",
    "two-turns-one-session-paged",
    "abort-after-reservation",
)


def config_strategy(network: str = "dummy", **fixed: Any) -> st.SearchStrategy[RuntimeConfig]:
    """Small configs that reach retraction, chunk boundaries and slot churn quickly."""
    fields: dict[str, st.SearchStrategy[Any]] = {
        "page_size": st.sampled_from([1, 2, 3]),  # 3: not a power of two (index arithmetic by | would pass 1, 2, 4)
        "max_total_tokens": st.sampled_from([12, 16, 26, 32]),  # 26 at page size 2: an odd page count
        "chunked_prefill_size": st.integers(1, 8),
        "max_loras_per_batch": st.integers(1, 3),
        "max_running_requests": st.integers(2, 5),
        "enable_lora_overlap_loading": st.booleans(),
        "lora_drain_wait_threshold": st.sampled_from([0.0, 0.5, 0.1]),
        "lora_drain_policy": st.sampled_from(["preempt", "admission"]),
        "enable_prefix_cache": st.booleans(),
        "lora_eviction_policy": st.sampled_from(["lru", "fifo"]),
        "lora_drain_quantum": st.sampled_from([0.0, 0.01, 0.5]),
        "lora_drain_max_preemptions": st.sampled_from([8, 0, 1]),
        "max_load_retries": st.sampled_from([1, 0, 2]),
        "max_sessions": st.sampled_from([2, 1, 3]),
        "max_finished_requests": st.sampled_from([0, 0, 2, 5]),
        # "sim": copies land only on CompleteTransfers (the machine times them); "sim-auto":
        # they also land by themselves a few steps after issue, as on a real stream
        "device": st.sampled_from(["sim", "sim", "sim-auto"]),
        "transfer_latency_steps": st.sampled_from([2, 1, 3]),
    }
    if network == "dummy":
        fields["tp_size"] = st.sampled_from([1, 1, 1, 2])  # simulated ranks share one pinned host cache
    for k, v in fixed.items():
        fields[k] = st.just(v)
    base = {"network": network, "max_lora_rank": MAX_LORA_RANK, "device": "sim"}
    if network == "tiny":
        base["dtype"] = "float64"
    return st.fixed_dictionaries(fields).map(lambda d: _config({**base, **d}))


def _config(values: dict[str, Any]) -> RuntimeConfig:
    """The drawn values as a config: the pool rounded up to whole pages, and string values as
    equal but distinct objects, as a config read from a trace has them."""
    ps = values["page_size"]
    if "max_total_tokens" in values:
        values["max_total_tokens"] = -(-values["max_total_tokens"] // ps) * ps
    fresh: dict[str, Any] = {k: _fresh(v) if isinstance(v, str) else v for k, v in values.items()}
    return RuntimeConfig(**fresh)


def _fresh(name: str | None) -> str | None:
    """An equal but distinct ``str`` object, as a name decoded from a request or a trace file
    is: a runtime that compares adapter names with ``is`` fails on it (names drawn from the
    machine's constants would otherwise be one interned object throughout a run)."""
    return None if name is None else "".join([name[:1], name[1:]])


def token_strategy(vocab: int) -> st.SearchStrategy[int]:
    """A hot id (3 in 4) or any id below ``min(vocab, WIDE)``; shrinks to hot ids."""
    wide, hot = _token_range(vocab)
    # one draw per token: the low three quarters of the range fold onto the hot set
    return st.integers(0, 4 * wide - 1).map(lambda v: _fold(v, wide, hot))


def prompt_strategy(vocab: int, lo: int, hi: int) -> st.SearchStrategy[tuple[int, ...]]:
    """``lo..hi`` tokens of `token_strategy`: the same choices, folded after the list is drawn
    (one map per prompt, not one per token). Built once per argument triple."""
    key = (vocab, lo, hi)
    strategy = _PROMPTS.get(key)
    if strategy is None:
        wide, hot = _token_range(vocab)
        raw = st.lists(st.integers(0, 4 * wide - 1), min_size=lo, max_size=hi)
        strategy = _PROMPTS[key] = raw.map(lambda vs: tuple(_fold(v, wide, hot) for v in vs))
    return strategy


_PROMPTS: dict[tuple[int, int, int], st.SearchStrategy[tuple[int, ...]]] = {}


def _token_range(vocab: int) -> tuple[int, int]:
    return max(HOT, min(vocab, WIDE)), min(HOT, vocab)


def _fold(v: int, wide: int, hot: int) -> int:
    return v % hot if v < 3 * wide else v - 3 * wide


def _stats_counter(stats: dict[str, Any], key: str) -> Counter[Any]:
    c = stats.get(key)
    if c is None:
        c = stats[key] = Counter()
    return c


class LorainvMachine(RuleBasedStateMachine):
    network: ClassVar[str] = "dummy"
    numeric: ClassVar[bool] = False
    config_overrides: ClassVar[dict[str, Any]] = {}
    policy: ClassVar[frozenset[str] | None] = None  # policy checks to run (None: all of POLICY_CHECKS)
    trace_name: ClassVar[str] = "machine"
    _config_strategy: ClassVar[st.SearchStrategy[RuntimeConfig] | None] = None
    last_failure: ClassVar[Trace | None] = None
    last_trace_path: ClassVar[str | None] = None
    stats: ClassVar[dict[str, Any]] = {}
    progress: ClassVar[Any] = None  # called with the stats after every example (campaign display)

    requests = Bundle("requests")

    def __init__(self) -> None:
        super().__init__()
        self.h: Harness | None = None
        self.failed: list[Violation] = []
        self.n = 0
        self.turn = 0
        self.vocab = HOT
        self.tokens: st.SearchStrategy[int] = st.integers(0, HOT - 1)
        # generator-side memory (what was asked; the engine is read for what is)
        self.prompts: list[tuple[tuple[int, ...], str | None]] = []  # submitted (prompt, adapter)
        self.sources: dict[str, str] = {}  # adapter name -> last source it was loaded from
        self.used: list[str] = []  # rids the engine queued (a duplicate must be one of these)
        # rare-state detection, fed by events only
        self.hits: set[str] = set()  # rids that reused cached KV since they were last queued
        self.loading: set[Any] = set()  # adapters with an async load in flight
        self.reserved: set[Any] = set()  # starving adapters holding a slot reservation
        self.saved: Counter[str] = Counter()  # session -> finished turns since it opened

    # -- lockstep -------------------------------------------------------------------------
    def _apply(self, op: O.Op, variant: str) -> list[E.Event]:
        """Apply ``op`` in lockstep and count it as ``variant``; a no-op after a violation."""
        assert self.h is not None
        if self.failed:
            return []
        before = self._signature()
        pre = self._pre_rare(op)
        rec = self.h.apply(op)
        _count(self, before, op.kind)
        self._observe(op, variant, rec.events, pre)
        if rec.violations and not self.failed:
            self._fail(rec.violations)
        return rec.events

    def apply(self, op: O.Op, variant: str | None = None) -> list[E.Event]:
        """Apply ``op`` to the engine and the model in lockstep, then check every pool: the
        call a custom ``@rule`` of a subclass makes. Counts ``op`` in the coverage counters as
        ``variant`` (default: the op's kind) and fails the example on a violation; a no-op
        returning ``[]`` once the example has failed. Mutates the harness (engine, model,
        records), the coverage counters and the machine's generator-side memory."""
        return self._apply(op, variant if variant is not None else op.kind)

    def _signature(self) -> tuple[Any, ...]:
        m = self.h.model.s if self.h is not None else None
        if m is None:
            return ()
        states = Counter(r.state for r in m.reqs.values() if r.state in ("waiting", "prefilling", "decoding"))
        return (
            tuple(sorted(states.items())),
            len(m.slots),
            len(m.loading),
            sum(1 for s in m.sessions.values() if s.active),
            len(m.marks),
            min(m.cache_tokens, 8),
        )

    def _pre_rare(self, op: O.Op) -> str | None:
        """The rare state ``op`` would reach if accepted, judged before it runs."""
        if not isinstance(op, (O.Abort, O.PinAdapter)):
            return None
        assert self.h is not None
        eng = self.h.engine
        busy = len(eng.pool.uid_to_slot) >= self.h.cfg.max_loras_per_batch
        if isinstance(op, O.PinAdapter):
            staged = any(r.state.value == "prefilling" for r in eng.requests.values())
            return "pin-busy-staged-or-loading" if busy and (staged or self.loading) else None
        req = eng.requests.get(op.rid)
        if req is None or not req.state.live:
            return None
        if req.adapter in self.reserved:
            return "abort-after-reservation"
        if busy and (req.state.value == "prefilling" or req.adapter in self.loading):
            return "abort-busy-staged-or-loading"
        return None

    def _observe(self, op: O.Op, variant: str, events: list[E.Event], pre: str | None) -> None:
        """Count the op variant, the events and the rare states they show; track loads,
        reservations, prefix hits and saved session turns."""
        stats = type(self).stats
        rejected = any(isinstance(e, E.Rejected) for e in events)
        _stats_counter(stats, "ops_by_variant")[(op.kind, variant, "rejected" if rejected else "accepted")] += 1
        ev_count = _stats_counter(stats, "events")
        rare = _stats_counter(stats, "rare")
        if pre is not None and (not rejected or pre.startswith("pin")):
            rare[pre] += 1
        for e in events:
            ev_count[e.kind] += 1
            if isinstance(e, E.PrefixHit):
                if e.source == "cache":
                    self.hits.add(e.rid)
            elif isinstance(e, E.Retracted):
                ev_count[f"Retracted:{e.reason}"] += 1
                if e.rid in self.hits:
                    rare["prefix-hit-then-retract"] += 1
                    self.hits.discard(e.rid)
            elif isinstance(e, E.Aborted):
                if e.rid in self.hits:
                    rare["prefix-hit-then-abort"] += 1
                self.hits.discard(e.rid)
            elif isinstance(e, E.Finished):
                self.hits.discard(e.rid)
            elif isinstance(e, E.LoadStarted):
                if e.overlap:
                    self.loading.add(e.adapter)
            elif isinstance(e, (E.LoadCompleted, E.LoadFailed, E.Evicted)):
                self.loading.discard(e.adapter)
            elif isinstance(e, E.SlotReserved):
                self.reserved.add(e.adapter)
            elif isinstance(e, E.ReservationEnded):
                self.reserved.discard(e.adapter)
            elif isinstance(e, E.SessionSaved):
                self.saved[e.session_id] += 1
                if self.saved[e.session_id] == 2 and self.h is not None and self.h.cfg.page_size > 1:
                    rare["two-turns-one-session-paged"] += 1
            elif isinstance(e, (E.SessionClosed, E.SessionOpened)):
                self.saved.pop(e.session_id, None)

    def _fail(self, violations: list[Violation]) -> None:
        assert self.h is not None
        self.failed = violations
        first = violations[0]
        trace = Trace(
            self.h.cfg,
            tuple(self.h.ops[: self._user_ops]) if self._in_teardown else tuple(self.h.ops),
            seed=self.h.cfg.seed,
            numeric=self.numeric,
            expect={"pool": first.pool, "invariant": first.invariant},
            meta={"machine": type(self).__name__, "message": first.message}
            | ({} if self.policy is None else {"policy": sorted(self.policy)}),
        )
        type(self).last_failure = trace
        try:
            final = current_build_context().is_final
        except Exception:  # outside a Hypothesis run (direct use)
            final = True
        if final:
            digest = hashlib.sha1(json.dumps(trace.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
            path = save(trace, trace_dir() / f"{self.trace_name}-{digest}.json")
            type(self).last_trace_path = str(path)
            msg = f"lorainv: trace saved to {path}\n  replay: lorainv replay {path}"
            note(msg)
            print(msg)

    _in_teardown = False
    _user_ops = 0

    # -- setup ----------------------------------------------------------------------------
    @initialize(data=draws())
    def setup(self, data: Draws) -> None:
        cls = type(self)
        strategy = cls.__dict__.get("_config_strategy")
        if strategy is None:  # built once per machine class (its config fields are class constants)
            strategy = config_strategy(self.network, **self.config_overrides)
            cls._config_strategy = strategy
        cfg = data.draw(strategy, label="config")
        self.h = Harness(cfg, numeric=self.numeric, policy=self.policy)
        self.vocab = self.h.engine.network.vocab_size
        self.tokens = token_strategy(self.vocab)  # for custom rules; the machine's prompts use prompt_strategy
        # where this example starts in the cycles of invalid variants and scripts: cycling (not
        # a fresh draw per call) spreads a campaign evenly over every variant
        self.turn = data.draw(st.integers(0, (1 << 16) - 1), label="cycle offset")
        for name in ("a0", "a1"):
            self._load(name, ADAPTERS[name], False, "fresh")

    # -- helpers --------------------------------------------------------------------------
    @property
    def eng(self) -> Any:
        assert self.h is not None
        return self.h.engine

    @property
    def cfg(self) -> RuntimeConfig:
        assert self.h is not None
        return self.h.cfg

    def _registered(self) -> list[str | None]:
        return [None, *sorted(self.eng.registry)]

    def _prompt(self, data: DrawSource, lo: int, hi: int) -> tuple[int, ...]:
        return data.draw(prompt_strategy(self.vocab, lo, hi), label="prompt")

    def _next_rid(self) -> str:
        self.n += 1
        return f"r{self.n}"

    def _add(
        self, prompt: tuple[int, ...], adapter: str | None, max_new: int, sid: str | None = None, variant: str = ""
    ) -> str:
        rid = self._next_rid()
        if sid is not None:
            variant = self._turn_variant(sid, adapter)
        elif not variant:
            variant = "base" if adapter is None else "adapter"
        events = self._apply(O.AddRequest(rid, prompt, _fresh(adapter), max_new, sid), variant)
        if events and isinstance(events[0], E.Queued):
            self.used.append(rid)
            self.prompts.append((prompt, adapter))
            del self.prompts[:-16]
        return rid

    def _turn_variant(self, sid: str, adapter: str | None) -> str:
        """The variant a turn of session ``sid`` for ``adapter`` is in the current state."""
        slot = self.eng.sessions.slots.get(sid)
        if slot is None:
            return "closed-session" if sid in SESSIONS else "unknown-session"
        if sid in self._busy_sessions():
            return "session-busy"
        if slot.tokens and slot.adapter != adapter:
            return "session-other-adapter"
        return "session-next" if slot.tokens else "session-first"

    def _load(self, name: str, source: str, pinned: bool, variant: str) -> None:
        events = self._apply(O.LoadAdapter(_fresh(name) or name, source, pinned), variant)
        if any(isinstance(e, E.AdapterRegistered) for e in events):
            self.sources[name] = source

    def _open(self) -> list[str]:
        return sorted(self.eng.sessions.slots) if self.h is not None else []

    def _busy_sessions(self) -> set[str | None]:
        return {r.session_id for r in self.eng.requests.values() if r.state.live}

    def _idle_sessions(self) -> list[str]:
        if self.h is None:
            return []
        busy = self._busy_sessions()
        return [s for s in self._open() if s not in busy]

    def _live(self) -> list[Any]:
        return [r for r in self.eng.requests.values() if r.state.live]

    # -- rules: requests ------------------------------------------------------------------
    @rule(target=requests, data=draws(), max_new=st.integers(1, 4))
    def add_request(self, data: Draws, max_new: int) -> str:
        prompt = self._prompt(data, 1, 4)
        return self._add(prompt, data.draw(st.sampled_from(self._registered()), label="adapter"), max_new)

    @rule(target=requests, data=draws(), max_new=st.integers(1, 4))
    def add_long_request(self, data: Draws, max_new: int) -> str:
        prompt = self._prompt(data, 5, 14)
        adapter = data.draw(st.sampled_from(self._registered()), label="adapter")
        return self._add(prompt, adapter, max_new, variant="long")

    @precondition(lambda self: bool(self.prompts))
    @rule(target=requests, data=draws(), max_new=st.integers(1, 3))
    def resubmit(self, data: Draws, max_new: int) -> str:
        """An earlier prompt again, or an extension of it, under the same or another adapter
        (and sometimes as a session turn): long shared prefixes across adapters and sessions."""
        assert self.h is not None
        prompt, adapter = data.draw(st.sampled_from(self.prompts[::-1]), label="earlier")
        prompt = prompt[: self.h.cfg.max_total_tokens - 3] + self._prompt(data, 0, 3)
        registered = self._registered()
        other = data.draw(st.booleans(), label="other adapter") or adapter not in registered
        if other:
            adapter = data.draw(st.sampled_from(registered), label="adapter")
        idle = self._idle_sessions()
        if idle and data.draw(st.sampled_from([False, False, False, True]), label="as turn"):
            sid = data.draw(st.sampled_from(idle), label="sid")
            slot = self.eng.sessions.slots[sid]
            if slot.tokens:
                adapter = slot.adapter
            return self._add(prompt, adapter, max_new, sid)
        return self._add(prompt, adapter, max_new, variant="resubmit-other-adapter" if other else "resubmit")

    @rule(rid=requests)
    def abort(self, rid: str) -> None:
        req = self.eng.requests.get(rid)
        if req is None:  # ended and forgotten (max_finished_requests), or never queued
            variant = "retired" if rid in self.used else "unknown"
        else:
            variant = "live" if req.state.live else "ended"
        self._apply(O.Abort(rid), variant)

    @precondition(lambda self: self.h is not None and any(r.state.live for r in self.h.engine.requests.values()))
    @rule(data=draws())
    def abort_live(self, data: Draws) -> None:
        """Cancel a request that is still waiting, prefilling or decoding (the bundle's rids
        are mostly ended by the time they are drawn once loads land by themselves)."""
        rids = sorted(r.rid for r in self._live())
        self._apply(O.Abort(data.draw(st.sampled_from(rids), label="rid")), "live")

    @rule(n=st.integers(1, 3))
    def step(self, n: int) -> None:
        for _ in range(n):
            self._apply(O.Step(), "step")

    @rule(n=st.sampled_from([None, 1, 2, 0]))
    def complete_transfers(self, n: int | None) -> None:
        self._apply(O.CompleteTransfers(n), "all" if n is None else "some" if n else "zero")

    @precondition(lambda self: self.h is not None and self.h.engine.device.pending() > 0)
    @rule(n=st.sampled_from([1, 0]))
    def fail_transfer(self, n: int) -> None:
        self._apply(O.FailTransfers(n), "one" if n else "zero")

    @rule(dt=st.sampled_from([0.25, 1.0, 1, 0.0]))
    def advance_clock(self, dt: float) -> None:
        variant = "int" if isinstance(dt, int) else "float" if dt else "zero"
        self._apply(O.AdvanceClock(dt), variant)

    # -- rules: adapters and sessions -----------------------------------------------------
    @rule(data=draws())
    def adapter_churn(self, data: Draws) -> None:
        """Load (pinned sometimes, or reloaded with other weights), unload, pin or unpin an
        adapter, drawn among those where the op makes sense."""
        reg = sorted(self.eng.registry)
        pinned = sorted(self.eng.pool.pinned)
        choices: list[tuple[str, str]] = [("load", n) for n in sorted(ADAPTER_SOURCES) if n not in reg]
        choices += [("unload", n) for n in reg]
        choices += [("pin", n) for n in reg if n not in pinned]
        choices += [("unpin", n) for n in pinned]
        what, name = data.draw(st.sampled_from(choices), label="op")
        if what == "load":
            before = self.sources.get(name)
            options = [s for s in adapter_sources(name) if s != before] or [ADAPTERS[name]]
            source = data.draw(st.sampled_from(options), label="source")
            pin = data.draw(st.sampled_from([False, False, False, True]), label="pinned")
            self._load(name, source, pin, "pinned" if pin else "reload" if before is not None else "fresh")
        elif what == "unload":
            if any(r.adapter == name for r in self._live()):
                variant = "in-use"
            elif any(s.tokens and s.adapter == name for s in self.eng.sessions.slots.values()):
                variant = "session-held"
            else:
                variant = "pinned" if name in pinned else "idle"
            self._apply(O.UnloadAdapter(_fresh(name) or name), variant)
        elif what == "pin":
            self._apply(O.PinAdapter(name), "valid")
        else:
            self._apply(O.UnpinAdapter(name), "valid")

    @rule(data=draws())
    def session_churn(self, data: Draws) -> None:
        """Open a session that is closed (while the limit allows), or close an open one."""
        assert self.h is not None
        is_open = self._open()
        choices: list[O.OpenSession | O.CloseSession] = []
        if len(is_open) < self.h.cfg.max_sessions:
            choices += [O.OpenSession(s) for s in SESSIONS if s not in is_open]
        choices += [O.CloseSession(s) for s in is_open]
        if not choices:
            return
        op = data.draw(st.sampled_from(choices), label="op")
        if isinstance(op, O.OpenSession):
            self._apply(op, "valid")
        else:
            self._apply(op, "live-turn" if op.session_id in self._busy_sessions() else "idle")

    @precondition(lambda self: bool(self._idle_sessions()))
    @rule(target=requests, data=draws(), max_new=st.integers(1, 3))
    def session_turn(self, data: Draws, max_new: int) -> str:
        sid = data.draw(st.sampled_from(self._idle_sessions()), label="sid")
        slot = self.eng.sessions.slots[sid]
        choices = self._registered() if not slot.tokens else [slot.adapter]
        adapter = data.draw(st.sampled_from(choices), label="adapter")
        return self._add(self._prompt(data, 1, 4), adapter, max_new, sid)

    # -- rules: invalid ops ---------------------------------------------------------------
    ALWAYS_INVALID: ClassVar[tuple[str, ...]] = (
        "empty-prompt",
        "token-out-of-vocab",
        "prompt-too-long",
        "context-too-long",
        "max-new-lt-1",
        "unknown-adapter",
        "unknown-session",
        "abort-unknown",
        "load-missing-dir",
        "load-rank-too-big",
        "load-bad-gen",
        "load-empty-name",
        "unload-unknown",
        "pin-unknown",
        "unpin-unknown",
        "close-unknown",
        "open-empty-id",
        "complete-negative",
        "fail-negative",
        "clock-negative",
        "clock-infinite",
    )

    STATEFUL_INVALID: ClassVar[tuple[str, ...]] = (
        "duplicate-rid",
        "load-duplicate",
        "unpin-not-pinned",
        "pin-already-pinned",
        "abort-ended",
        "closed-session",
        "open-duplicate",
        "open-too-many",
        "session-busy",
        "session-other-adapter",
        "unload-in-use",
        "unload-session-held",
    )

    def _prepare(self, which: str, data: DrawSource) -> bool:
        """Reach, with valid ops, a state in which ``which`` is invalid; False if it was not
        reached (e.g. a pin the slot limit refuses)."""
        assert self.h is not None
        eng, cfg = self.eng, self.h.cfg
        needs_unpinned = ("load-duplicate", "unpin-not-pinned", "unload-in-use", "session-other-adapter")
        if which in needs_unpinned and not set(eng.registry) - eng.pool.pinned:
            self._ensure_registered(len(eng.registry) + 1)
        if which == "duplicate-rid" and not self.used:
            self._add(self._prompt(data, 1, 3), None, 1)
        elif which == "pin-already-pinned" and not eng.pool.pinned and eng.registry:
            resident = [n for n in sorted(eng.registry) if n in eng.pool.uid_to_slot]  # pinned without a load
            self._apply(O.PinAdapter(data.draw(st.sampled_from(resident or sorted(eng.registry)))), "valid")
        elif which == "abort-ended" and not any(not r.state.live for r in eng.requests.values()):
            rid = self._add(self._prompt(data, 1, 3), None, 1)
            self._apply(O.Abort(rid), "live")
        elif which == "closed-session" and all(s in self._open() for s in SESSIONS):
            self._apply(O.CloseSession(SESSIONS[0]), "live-turn" if SESSIONS[0] in self._busy_sessions() else "idle")
        elif which in ("open-duplicate", "session-busy", "session-other-adapter") and not self._open():
            self._apply(O.OpenSession(SESSIONS[0]), "valid")
        elif which == "open-too-many":
            for sid in SESSIONS:
                if len(self._open()) >= cfg.max_sessions:
                    break
                if sid not in self._open():
                    self._apply(O.OpenSession(sid), "valid")
        elif which == "unload-in-use" and not any(r.adapter is not None for r in self._live()):
            self._add(self._prompt(data, 1, 3), sorted(eng.registry)[0], 2)
        busy = self._busy_sessions()
        if which == "session-busy" and not any(s in busy for s in self._open()):
            idle = self._idle_sessions()
            if idle:
                slot = eng.sessions.slots[idle[0]]
                self._add(self._prompt(data, 1, 3), slot.adapter if slot.tokens else None, 2, idle[0])
        held = {"session-other-adapter": self._session_held_sessions, "unload-session-held": self._session_held}
        if which in held and not held[which]():
            self._hold_session_kv(data)
        return which in self._stateful_invalid()

    def _hold_session_kv(self, data: DrawSource) -> None:
        """Finish a turn of an adapter no live request uses in an idle session without KV
        (opening, or closing and reopening, one), so that the session holds that adapter's KV."""
        eng = self.eng
        used = {r.adapter for r in self._live()}
        free = [n for n in sorted(eng.registry) if n not in used]
        if not free:
            self._ensure_registered(len(eng.registry) + 1)
            free = [n for n in sorted(eng.registry) if n not in used]
        empty = [s for s in self._idle_sessions() if not eng.sessions.slots[s].tokens]
        if not empty:
            closed = [s for s in SESSIONS if s not in self._open()]
            if closed and len(self._open()) < self.cfg.max_sessions:
                sid = closed[0]
            else:
                sid = self._open()[0]
                self._apply(O.CloseSession(sid), "live-turn" if sid in self._busy_sessions() else "idle")
            self._apply(O.OpenSession(sid), "valid")
            empty = [sid]
        if free:
            self._run(self._add(self._prompt(data, 1, 3), free[0], 1, empty[0]), 16)

    def _session_held_sessions(self) -> list[str]:
        """Idle sessions that hold KV of an adapter."""
        busy = self._busy_sessions()
        return [s for s in self._open() if s not in busy and self.eng.sessions.slots[s].tokens]

    def _stateful_invalid(self) -> list[str]:
        """The variants of `STATEFUL_INVALID` that are invalid in the current state."""
        assert self.h is not None
        eng = self.eng
        is_open = self._open()
        busy = self._busy_sessions()
        ok = {
            "duplicate-rid": bool(self.used),
            "load-duplicate": bool(eng.registry),
            "unpin-not-pinned": bool(set(eng.registry) - eng.pool.pinned),
            "pin-already-pinned": bool(eng.pool.pinned),
            "abort-ended": any(not r.state.live for r in eng.requests.values()),
            "closed-session": any(s not in is_open for s in SESSIONS),
            "open-duplicate": bool(is_open),
            "open-too-many": len(is_open) >= self.h.cfg.max_sessions and any(s not in is_open for s in SESSIONS),
            "session-busy": any(s in busy for s in is_open),
            "session-other-adapter": bool(self._session_held_sessions()),
            "unload-in-use": any(r.adapter is not None for r in self._live()),
            "unload-session-held": bool(self._session_held()),
        }
        return [k for k in self.STATEFUL_INVALID if ok[k]]

    def _session_held(self) -> list[str]:
        """Adapters whose KV a session holds and no live request uses (an unload must fail)."""
        used = {r.adapter for r in self._live()}
        held = {s.adapter for s in self.eng.sessions.slots.values() if s.tokens and s.adapter is not None}
        return sorted(held - used)

    @rule(data=draws())
    def invalid_op(self, data: Draws) -> None:
        """The next two invalid variants of the cycle: ops the engine must refuse with a typed
        error (a `Rejected` event). Refused ops are cheap and do not use up rule steps."""
        variants = self.ALWAYS_INVALID + self.STATEFUL_INVALID
        for _ in range(2):
            which = variants[self.turn % len(variants)]
            self.turn += 1
            self._invalid(which, data)

    def _invalid(self, which: str, data: DrawSource) -> None:
        assert self.h is not None
        eng, cfg = self.eng, self.h.cfg
        if which in self.STATEFUL_INVALID and (not self._prepare(which, data) or self.failed):
            return
        reg = self._registered()
        adapter = data.draw(st.sampled_from(reg), label="adapter")
        ok = (1, 2)
        if which == "empty-prompt":
            self._apply(O.AddRequest(self._next_rid(), (), adapter, 2), which)
        elif which == "token-out-of-vocab":
            bad = data.draw(st.sampled_from([self.vocab, self.vocab + 7, -1]), label="token")
            self._apply(O.AddRequest(self._next_rid(), (1, bad), adapter, 2), "token-out-of-vocab")
        elif which == "prompt-too-long":
            self._apply(O.AddRequest(self._next_rid(), (1,) * (cfg.max_total_tokens + 1), adapter, 1), which)
        elif which == "context-too-long":
            self._apply(O.AddRequest(self._next_rid(), ok, adapter, eng.network.max_context_len), which)
        elif which == "max-new-lt-1":
            m = data.draw(st.sampled_from([0, -1]), label="max_new")
            self._apply(O.AddRequest(self._next_rid(), ok, adapter, m), which)
        elif which == "unknown-adapter":
            name = data.draw(st.sampled_from([n for n in (*ADAPTER_SOURCES, "zz") if n not in eng.registry]))
            self._apply(O.AddRequest(self._next_rid(), ok, name, 2), which)
        elif which == "unknown-session":
            self._apply(O.AddRequest(self._next_rid(), ok, adapter, 2, "nosuch"), which)
        elif which == "closed-session":
            sid = data.draw(st.sampled_from([s for s in SESSIONS if s not in self._open()]), label="sid")
            self._apply(O.AddRequest(self._next_rid(), ok, adapter, 2, sid), which)
        elif which == "session-busy":
            busy = self._busy_sessions()
            sid = data.draw(st.sampled_from([s for s in self._open() if s in busy]), label="sid")
            self._apply(O.AddRequest(self._next_rid(), ok, adapter, 2, sid), which)
        elif which == "session-other-adapter":
            busy = self._busy_sessions()
            sid = data.draw(st.sampled_from(self._session_held_sessions()), label="sid")
            others = [a for a in (*reg, "zz") if a != eng.sessions.slots[sid].adapter]
            other = data.draw(st.sampled_from(others), label="adapter")
            self._apply(O.AddRequest(self._next_rid(), ok, other, 2, sid), which)
        elif which == "duplicate-rid":
            rid = data.draw(st.sampled_from(self.used), label="rid")
            self._apply(O.AddRequest(rid, ok, adapter, 2), which)
        elif which == "abort-unknown":
            self._apply(O.Abort("nosuch"), "unknown")
        elif which == "abort-ended":
            ended = sorted(r.rid for r in eng.requests.values() if not r.state.live)
            self._apply(O.Abort(data.draw(st.sampled_from(ended), label="rid")), "ended")
        elif which.startswith("load-"):
            name = data.draw(st.sampled_from(sorted(ADAPTER_SOURCES)), label="name")
            pin = data.draw(st.booleans(), label="pinned")
            if which == "load-duplicate":
                name = data.draw(st.sampled_from(sorted(eng.registry)), label="name")
                self._apply(O.LoadAdapter(name, adapter_sources(name)[-1], pin), "duplicate")
                return
            if name in eng.registry:
                name = "zz"
            source = {
                "load-missing-dir": MISSING_DIR,
                "load-rank-too-big": f"gen:{MAX_LORA_RANK + data.draw(st.integers(1, 8), label='excess')}:5",
                "load-bad-gen": data.draw(st.sampled_from(["gen:0:1", "gen:4", "gen:4:1:x", "gen:4:1:-2"])),
                "load-empty-name": ADAPTERS["a0"],
            }[which]
            self._apply(O.LoadAdapter("" if which == "load-empty-name" else name, source, pin), which[5:])
        elif which in ("unload-unknown", "pin-unknown", "unpin-unknown"):
            name = data.draw(st.sampled_from([n for n in (*ADAPTER_SOURCES, "zz") if n not in eng.registry]))
            op = {"unload": O.UnloadAdapter, "pin": O.PinAdapter, "unpin": O.UnpinAdapter}[which.split("-")[0]]
            self._apply(op(name), "unknown")
        elif which == "unload-in-use":
            used = sorted({r.adapter for r in self._live() if r.adapter is not None})
            self._apply(O.UnloadAdapter(data.draw(st.sampled_from(used), label="name")), "in-use")
        elif which == "unload-session-held":
            self._apply(O.UnloadAdapter(data.draw(st.sampled_from(self._session_held()))), "session-held")
        elif which == "pin-already-pinned":
            self._apply(O.PinAdapter(data.draw(st.sampled_from(sorted(eng.pool.pinned)))), "already-pinned")
        elif which == "unpin-not-pinned":
            names = sorted(set(eng.registry) - eng.pool.pinned)
            self._apply(O.UnpinAdapter(data.draw(st.sampled_from(names), label="name")), "not-pinned")
        elif which == "close-unknown":
            sid = data.draw(st.sampled_from([s for s in (*SESSIONS, "nosuch") if s not in self._open()]))
            self._apply(O.CloseSession(sid), "unknown")
        elif which == "open-duplicate":
            self._apply(O.OpenSession(data.draw(st.sampled_from(self._open()), label="sid")), "duplicate")
        elif which == "open-too-many":
            sid = data.draw(st.sampled_from([s for s in SESSIONS if s not in self._open()]), label="sid")
            self._apply(O.OpenSession(sid), "too-many")
        elif which == "open-empty-id":
            self._apply(O.OpenSession(""), "empty-id")
        elif which == "complete-negative":
            self._apply(O.CompleteTransfers(-1), "negative")
        elif which == "fail-negative":
            self._apply(O.FailTransfers(-1), "negative")
        elif which == "clock-negative":
            self._apply(O.AdvanceClock(-0.5), "negative")
        else:
            self._apply(O.AdvanceClock(float("inf")), "infinite")

    # -- rules: rare states ---------------------------------------------------------------
    def _run(self, rid: str, max_steps: int) -> None:
        """Step (completing transfers first) until ``rid`` ended or ``max_steps`` steps ran."""
        for _ in range(max_steps):
            req = self.eng.requests.get(rid)
            if req is None or not req.state.live or self.failed:
                return
            if self.eng.device.pending():
                self._apply(O.CompleteTransfers(None), "all")
            self._apply(O.Step(), "step")

    @rule(data=draws())
    def rare_scenario(self, data: Draws) -> None:
        """A short script toward a state random ops seldom reach (parameters drawn).

        Half the time (and always once shrunk) it is a single ``Step``: a script's ops cannot
        be deleted one by one, so a failure found through one shrinks less far, and a
        lower rate lets plain rules find a fault first."""
        assert self.h is not None
        if not data.draw(st.booleans(), label="script"):
            self._apply(O.Step(), "step")
            return
        kinds = ["prefix-then-end", "busy-pin-or-abort"]
        if self.h.cfg.page_size > 1 and (self._idle_sessions() or len(self._open()) < self.h.cfg.max_sessions):
            kinds.append("two-turns")
        if self.h.cfg.lora_drain_wait_threshold > 0:
            kinds.append("drain-then-abort")
        kind = kinds[self.turn % len(kinds)]
        self.turn += 1
        if kind == "prefix-then-end":
            self._prefix_then_end(data)
        elif kind == "busy-pin-or-abort":
            self._busy_pin_or_abort(data)
        elif kind == "two-turns":
            self._two_turns(data)
        else:
            self._drain_then_abort(data)

    def _ensure_registered(self, count: int) -> list[str]:
        """Load historic adapters until ``count`` are registered (or all are); their names."""
        for name in sorted(ADAPTER_SOURCES):
            if len(self.eng.registry) >= count:
                break
            if name not in self.eng.registry:
                self._load(name, ADAPTERS[name], False, "fresh")
        return sorted(self.eng.registry)[:count]

    def _drain_then_abort(self, data: DrawSource) -> None:
        """Drainer on: every slot runs a request, one more adapter starves past the wait
        threshold until a drain reserves a slot for it; then its requests are aborted."""
        assert self.h is not None
        cfg = self.h.cfg
        names = self._ensure_registered(cfg.max_loras_per_batch + 1)
        if len(names) < 2:
            return
        for name in names[:-1]:
            self._add(self._prompt(data, 1, 2), name, data.draw(st.integers(3, 6), label="max_new"))
        self._apply(O.Step(), "step")
        starving = self._add(self._prompt(data, 1, 2), names[-1], 2)
        self._apply(O.Step(), "step")
        dt = cfg.lora_drain_wait_threshold + max(cfg.lora_drain_quantum, 0.25)
        self._apply(O.AdvanceClock(dt), "float")
        for _ in range(data.draw(st.integers(1, 4), label="steps")):
            if self.reserved or self.failed:
                break
            if self.eng.device.pending():
                self._apply(O.CompleteTransfers(None), "all")
            self._apply(O.Step(), "step")
        victims = [r.rid for r in self._live() if r.adapter in self.reserved] or [starving]
        for rid in victims:
            req = self.eng.requests.get(rid)
            self._apply(O.Abort(rid), "live" if req is not None and req.state.live else "ended")

    def _prefix_then_end(self, data: DrawSource) -> None:
        """Serve a prompt, resubmit it (extended) under the same adapter so it hits the prefix
        cache, then abort it, or let a request that already decodes squeeze the KV pool until
        the resubmission (no output yet, the longer prompt) is the retraction victim."""
        assert self.h is not None
        adapter = data.draw(st.sampled_from(self._registered()), label="adapter")
        base = self._prompt(data, 3, max(3, min(10, self.h.cfg.max_total_tokens // 2 - 2)))
        self._run(self._add(base, adapter, 1), 6)
        abort = data.draw(st.booleans(), label="abort")
        if not abort:
            # room for both prefills, no room for both to decode: a retraction follows
            fill = max(1, self.h.cfg.max_total_tokens - len(base) - 3)
            squeeze = self._add(self._prompt(data, fill, fill), adapter, 8, variant="long")
            for _ in range(6):  # until it decodes: it has more output than the resubmission will
                req = self.eng.requests.get(squeeze)
                if req is None or not req.state.live or len(req.output) >= 2 or self.failed:
                    break
                self._apply(O.Step(), "step")
        max_new = data.draw(st.integers(1, 6), label="max_new")
        rid = self._add(base + self._prompt(data, 1, 2), adapter, max_new, variant="resubmit")
        self._run(rid, data.draw(st.integers(1, 2), label="steps"))
        if abort:
            req = self.eng.requests.get(rid)
            self._apply(O.Abort(rid), "live" if req is not None and req.state.live else "ended")
        else:
            for _ in range(data.draw(st.integers(2, 6), label="steps")):
                self._apply(O.Step(), "step")

    def _busy_pin_or_abort(self, data: DrawSource) -> None:
        """Queue one request per slot (plus one) on distinct adapters, one of them long enough
        to be chunked, run one round, then pin an adapter or abort one of them."""
        assert self.h is not None
        names = self._ensure_registered(self.h.cfg.max_loras_per_batch + 1)
        rids = []
        for i, name in enumerate(names):
            prompt = self._prompt(data, 6, 10) if i == 0 else self._prompt(data, 1, 3)
            rids.append(self._add(prompt, name, 2, variant="long" if i == 0 else "adapter"))
        self._apply(O.Step(), "step")
        if self.eng.device.pending() and data.draw(st.booleans(), label="fail a copy"):
            n = data.draw(st.sampled_from([1, 0]), label="fail")
            self._apply(O.FailTransfers(n), "one" if n else "zero")
            self._apply(O.CompleteTransfers(1), "some")
        if data.draw(st.booleans(), label="pin"):
            free = [n for n in sorted(self.eng.registry) if n not in self.eng.pool.pinned]
            if free:
                self._apply(O.PinAdapter(data.draw(st.sampled_from(free), label="name")), "valid")
        else:
            rid = data.draw(st.sampled_from(rids), label="rid")
            req = self.eng.requests.get(rid)
            self._apply(O.Abort(rid), "live" if req is not None and req.state.live else "ended")

    def _two_turns(self, data: DrawSource) -> None:
        """Two finished turns in one session (run at ``page_size > 1``)."""
        idle = self._idle_sessions()
        if idle:
            sid = data.draw(st.sampled_from(idle), label="sid")
        else:
            sid = next(s for s in SESSIONS if s not in self._open())
            self._apply(O.OpenSession(sid), "valid")
        slot = self.eng.sessions.slots.get(sid)
        if slot is None:
            return
        adapter = slot.adapter if slot.tokens else data.draw(st.sampled_from(self._registered()), label="adapter")
        for _ in range(2):
            rid = self._add(self._prompt(data, 1, 3), adapter, data.draw(st.integers(1, 2), label="max_new"), sid)
            self._run(rid, 8)

    @precondition(lambda self: bool(self.reserved))
    @rule(data=draws())
    def abort_reserved(self, data: Draws) -> None:
        """Abort a request of an adapter a drain reserved a slot for (the reservation must end)."""
        rids = sorted(r.rid for r in self._live() if r.adapter in self.reserved)
        if rids:
            self._apply(O.Abort(data.draw(st.sampled_from(rids), label="rid")), "live")

    # -- checks ---------------------------------------------------------------------------
    @invariant()
    def pools_consistent(self) -> None:
        """Every checker and the refinement check passed after every op so far."""
        if self.failed:
            raise AssertionError("invariant violated:\n" + "\n".join(f"  {v}" for v in self.failed))

    def teardown(self) -> None:
        """Drain to idle and run the final checks, unless the example failed already or is
        being abandoned: Hypothesis calls this from a ``finally`` clause, also while a Ctrl-C
        (KeyboardInterrupt) propagates, and one that landed inside an engine op left that op
        half-applied, so checking would report a violation the engine never made."""
        if self.h is None or self.failed or isinstance(sys.exc_info()[1], KeyboardInterrupt):
            return
        self._user_ops = len(self.h.ops)
        self._in_teardown = True
        violations = self.h.finish()
        stats = type(self).stats
        stats["examples"] = stats.get("examples", 0) + 1
        stats["ops"] = stats.get("ops", 0) + len(self.h.ops)
        if self.progress is not None:
            self.progress(stats)
        if violations:
            self._fail(violations)
            raise AssertionError("teardown check failed:\n" + "\n".join(f"  {v}" for v in violations))


def _count(machine: LorainvMachine, before: tuple[Any, ...], kind: str) -> None:
    stats = type(machine).stats
    after = machine._signature()
    stats.setdefault("states", set()).add(after)
    stats.setdefault("transitions", set()).add((before, kind, after))


COVERAGE_COUNTERS = ("ops_by_variant", "events", "rare")  # the Counter-valued keys of `LorainvMachine.stats`


def coverage_report(stats: dict[str, Any]) -> dict[str, Any]:
    """The coverage counters of a campaign (or merged campaigns: only the `COVERAGE_COUNTERS`
    keys are read) as plain JSON: each op variant reached (how often accepted and rejected),
    each event kind, each rare state; what exists to be reached; and what never was."""
    ops: Counter[Any] = stats.get("ops_by_variant", Counter())
    variants: dict[str, dict[str, int]] = {}
    for (kind, variant, outcome), n in sorted(ops.items()):
        variants.setdefault(f"{kind}:{variant}", {"accepted": 0, "rejected": 0})[outcome] += n
    events: Counter[str] = stats.get("events", Counter())
    rare: Counter[str] = stats.get("rare", Counter())
    wanted = [f"{k}:{v}" for k, vs in OP_VARIANTS.items() for v in vs]
    return {
        "op_variants": variants,
        "events": dict(sorted(events.items())),
        "rare": {r: rare.get(r, 0) for r in RARE_STATES},
        "known_op_variants": wanted,
        "known_events": sorted(E.EVENTS),
        "missing_op_variants": [w for w in wanted if w not in variants],
        "missing_events": sorted(k for k in E.EVENTS if not events.get(k)),
        "missing_rare": [r for r in RARE_STATES if not rare.get(r)],
    }


def make_machine(
    name: str = "Machine",
    *,
    network: str = "dummy",
    numeric: bool = False,
    policy: frozenset[str] | None = None,
    **config_overrides: Any,
) -> type[LorainvMachine]:
    """A machine class with fixed config fields (e.g. ``faults=frozenset({...})``) and the
    policy checks to run (``policy``; None: all)."""
    return type(
        name,
        (LorainvMachine,),
        {
            "network": network,
            "numeric": numeric,
            "policy": policy,
            "config_overrides": config_overrides,
            "trace_name": name,
            "stats": {},
            "last_failure": None,
            "last_trace_path": None,
        },
    )
