"""`TargetRun`: apply ops to any `Target` and check it after each one.

The loop the harness runs for lorainv's engine, restated for targets whose snapshot is
not lorainv's: after every op the target's model (``make_model``, if it has one) validates
the events, the target's own checkers (and the model's) read a fresh snapshot, and when
``capabilities.token_oracle`` holds the token oracle judges every `Decoded` against the
request's logical history (prompt + tokens decoded so far, followed through the events).
``finish()`` is the teardown: step with no new ops until idle within a bound (liveness),
then one last check of the idle snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lorainv.errors import Violation
from lorainv.events import Event
from lorainv.ops import Op, Step


@dataclass
class RunRecord:
    op: Op
    events: list[Event]
    violations: list[Violation] = field(default_factory=list)


class TargetRun:
    """Drives ``target`` (mutated by `apply` and `finish` only) and collects violations."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.checkers = target.checkers()
        self.tokens: Any = None
        if target.capabilities.token_oracle:
            from lorainv.model.token_oracle import TokenOracle

            self.tokens = TokenOracle.for_config(target.config, target.dims)
        self.model: Any = None
        make_model = getattr(target, "make_model", None)
        if make_model is not None and not target.capabilities.reference_model:
            self.model, extra = make_model()
            self.checkers += extra
        self.records: list[RunRecord] = []

    @property
    def ops(self) -> list[Op]:
        return [r.op for r in self.records]

    def check(self) -> list[Violation]:
        snap = self.target.snapshot()
        return [v for c in self.checkers for v in c.check(snap)]

    def apply(self, op: Op) -> RunRecord:
        """Apply ``op``; a crash of the target is a ``engine/crash`` violation, never an error here."""
        try:
            events = self.target.apply(op)
        except Exception as e:
            v = Violation("engine", "crash", f"{op.kind} raised {type(e).__name__}: {e}", (op.kind,))
            rec = RunRecord(op, [], [v])
            self.records.append(rec)
            return rec
        violations = self.model.observe(op, events) if self.model is not None else []
        violations += self.check()
        if self.tokens is not None:
            violations += self.tokens.observe(op, events)
        rec = RunRecord(op, events, violations)
        self.records.append(rec)
        return rec

    def finish(self, max_steps: int | None = None) -> list[Violation]:
        """Liveness: with no new ops, stepping reaches idle within ``max_steps`` (default: a
        bound from the live requests' sizes); then the idle snapshot is checked."""
        t = self.target
        if max_steps is None:
            max_steps = 64 + 8 * sum(len(r.req.all_token_ids) + r.req.max_tokens for r in _live(t))
        for _ in range(max_steps):
            if t.is_idle():
                break
            rec = self.apply(Step())
            if rec.violations:
                return rec.violations
        if not t.is_idle():
            live = tuple(r.rid for r in _live(t))
            return [Violation("requests", "liveness", f"not idle after {max_steps} steps with no new ops", live)]
        return self.check()


def _live(target: Any) -> list[Any]:
    tracked = getattr(target, "tracked", {})
    return [r for r in tracked.values() if r.state in ("waiting", "prefilling", "decoding")]


def trace_target(trace: Any) -> tuple[str, dict[str, Any]]:
    """The target a trace ran on and its constructor options: the trace's ``target`` field
    (``meta["target"]`` in traces written before it existed; "lorainv" when neither says)."""
    meta = getattr(trace, "meta", {}) or {}
    field = getattr(trace, "target", None)
    name = field if field and field != "lorainv" else meta.get("target") or "lorainv"
    opts = meta.get("target_options") or {}
    return str(name), dict(opts) if isinstance(opts, dict) else {}


def replay_on_target(trace: Any, on_record: Any = None) -> tuple[list[Violation], int | None, list[RunRecord]]:
    """Re-run ``trace`` on a fresh target of its kind through `TargetRun`, stopping at the first
    violation: (violations, index of the op that caused them or None, records)."""
    from lorainv.targets.base import make_target

    name, opts = trace_target(trace)
    run = TargetRun(make_target(name, trace.config, **opts))
    for i, op in enumerate(trace.ops):
        rec = run.apply(op)
        if on_record is not None:
            on_record(rec)
        if rec.violations:
            return rec.violations, i, run.records
    n = len(run.records)
    found = run.finish()
    if on_record is not None:
        for rec in run.records[n:]:
            on_record(rec)
    return found, None, run.records
