"""Lockstep driver of one `Engine` and one `ReferenceModel`: the single code path shared by
the Hypothesis machine, ``lorainv replay`` and ``lorainv fuzz``, so a saved trace replays
exactly as it failed.

After every op: the model validates the events (refinement), every per-pool checker and
the refinement checker read a fresh snapshot, and in fast mode the token oracle judges every
decoded token against the request's logical history. ``finish()`` is the teardown: complete all
transfers, step to idle within a bound (liveness), run the idle leak check, and in numeric
mode hold every request's tokens and logit rows to the independent float64 forward of
`lorainv.testing.numeric_oracle` (never to the engine itself).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lorainv.checkers import all_checkers, checker_names, run_checks
from lorainv.checkers.refinement import RefinementChecker
from lorainv.config import RuntimeConfig
from lorainv.errors import InvariantViolation, LorainvError, Violation
from lorainv.events import Event
from lorainv.model.reference import ReferenceModel
from lorainv.model.token_oracle import TokenOracle
from lorainv.ops import AddRequest, CompleteTransfers, LoadAdapter, Op, Step, UnloadAdapter
from lorainv.testing.numeric_oracle import LogitsRecorder, NumericOracle, check_numerics


@dataclass
class OpRecord:
    op: Op
    events: list[Event]
    violations: list[Violation] = field(default_factory=list)


class Harness:
    """Applies ops to an engine and a model in lockstep and collects violations."""

    def __init__(
        self,
        cfg: RuntimeConfig,
        *,
        numeric: bool = False,
        model: Any = None,
        tokens: bool | None = None,
        policy: frozenset[str] | None = None,
        target: Any = None,
    ) -> None:
        """``tokens``: judge every `Decoded` with the token oracle; None (default) does so exactly
        when the engine runs the fingerprint network (fast mode), whose tokens the oracle predicts.
        ``policy``: the policy checks to run (names from `POLICY_CHECKS`); None runs them all.
        ``target``: None or "lorainv" (lorainv's engine, as always), another target's name
        (`lorainv.targets.make_target`) or a `Target`; any other target runs through
        `lorainv.targets.drive.TargetRun` (its own model and checkers, the token oracle)."""
        from lorainv.impl.engine import Engine
        from lorainv.impl.fingerprint_net import FingerprintNetwork

        self.cfg = cfg
        self._run: Any = None
        if target is not None and getattr(target, "name", target) != "lorainv":
            self._init_target(cfg, target, numeric)
            return
        self.engine = Engine(cfg, model=model)
        net = self.engine.network
        self.model = ReferenceModel(cfg, vocab_size=net.vocab_size, max_context_len=net.max_context_len, policy=policy)
        if tokens is None:
            tokens = isinstance(self.engine.network, FingerprintNetwork)
        self.tokens = TokenOracle.for_config(cfg, self.engine.network.dims) if tokens else None
        self.checkers = all_checkers([RefinementChecker(self.model)])
        # the checkers the engine's strict hook does not run itself (it runs every default one)
        self.beyond_default = [c for c in self.checkers if c.name not in set(checker_names())]
        self.numeric = numeric
        self.records: list[OpRecord] = []
        self.sources: dict[str, str] = {}  # adapter name -> source, as registered now
        self.request_sources: dict[str, str | None] = {}  # rid -> adapter source at submission
        self.history: dict[str, tuple[int, ...]] = {}  # rid -> session history at submission
        self.on_record: Callable[[OpRecord], None] | None = None
        # -- numeric mode (H2): record every forward's logits, tagged with the op it ran under
        self.recorder: LogitsRecorder | None = None
        if numeric:
            self.recorder = LogitsRecorder(self.engine.network, lambda: len(self.records))
            self.engine.network = self.recorder

    def _init_target(self, cfg: RuntimeConfig, target: Any, numeric: bool) -> None:
        from lorainv.errors import ConfigError
        from lorainv.targets import make_target
        from lorainv.targets.drive import TargetRun

        if numeric:
            raise ConfigError("numeric mode needs lorainv's engine (it records the engine's logits)")
        t: Any = make_target(target, cfg) if isinstance(target, str) else target
        self._run = TargetRun(t)
        self.engine = t
        self.model = self._run.model
        self.tokens = self._run.tokens
        self.checkers = self._run.checkers
        self.numeric = False
        self.records = []
        self.sources, self.request_sources, self.history = {}, {}, {}
        self.on_record = None
        self.recorder = None

    @property
    def ops(self) -> list[Op]:
        return [r.op for r in self.records]

    def apply(self, op: Op) -> OpRecord:
        """Apply ``op``; the record carries its events and any violation it caused.

        At strict level 2 the engine's hook has already snapshotted and checked (with every
        default checker) the state this op left: that snapshot is reused, and only the
        checkers beyond the defaults (refinement) run on it."""
        if self._run is not None:
            got = self._run.apply(op)
            rec = OpRecord(got.op, got.events, got.violations)
            self._push(rec)
            return rec
        eng = self.engine
        hist: tuple[int, ...] = ()
        if isinstance(op, AddRequest) and op.session_id is not None:
            slot = eng.sessions.slots.get(op.session_id)
            hist = slot.tokens if slot is not None else ()
        try:
            events = eng.apply(op)
        except InvariantViolation as e:
            rec = OpRecord(op, [], list(e.violations))
            self._push(rec)
            return rec
        except Exception as e:  # a crash of the runtime is a finding, never an error of the harness
            v = Violation("engine", "crash", f"{op.kind} raised {type(e).__name__}: {e}", (op.kind,))
            rec = OpRecord(op, [], [v])
            self._push(rec)
            return rec
        rejected = any(ev.kind == "Rejected" for ev in events)
        if not rejected:
            if isinstance(op, LoadAdapter):
                self.sources[op.name] = op.source
            elif isinstance(op, UnloadAdapter):
                self.sources.pop(op.name, None)
            elif isinstance(op, AddRequest):
                self.request_sources[op.rid] = None if op.adapter is None else self.sources.get(op.adapter)
                self.history[op.rid] = hist
        violations = self.model.observe(op, events)
        checked = eng.last_checked_snapshot
        if checked is None:
            violations += run_checks(eng.snapshot(), self.checkers)
        else:  # strict level 2: the engine's hook just found this very snapshot clean under every default checker
            violations += run_checks(checked, self.beyond_default)
        if self.tokens is not None:
            violations += self.tokens.observe(op, events)
        rec = OpRecord(op, events, violations)
        self._push(rec)
        return rec

    def _push(self, rec: OpRecord) -> None:
        self.records.append(rec)
        if self.on_record is not None:
            self.on_record(rec)

    def finish(self, max_steps: int | None = None) -> list[Violation]:
        """Teardown: liveness (drain to idle within a bound), idle leak check, numerics."""
        if self._run is not None:
            n = len(self._run.records)
            found: list[Violation] = self._run.finish(max_steps)
            for got in self._run.records[n:]:
                self._push(OpRecord(got.op, got.events, got.violations))
            return found
        eng = self.engine
        if max_steps is None:
            live = [r for r in eng.requests.values() if r.state.live]
            max_steps = 64 + 8 * sum(len(r.fill) + r.max_new_tokens for r in live)
        for _ in range(max_steps):
            if eng.is_idle():
                break
            # land (and reap) outstanding loads first; with none, a CompleteTransfers is a
            # no-op whose full check the following Step's check repeats, so it is skipped
            transfers = eng.device.pending() > 0 or (eng.loader is not None and bool(eng.loader.in_flight()))
            for op in (CompleteTransfers(None), Step()) if transfers else (Step(),):
                rec = self.apply(op)
                if rec.violations:
                    return rec.violations
        if not eng.is_idle():
            stalled = tuple(r.rid for r in eng.requests.values() if r.state.live)
            return [
                Violation("requests", "liveness", f"not idle after {max_steps} steps with no new ops; stalled", stalled)
            ]
        snap = eng.snapshot()
        out = run_checks(snap, self.checkers)
        if not out:
            out = memo_violations(eng, snap)
        if not out and self.numeric:
            out = self.numeric_violations()
        return out

    def numeric_violations(self) -> list[Violation]:
        """Every request's emitted tokens (N1) and every logit row the engine computed for it (N2)
        against the independent float64 forward of `lorainv.testing.numeric_oracle` (tolerance
        ``LOGIT_ATOL``/``LOGIT_RTOL`` there). Reads only the records and the recorded logits."""
        if self.recorder is None:
            return []
        return check_numerics(self.records, self.recorder.forwards, NumericOracle.for_network(self.recorder))


def memo_violations(engine: Any, memo: Any = None) -> list[Violation]:
    """The snapshot as the checkers got it (through the snapshotter's memos; ``memo``, or one
    taken now) must equal one taken with every memo empty; a stale memo would hide a change from
    every checker. Only the fields a memo can feed are compared (`MEMOIZED_FIELDS`)."""
    from lorainv.impl.snapshotter import MEMOIZED_FIELDS, fresh_snapshot
    from lorainv.snapshot import canonical

    if memo is None:
        memo = engine.snapshot()
    fresh = fresh_snapshot(engine)
    fields = [f for f in MEMOIZED_FIELDS if canonical(getattr(memo, f)) != canonical(getattr(fresh, f))]
    if not fields:
        return []
    return [Violation("snapshot", "memo", f"a memoized snapshot differs from a fresh one in {fields}", tuple(fields))]


def is_refusal(exc: BaseException) -> bool:
    return isinstance(exc, LorainvError) and not isinstance(exc, InvariantViolation)
