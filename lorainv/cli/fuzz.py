"""``lorainv fuzz``: a stateful fuzzing campaign against the reference model and every checker."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

from lorainv.cli.common import add_checkers_arg, list_faults, parse_faults, torch_threads, user_extensions


def add_parser(sub: Any) -> None:
    """Add this command's subparser to ``sub``."""
    f = sub.add_parser("fuzz", help="stateful fuzzing campaign against the reference model and every checker")
    f.add_argument("--max-examples", type=int, default=None, help="stop after this many examples")
    f.add_argument("--minutes", type=float, default=None, help="time budget (default 0.75 with no budget given)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--strict", type=int, choices=[0, 1, 2], default=0, help="engine strict_mem_check level")
    f.add_argument("--faults", default="", help="comma-separated faults to enable (see --list-faults)")
    mode = f.add_mutually_exclusive_group()
    mode.add_argument(
        "--fast",
        action="store_true",
        help="fingerprint network: paged KV fingerprints, every token checked by the token oracle",
    )
    mode.add_argument(
        "--numeric", action="store_true", help="tiny Llama in float64, tokens and logits checked by the numeric oracle"
    )
    f.add_argument("--json", metavar="REPORT", help="write a JSON report")
    f.add_argument("--list-faults", action="store_true", help="print the fault catalogue and exit")
    f.add_argument("--quiet", action="store_true", help="no live progress line")
    f.add_argument(
        "--no-shrink", action="store_true", help="save the first failing example as found, unshrunk (faster)"
    )
    f.add_argument(
        "--policy-off",
        default="",
        metavar="CHECKS",
        help="comma-separated policy checks to switch off, or 'all' (for an engine with other policies); "
        "safety checks are never switched off",
    )
    f.add_argument("--target", default="lorainv", help="engine to fuzz: lorainv (default) or vllm (ci/install-vllm.sh)")
    f.add_argument(
        "--target-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the target (repeatable), e.g. reload_paths=versioned for vllm",
    )

    add_checkers_arg(f)


def _bad_budget(a: argparse.Namespace) -> bool:
    """Whether ``--max-examples`` / ``--minutes`` are out of range (the reason goes to stderr)."""
    if a.max_examples is not None and a.max_examples < 1:
        sys.stderr.write("lorainv fuzz: --max-examples must be >= 1\n")
        return True
    if a.minutes is not None and not 0 < a.minutes < float("inf"):
        sys.stderr.write("lorainv fuzz: --minutes must be a finite number > 0\n")
        return True
    return False


def _fuzz_target(a: argparse.Namespace, out: TextIO) -> int:
    """``--target`` other than lorainv: the campaign of `lorainv.targets.fuzz` (its rules are
    the target's ops; its checkers and model are the target's)."""
    bad = [flag for flag, on in (("--faults", a.faults), ("--numeric", a.numeric), ("--strict", a.strict)) if on]
    if bad:
        sys.stderr.write(f"lorainv fuzz: {', '.join(bad)} apply to lorainv's engine only, not --target {a.target}\n")
        return 2
    if _bad_budget(a):
        return 2
    from lorainv.targets.fuzz import cmd_fuzz_target

    try:
        return cmd_fuzz_target(a, out)
    except ImportError as e:
        sys.stderr.write(f"lorainv fuzz: target {a.target!r} needs {e.name or e}; for vllm run ci/install-vllm.sh\n")
        return 2


def run(a: argparse.Namespace, out: TextIO) -> int:
    """Run the campaign; exit 1 with a saved, shrunk trace on the first violation."""
    with user_extensions(a.checkers):
        return _run(a, out)


