"""A reusable Hypothesis `RuleBasedStateMachine` that drives one `Engine` and one
`ReferenceModel` in lockstep (through `Harness`).

Rules are ops: add requests (several adapters and the base model, short and long prompts),
abort a live request drawn from a Bundle, step, complete or fail transfers, advance the
clock, load/unload/pin/unpin adapters, open/close sessions and add session turns. Every
rule's op is validated by the model and every checker (the ``pools_consistent``
invariant); teardown runs the liveness check and the idle leak check.

Configs are drawn per example (tiny KV pool, chunk sizes 1–8, 1–3 slots, overlap on/off,
drainer on/off, page size 1 or 2) so retraction, chunk boundaries and slot churn come fast.
Subclass and set the class attributes, or use `make_machine`:

* ``network``: ``"dummy"`` (fast: fake logits, no matmuls) or ``"tiny"`` (real numerics);
* ``numeric``: compare every finished request's tokens with the request run alone;
* ``config_overrides``: fixed `RuntimeConfig` fields (``faults=...`` to hunt a fault).

When an example fails, the final (shrunk) op sequence is saved as a JSON trace under
``LORAINV_TRACE_DIR`` and the replay command is printed.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any, ClassVar

from hypothesis import note
from hypothesis import strategies as st
from hypothesis.control import current_build_context
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, precondition, rule

from lorainv import ops as O
from lorainv.config import RuntimeConfig
from lorainv.errors import Violation
from lorainv.testing.harness import Harness
from lorainv.trace import Trace, save, trace_dir

ADAPTERS: dict[str, str] = {"a0": "gen:4:11", "a1": "gen:2:12", "a2": "gen:8:13", "a3": "gen:4:14"}
SESSIONS = ("s0", "s1")


def config_strategy(network: str = "dummy", **fixed: Any) -> st.SearchStrategy[RuntimeConfig]:
    """Small configs that reach retraction, chunk boundaries and slot churn quickly."""
    fields: dict[str, st.SearchStrategy[Any]] = {
        "page_size": st.sampled_from([1, 2]),
        "max_total_tokens": st.sampled_from([12, 16, 24, 32]),
        "chunked_prefill_size": st.integers(1, 8),
        "max_loras_per_batch": st.integers(1, 3),
        "max_running_requests": st.integers(2, 5),
        "enable_lora_overlap_loading": st.booleans(),
        "lora_drain_wait_threshold": st.sampled_from([0.0, 0.5]),
        "lora_drain_policy": st.sampled_from(["preempt", "admission"]),
        "enable_prefix_cache": st.booleans(),
        "lora_eviction_policy": st.sampled_from(["lru", "fifo"]),
    }
    if network == "dummy":
        fields["tp_size"] = st.sampled_from([1, 1, 1, 2])  # simulated ranks share one pinned host cache
    for k, v in fixed.items():
        fields[k] = st.just(v)
    base = {"network": network, "max_sessions": 2, "max_lora_rank": 8, "device": "sim"}
    if network == "tiny":
        base["dtype"] = "float64"
    return st.fixed_dictionaries(fields).map(lambda d: RuntimeConfig(**{**base, **d}))


short_prompts = st.lists(st.integers(0, 7), min_size=1, max_size=4)
long_prompts = st.lists(st.integers(0, 7), min_size=5, max_size=14)


class LorainvMachine(RuleBasedStateMachine):
    network: ClassVar[str] = "dummy"
    numeric: ClassVar[bool] = False
    config_overrides: ClassVar[dict[str, Any]] = {}
    trace_name: ClassVar[str] = "machine"
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

    # -- lockstep -------------------------------------------------------------------------
    def _apply(self, op: O.Op) -> list[Any]:
        assert self.h is not None
        before = self._signature()
        rec = self.h.apply(op)
        _count(self, before, op.kind)
        if rec.violations and not self.failed:
            self._fail(rec.violations)
        return rec.events

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
            meta={"machine": type(self).__name__, "message": first.message},
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
    @initialize(data=st.data())
    def setup(self, data: st.DataObject) -> None:
        cfg = data.draw(config_strategy(self.network, **self.config_overrides), label="config")
        self.h = Harness(cfg, numeric=self.numeric)
        for name in ("a0", "a1"):
            self._apply(O.LoadAdapter(name, ADAPTERS[name]))

    # -- rules ----------------------------------------------------------------------------
    def _registered(self) -> list[str | None]:
        assert self.h is not None
        return [None, *sorted(self.h.engine.registry)]

    def _add(self, prompt: list[int], adapter: str | None, max_new: int, sid: str | None = None) -> str:
        self.n += 1
        rid = f"r{self.n}"
        self._apply(O.AddRequest(rid, tuple(prompt), adapter, max_new, sid))
        return rid

    @rule(target=requests, data=st.data(), prompt=short_prompts, max_new=st.integers(1, 4))
    def add_request(self, data: st.DataObject, prompt: list[int], max_new: int) -> str:
        return self._add(prompt, data.draw(st.sampled_from(self._registered()), label="adapter"), max_new)

    @rule(target=requests, data=st.data(), prompt=long_prompts, max_new=st.integers(1, 4))
    def add_long_request(self, data: st.DataObject, prompt: list[int], max_new: int) -> str:
        return self._add(prompt, data.draw(st.sampled_from(self._registered()), label="adapter"), max_new)

    @rule(rid=requests)
    def abort(self, rid: str) -> None:
        self._apply(O.Abort(rid))

    @rule(n=st.integers(1, 3))
    def step(self, n: int) -> None:
        for _ in range(n):
            self._apply(O.Step())

    @rule(n=st.sampled_from([None, 1, 2]))
    def complete_transfers(self, n: int | None) -> None:
        self._apply(O.CompleteTransfers(n))

    @precondition(lambda self: self.h is not None and self.h.engine.device.pending() > 0)
    @rule()
    def fail_transfer(self) -> None:
        self._apply(O.FailTransfers(1))

    @rule(dt=st.sampled_from([0.25, 1.0]))
    def advance_clock(self, dt: float) -> None:
        self._apply(O.AdvanceClock(dt))

    @rule(data=st.data())
    def adapter_churn(self, data: st.DataObject) -> None:
        """Load, unload, pin or unpin an adapter (drawn among those where the op makes sense)."""
        assert self.h is not None
        reg = sorted(self.h.engine.registry)
        pinned = sorted(self.h.engine.pool.pinned)
        choices: list[O.Op] = [O.LoadAdapter(n, ADAPTERS[n]) for n in sorted(ADAPTERS) if n not in reg]
        choices += [O.UnloadAdapter(n) for n in reg]
        choices += [O.PinAdapter(n) for n in reg if n not in pinned]
        choices += [O.UnpinAdapter(n) for n in pinned]
        self._apply(data.draw(st.sampled_from(choices), label="op"))

    def _open(self) -> list[str]:
        return sorted(self.h.engine.sessions.slots) if self.h is not None else []

    def _idle_sessions(self) -> list[str]:
        if self.h is None:
            return []
        busy = {r.session_id for r in self.h.engine.requests.values() if r.state.live}
        return [s for s in self._open() if s not in busy]

    @rule(data=st.data())
    def session_churn(self, data: st.DataObject) -> None:
        """Open a session that is closed, or close an open one."""
        is_open = self._open()
        choices: list[O.Op] = [O.OpenSession(s) for s in SESSIONS if s not in is_open]
        choices += [O.CloseSession(s) for s in is_open]
        self._apply(data.draw(st.sampled_from(choices), label="op"))

    @precondition(lambda self: bool(self._idle_sessions()))
    @rule(target=requests, data=st.data(), prompt=short_prompts, max_new=st.integers(1, 3))
    def session_turn(self, data: st.DataObject, prompt: list[int], max_new: int) -> str:
        assert self.h is not None
        sid = data.draw(st.sampled_from(self._idle_sessions()), label="sid")
        slot = self.h.engine.sessions.slots[sid]
        choices = self._registered() if not slot.tokens else [slot.adapter]
        adapter = data.draw(st.sampled_from(choices), label="adapter")
        return self._add(prompt, adapter, max_new, sid)

    # -- checks ---------------------------------------------------------------------------
    @invariant()
    def pools_consistent(self) -> None:
        """Every checker and the refinement check passed after every op so far."""
        if self.failed:
            raise AssertionError("invariant violated:\n" + "\n".join(f"  {v}" for v in self.failed))

    def teardown(self) -> None:
        if self.h is None or self.failed:
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


def make_machine(
    name: str = "Machine", *, network: str = "dummy", numeric: bool = False, **config_overrides: Any
) -> type[LorainvMachine]:
    """A machine class with fixed config fields (e.g. ``faults=frozenset({...})``)."""
    return type(
        name,
        (LorainvMachine,),
        {
            "network": network,
            "numeric": numeric,
            "config_overrides": config_overrides,
            "trace_name": name,
            "stats": {},
            "last_failure": None,
            "last_trace_path": None,
        },
    )
