"""Delta debugging of a failing trace, by replay: fewer ops, then simpler fields.

Hypothesis shrinks the op sequence it generated; its shrinker works on the choice sequence
behind the rules, so a trace whose failure needs a particular state can stay long (rules that
draw scripts, preconditions that move). This pass works on the trace itself: it replays
candidate traces (`lorainv.testing.replay.replay`) and keeps a candidate only when its first
violation has the same ``(pool, invariant)`` as the original's, so it never trades the bug it
was given for another one.

1. ``ddmin`` (Zeller and Hildebrandt's minimising delta debugging) over the op list: remove
   chunks of ops, halving the chunk size until single ops;
2. field simplification, op by op: a shorter prompt (its first tokens), token ids replaced by
   0, ``max_new_tokens`` 1, a clock step of 0.

Pure with respect to its input: it returns a new `Trace` (``meta["minimized_from"]`` records the
original length) and reads no engine state except through replay. Each replay builds a fresh
engine, so the pass is bounded by ``max_replays`` and ``budget_s``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

from lorainv.ops import AddRequest, AdvanceClock, Op
from lorainv.trace import Trace


def first_violation_key(trace: Trace) -> tuple[str, str] | None:
    """``(pool, invariant)`` of the first violation ``trace`` replays to, or None when clean."""
    from lorainv.testing.replay import replay

    res = replay(trace)
    if not res.violations:
        return None
    v = res.violations[0]
    return (v.pool, v.invariant)


@dataclasses.dataclass
class _Budget:
    max_replays: int
    deadline: float
    replays: int = 0

    def spent(self) -> bool:
        return self.replays >= self.max_replays or time.monotonic() >= self.deadline


def minimize(
    trace: Trace,
    *,
    max_replays: int = 400,
    budget_s: float = 30.0,
    fails: Callable[[Trace], bool] | None = None,
) -> Trace:
    """The smallest trace this pass finds that fails like ``trace`` (``trace`` itself when it
    does not replay to a violation, or when nothing can be removed or simplified)."""
    if fails is None:
        want = first_violation_key(trace)
        if want is None:
            return trace

        def fails(t: Trace) -> bool:
            return first_violation_key(t) == want

    budget = _Budget(max_replays, time.monotonic() + budget_s)

    def check(ops: Sequence[Op]) -> bool:
        if budget.spent():
            return False
        budget.replays += 1
        return fails(dataclasses.replace(trace, ops=tuple(ops)))

    ops = _ddmin(list(trace.ops), check)
    ops = _simplify(ops, check)
    if len(ops) == len(trace.ops) and ops == list(trace.ops):
        return trace
    meta = {**trace.meta, "minimized_from": len(trace.ops)}
    return dataclasses.replace(trace, ops=tuple(ops), meta=meta)


def _ddmin(ops: list[Op], check: Callable[[Sequence[Op]], bool]) -> list[Op]:
    """Remove chunks of ops while the failure stays (chunks halve down to one op)."""
    n = 2
    while len(ops) >= 2:
        size = max(1, len(ops) // n)
        removed = False
        start = 0
        while start < len(ops):
            candidate = ops[:start] + ops[start + size :]
            if candidate and check(candidate):
                ops = candidate
                removed = True
            else:
                start += size
        if removed:
            n = max(n - 1, 2)
        elif size == 1:
            break
        else:
            n = min(len(ops), n * 2)
    return ops


def _simpler(op: Op) -> list[Op]:
    """Simpler variants of ``op``, simplest first (an empty list: nothing to try)."""
    out: list[Op] = []
    if isinstance(op, AddRequest) and isinstance(op.prompt, tuple):
        prompt = op.prompt
        for k in range(1, len(prompt)):
            out.append(dataclasses.replace(op, prompt=prompt[:k]))
        if any(t != 0 for t in prompt if isinstance(t, int)):
            out.append(dataclasses.replace(op, prompt=tuple(0 if isinstance(t, int) else t for t in prompt)))
        if isinstance(op.max_new_tokens, int) and op.max_new_tokens > 1:
            out.append(dataclasses.replace(op, max_new_tokens=1))
    elif isinstance(op, AdvanceClock) and op.dt != 0:
        out.append(dataclasses.replace(op, dt=0.0))
    return out


def _simplify(ops: list[Op], check: Callable[[Sequence[Op]], bool]) -> list[Op]:
    """Replace each op by its first simpler variant that still fails, until none does."""
    changed = True
    while changed:
        changed = False
        for i in range(len(ops)):
            for variant in _simpler(ops[i]):
                candidate = [*ops[:i], variant, *ops[i + 1 :]]
                if check(candidate):
                    ops = candidate
                    changed = True
                    break
    return ops