def _run(a: argparse.Namespace, out: TextIO) -> int:
    if a.list_faults:
        return list_faults(out)
    torch_threads()
    if a.target != "lorainv":
        return _fuzz_target(a, out)
    faults = parse_faults(a.faults, "fuzz")
    if faults is None:
        return 2
    from lorainv.testing.campaign import run_campaign
    from lorainv.testing.machine import COVERAGE_COUNTERS, coverage_report

    if _bad_budget(a):
        return 2
    from lorainv.model.policy import POLICY_CHECKS

    off = {p.strip() for p in a.policy_off.split(",") if p.strip()}
    if off == {"all"}:
        off = set(POLICY_CHECKS)
    if off - set(POLICY_CHECKS):
        sys.stderr.write(
            f"lorainv fuzz: unknown policy check(s) {sorted(off - set(POLICY_CHECKS))}; "
            f"choose from {list(POLICY_CHECKS)} or 'all'\n"
        )
        return 2
    policy = None if not off else frozenset(POLICY_CHECKS) - off
    budget_s = 60 * (a.minutes if a.minutes is not None else (0.75 if a.max_examples is None else 1e9))
    modes = ["numeric"] if a.numeric else ["fast"] if a.fast else ["fast", "fast", "fast", "numeric"]
    overrides = {"strict_mem_check": a.strict} if a.strict else {}
    total: dict[str, Any] = {"examples": 0, "ops": 0, "states": set(), "transitions": set()}
    counters: dict[str, Counter[Any]] = {k: Counter() for k in COVERAGE_COUNTERS}
    t0 = time.monotonic()
    live = not a.quiet and out.isatty()
    report: dict[str, Any] = {"seed": a.seed, "faults": sorted(faults), "strict": a.strict, "rounds": []}
    report["policy_off"] = sorted(off)
    found = None
    rnd = 0
    last_line = t0
    out.write(f"lorainv fuzz: seed {a.seed}, modes {sorted(set(modes))}, faults {sorted(faults) or 'none'}\n")
    while True:
        elapsed = time.monotonic() - t0
        left = None if a.max_examples is None else a.max_examples - total["examples"]
        if elapsed >= budget_s or (left is not None and left <= 0):
            break
        mode = modes[rnd % len(modes)]
        chunk = 25 if mode == "fast" else 3  # small rounds keep the time budget tight
        chunk = chunk if left is None else max(1, min(chunk, left))

        def progress(st: dict[str, Any], mode: str = mode) -> None:
            if not live:
                return
            ex = total["examples"] + st.get("examples", 0)
            ops = total["ops"] + st.get("ops", 0)
            dt = max(time.monotonic() - t0, 1e-9)
            states = len(total["states"] | st.get("states", set()))
            trans = len(total["transitions"] | st.get("transitions", set()))
            out.write(
                f"\r  [{mode:>7}] examples {ex:>6}  ops {ops:>8}  {ops / dt:>7.0f} ops/s  "
                f"states {states:>5}  transitions {trans:>5}  violations 0   "
            )
            out.flush()

        res = run_campaign(
            max_examples=chunk,
            seed=a.seed * 1000 + rnd,
            faults=faults,
            network="tiny" if mode == "numeric" else "dummy",
            numeric=mode == "numeric",
            overrides=overrides,
            policy=policy,
            progress=progress,
            name=f"fuzz-{mode}",
            shrink=not a.no_shrink,
        )
        total["examples"] += res.examples
        total["ops"] += res.ops
        total["states"] |= res.stats.get("states", set())
        total["transitions"] |= res.stats.get("transitions", set())
        for k, c in counters.items():
            c.update(res.stats.get(k, Counter()))
        report["rounds"].append({"mode": mode, "examples": res.examples, "ops": res.ops, "seconds": res.seconds})
        rnd += 1
        if not live and not a.quiet and time.monotonic() - last_line >= 10:
            last_line = time.monotonic()
            out.write(
                f"  {time.monotonic() - t0:>5.0f}s  examples {total['examples']:>6}  ops {total['ops']:>8}  "
                f"states {len(total['states']):>5}\n"
            )
            out.flush()
        if res.found:
            found = res
            break
    dt = time.monotonic() - t0
    if live:
        out.write("\n")
    rows = [
        ("examples", total["examples"]),
        ("ops", total["ops"]),
        ("ops/s", f"{total['ops'] / max(dt, 1e-9):.0f}"),
        ("distinct states", len(total["states"])),
        ("transitions", len(total["transitions"])),
        ("wall time", f"{dt:.1f}s"),
        ("violations", 0 if found is None else 1),
    ]
    out.write("\n  summary\n  " + "-" * 32 + "\n")
    for k, v in rows:
        out.write(f"  {k:<18}{v:>14}\n")
    coverage = coverage_report(counters)
    _write_coverage(out, coverage)
    report.update(
        {
            "examples": total["examples"],
            "ops": total["ops"],
            "ops_per_s": total["ops"] / max(dt, 1e-9),
            "states": len(total["states"]),
            "transitions": len(total["transitions"]),
            "seconds": dt,
            "violations": 0 if found is None else 1,
            "coverage": coverage,
        }
    )
    if found is not None:
        assert found.trace is not None
        report["violation"] = found.trace.meta.get("message", found.error)
        report["expect"] = found.trace.expect
        report["trace"] = found.trace_path
        report["trace_ops"] = len(found.trace.ops)
        out.write(f"\nVIOLATION ({found.trace.expect}): {found.trace.meta.get('message', found.error)}\n")
        out.write(f"shrunk trace: {len(found.trace.ops)} ops -> {found.trace_path}\n")
        out.write(f"replay with:  lorainv replay {found.trace_path}\n")
    else:
        out.write("\nclean: no violation found\n")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 1 if found is not None else 0


def _write_coverage(out: TextIO, cov: dict[str, Any]) -> None:
    """The coverage counters in a few lines: what was reached, what was not."""
    variants = cov["op_variants"]
    n_ops = sum(v["accepted"] + v["rejected"] for v in variants.values())
    n_rej = sum(v["rejected"] for v in variants.values())
    reached = len(variants) - sum(1 for k in variants if k not in cov["known_op_variants"])
    n_events = len(cov["known_events"]) - len(cov["missing_events"])
    rows = [
        ("op variants", f"{reached} of {len(cov['known_op_variants'])}"),
        ("rejected ops", f"{n_rej} of {n_ops}"),
        ("event kinds", f"{n_events} of {len(cov['known_events'])}"),
    ]
    out.write("\n  coverage\n  " + "-" * 32 + "\n")
    for k, v in rows:
        out.write(f"  {k:<18}{v:>14}\n")
    for k, v in cov["rare"].items():
        out.write(f"  {k:<32}{v:>6}\n")
    for what in ("missing_op_variants", "missing_events"):
        if cov[what]:
            shown = cov[what][:12]
            more = f" (+{len(cov[what]) - 12} more)" if len(cov[what]) > 12 else ""
            out.write(f"  never reached: {', '.join(shown)}{more}\n")
