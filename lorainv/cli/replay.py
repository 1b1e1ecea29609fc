"""``lorainv replay``: re-run a saved trace deterministically and judge it against its ``expect``.

Exit codes (``EXIT_*``):

====  ==================================================================================
0     clean, and the trace expects no violation (``expect`` null)
1     a violation: the one the trace's ``expect`` names reproduced, or (no ``expect``) any
2     usage error or invalid trace file (a `TraceError`, an unknown fault, a bad checker module)
3     ``expect`` not met: the trace names a violation and the replay showed a different one
      or none (a regression fixed, or the trace no longer reproduces what it was saved for)
====  ==================================================================================
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, TextIO

from lorainv.cli.common import add_checkers_arg, parse_faults, torch_threads, user_extensions

EXIT_CLEAN = 0
EXIT_VIOLATION = 1
EXIT_USAGE = 2
EXIT_EXPECT_MISMATCH = 3


def add_parser(sub: Any) -> None:
    """Add this command's subparser to ``sub``."""
    r = sub.add_parser(
        "replay",
        help="re-run a saved trace deterministically",
        description="Re-run a saved trace and check its 'expect'. Exit 0 clean, 1 the expected violation "
        "(or any, for a trace without expect), 2 usage error, 3 expect not met (another violation or none).",
    )
    r.add_argument("trace")
    r.add_argument("--verbose", action="store_true", help="also print the teardown drain steps")
    r.add_argument(
        "--faults",
        default="",
        help="comma-separated faults to enable on top of those the trace records (LORAINV_FAULTS adds too)",
    )
    add_checkers_arg(r)


def run(a: argparse.Namespace, out: TextIO) -> int:
    """Replay the trace; the exit code follows the table in this module's docstring."""
    torch_threads()
    with user_extensions(a.checkers):
        return _run(a, out)


def _run(a: argparse.Namespace, out: TextIO) -> int:
    import sys

    from lorainv.testing.replay import print_replay
    from lorainv.trace import load

    extra = parse_faults(a.faults, "replay")
    if extra is None:
        return EXIT_USAGE
    trace = load(a.trace)
    if extra - trace.config.faults:
        trace = dataclasses.replace(trace, config=trace.config.replace(faults=trace.config.faults | extra))
    from lorainv.targets.drive import trace_target

    target = trace_target(trace)[0]
    on = "" if target == "lorainv" else f", target {target}"
    expect = _fmt(trace.expect) if trace.expect else "none"
    out.write(
        f"replaying {a.trace}: {len(trace.ops)} ops, faults {sorted(trace.config.faults) or 'none'}{on}, "
        f"expect {expect}\n\n"
    )
    res = print_replay(trace, out, verbose=a.verbose)
    if trace.expect is None:
        return EXIT_VIOLATION if res.violations else EXIT_CLEAN
    if res.matches(trace.expect):
        out.write(f"\nexpected violation reproduced ({expect})\n")
        return EXIT_VIOLATION
    got = ", ".join(sorted({f"{v.pool}/{v.invariant}" for v in res.violations})) or "no violation"
    msg = f"lorainv replay: expect not met: the trace expects {expect}, the replay showed {got}\n"
    out.write("\n" + msg.removeprefix("lorainv replay: "))
    sys.stderr.write(msg)
    return EXIT_EXPECT_MISMATCH


def _fmt(expect: dict[str, str]) -> str:
    if set(expect) <= {"pool", "invariant"}:
        return "/".join(expect[k] for k in ("pool", "invariant") if k in expect)
    return ", ".join(f"{k}={v}" for k, v in expect.items())
