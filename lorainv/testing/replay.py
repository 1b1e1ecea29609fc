"""Replaying a saved trace: a fresh engine and reference model in lockstep (the harness), op
by op, stopping at the first violation. ``lorainv replay`` and the regression tests use it.

It lives in the testing layer because it needs the harness; `lorainv.trace` holds the file
format alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from lorainv.errors import Violation
from lorainv.testing.harness import Harness
from lorainv.trace import Trace


@dataclass
class ReplayResult:
    violations: list[Violation]
    failed_at: int | None  # index of the op that caused the first violation (None: teardown or clean)
    records: list[Any]

    @property
    def ok(self) -> bool:
        return not self.violations

    def matches(self, expect: dict[str, str] | None) -> bool:
        """True when the run ends as ``expect`` says: clean for None, else a violation with those fields."""
        if expect is None:
            return self.ok
        return any(all(str(getattr(v, k, "")) == want for k, want in expect.items()) for v in self.violations)


def replay(trace: Trace, *, on_record: Callable[[Any], None] | None = None) -> ReplayResult:
    """Re-run ``trace`` on a fresh engine (of the trace's target) and model; stops at the first
    violation."""
    from lorainv.targets import make_target
    from lorainv.targets.drive import trace_target

    name, opts = trace_target(trace)
    target = None if name == "lorainv" else make_target(name, trace.config, **opts)
    policy = trace.meta.get("policy")  # the policy checks the trace was fuzzed with (absent: all)
    enabled = None if not isinstance(policy, list) else frozenset(str(p) for p in policy)
    h = Harness(trace.config, numeric=trace.numeric, target=target, policy=enabled)
    h.on_record = on_record
    for i, op in enumerate(trace.ops):
        rec = h.apply(op)
        if rec.violations:
            return ReplayResult(rec.violations, i, h.records)
    return ReplayResult(h.finish(), None, h.records)


def print_replay(trace: Trace, out: TextIO, verbose: bool = False) -> ReplayResult:
    """Replay printing each op and its events; the first violation with its offenders."""
    n_ops = len(trace.ops)

    def show(rec: Any) -> None:
        i = len(shown)
        shown.append(rec)
        tag = f"{i:>4}" if i < n_ops else "   ~"  # ~ marks the teardown drain
        if verbose or i < n_ops or rec.violations:
            out.write(f"{tag} {rec.op}\n")
            for ev in rec.events:
                out.write(f"       -> {ev}\n")

    shown: list[Any] = []
    res = replay(trace, on_record=show)
    if res.violations:
        where = f"op {res.failed_at}" if res.failed_at is not None else "teardown (liveness / idle leak check)"
        out.write(f"\nFIRST VIOLATION at {where}:\n")
        for v in res.violations:
            out.write(f"  {v}\n")
    else:
        out.write(f"\nclean: {n_ops} ops, no violation\n")
    return res
