"""``lorainv replay``: re-run a saved trace deterministically."""

from __future__ import annotations

import argparse
from typing import Any, TextIO

from lorainv.cli.common import add_checkers_arg, torch_threads, user_extensions


def add_parser(sub: Any) -> None:
    """Add this command's subparser to ``sub``."""
    r = sub.add_parser("replay", help="re-run a saved trace deterministically")
    r.add_argument("trace")
    r.add_argument("--verbose", action="store_true", help="also print the teardown drain steps")

    add_checkers_arg(r)


def run(a: argparse.Namespace, out: TextIO) -> int:
    """Replay the trace; exit 1 if it shows a violation."""
    torch_threads()
    with user_extensions(a.checkers):
        return _run(a, out)


def _run(a: argparse.Namespace, out: TextIO) -> int:
    from lorainv.trace import load, print_replay

    trace = load(a.trace)
    from lorainv.targets.drive import trace_target

    target = trace_target(trace)[0]
    on = "" if target == "lorainv" else f", target {target}"
    out.write(f"replaying {a.trace}: {len(trace.ops)} ops, faults {sorted(trace.config.faults) or 'none'}{on}\n\n")
    res = print_replay(trace, out, verbose=a.verbose)
    return 1 if res.violations else 0
