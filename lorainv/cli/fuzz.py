"""``lorainv fuzz``: a stateful fuzzing campaign against the reference model and every checker.

The campaign is split into shards (`lorainv.testing.fuzzrun`): one runs in this process;
``--workers N`` runs N in worker processes and ``--ray ADDRESS`` as Ray tasks
(`lorainv.testing.workers`). This module plans the shards, shows one progress display over
all of them, and merges their reports into the summary and the JSON report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from lorainv.cli.common import add_checkers_arg, list_faults, parse_faults, torch_threads, user_extensions


def add_parser(sub: Any) -> None:
    """Add this command's subparser to ``sub``."""
    f = sub.add_parser("fuzz", help="stateful fuzzing campaign against the reference model and every checker")
    f.add_argument("--max-examples", type=int, default=None, help="stop after this many examples")
    f.add_argument("--minutes", type=float, default=None, help="time budget (default 0.75 with no budget given)")
    f.add_argument("--seed", type=int, default=0, help="first seed of the seed stream (default 0)")
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
    f.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="worker processes on this machine, each with its own seed stream and fault slice (default 1)",
    )
    f.add_argument(
        "--ray",
        metavar="ADDRESS",
        default=None,
        help="run the shards as Ray tasks on the cluster at ADDRESS ('auto', 'ray://host:10001', or 'local' "
        "for a 2-CPU instance here); needs the ray extra; --workers sets the number of shards (default 2)",
    )
    f.add_argument(
        "--db",
        metavar="PATH|URL|none",
        default=None,
        help="Hypothesis example database: a directory, redis://host:port, or 'none' (default: "
        "$LORAINV_HYPOTHESIS_DB, else .lorainv/examples); failures saved there replay first next run",
    )
    f.add_argument(
        "--stop-on-first",
        action="store_true",
        help="stop every worker at the first violation (always so with one worker in this process)",
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
    engine_only = (
        ("--faults", a.faults),
        ("--numeric", a.numeric),
        ("--strict", a.strict),
        ("--workers", a.workers != 1),
        ("--ray", a.ray),
        ("--db", a.db),
    )
    bad = [flag for flag, on in engine_only if on]
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


STATES_NOTE = (
    "  states: distinct abstract states of the reference model (requests waiting/prefilling/decoding, adapters\n"
    "  in slots, loads in flight, open sessions, prefix marks, cached tokens up to 8); transitions: distinct\n"
    "  (state, op, next state) triples. Both count how much of the model the campaign has reached.\n"
)


def run(a: argparse.Namespace, out: TextIO) -> int:
    """Run the campaign; exit 1 with a saved, shrunk trace on a violation, 130 on Ctrl-C."""
    with user_extensions(a.checkers):
        return _run(a, out)


def _clock(seconds: float) -> str:
    s = max(0, round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Display:
    """The one progress display over every shard: a live line on a terminal, a line every
    10 s otherwise, nothing with ``--quiet``. Fed `Progress` messages (mutates its totals)."""

    def __init__(self, out: TextIO, *, live: bool, periodic: bool, budget_s: float | None, max_examples: int | None):
        self.out, self.live, self.periodic = out, live, periodic
        self.budget_s, self.max_examples = budget_s, max_examples
        self.t0 = time.monotonic()
        self.last_line = self.t0
        self.shards: dict[int, tuple[int, int, str]] = {}  # shard -> (examples, ops, mode)
        self.states: set[Any] = set()
        self.transitions: set[Any] = set()
        self.failures: set[tuple[str, str, str]] = set()

    def update(self, msg: Any) -> None:
        self.shards[msg.shard] = (msg.examples, msg.ops, msg.mode)
        self.states |= msg.new_states
        self.transitions |= msg.new_transitions
        self.failures.update(msg.new_failures)
        now = time.monotonic()
        if self.live:
            self.out.write("\r" + self.line(now) + "   ")
            self.out.flush()
        elif self.periodic and now - self.last_line >= 10:
            self.last_line = now
            self.out.write(self.line(now) + "\n")
            self.out.flush()

    def totals(self) -> tuple[int, int]:
        return sum(v[0] for v in self.shards.values()), sum(v[1] for v in self.shards.values())

    def eta(self, now: float) -> str:
        """``NN% ETA m:ss`` of the budget (time or examples, whichever ends first)."""
        el = now - self.t0
        ex, _ = self.totals()
        fractions, remaining = [], []
        if self.budget_s is not None:
            fractions.append(el / self.budget_s)
            remaining.append(self.budget_s - el)
        if self.max_examples is not None:
            fractions.append(ex / self.max_examples)
            if ex:
                remaining.append((self.max_examples - ex) * el / ex)
        pct = min(100, round(100 * max(fractions, default=0)))
        return f"{pct:>3}% ETA {_clock(min(remaining)) if remaining else '?':>5}"

    def line(self, now: float) -> str:
        ex, ops = self.totals()
        modes = {v[2] for v in self.shards.values()}
        tag = f"{len(self.shards)} workers" if len(self.shards) > 1 else (modes.pop() if modes else "")
        dt = max(now - self.t0, 1e-9)
        return (
            f"  [{tag:>9}] {self.eta(now)}  examples {ex:>6}  ops {ops:>8}  {ops / dt:>6.0f} ops/s  "
            f"states {len(self.states):>5}  transitions {len(self.transitions):>5}  violations {len(self.failures)}"
        )


def _budget_text(budget_s: float | None, max_examples: int | None, stop_first: bool) -> str:
    parts = []
    if budget_s is not None:
        until = time.strftime("%H:%M:%S", time.gmtime(time.time() + budget_s))
        amount = f"{budget_s:.0f} s" if budget_s < 120 else f"{budget_s / 60:.1f} min"
        parts.append(f"{amount} (until {until} UTC)")
    if max_examples is not None:
        parts.append(f"{max_examples} examples")
    end = "; stops at the first violation" if stop_first else "; violations are collected until the budget ends"
    return "  budget: " + " or ".join(parts) + (", whichever ends first" if len(parts) > 1 else "") + end + "\n"


def _run(a: argparse.Namespace, out: TextIO) -> int:
    if a.list_faults:
        return list_faults(out)
    if a.target != "lorainv":
        torch_threads()
        return _fuzz_target(a, out)
    faults = parse_faults(a.faults, "fuzz")
    if faults is None:
        return 2
    if _bad_budget(a):
        return 2
    if a.workers < 1:
        sys.stderr.write("lorainv fuzz: --workers must be >= 1\n")
        return 2
    from lorainv.errors import ConfigError
    from lorainv.model.policy import POLICY_CHECKS
    from lorainv.testing.exampledb import database_from_spec, db_spec, is_shared
    from lorainv.testing.workers import ray_available

    off = {p.strip() for p in a.policy_off.split(",") if p.strip()}
    if off == {"all"}:
        off = set(POLICY_CHECKS)
    if off - set(POLICY_CHECKS):
        sys.stderr.write(
            f"lorainv fuzz: unknown policy check(s) {sorted(off - set(POLICY_CHECKS))}; "
            f"choose from {list(POLICY_CHECKS)} or 'all'\n"
        )
        return 2
    if a.ray and not ray_available():
        sys.stderr.write("lorainv fuzz: --ray needs Ray: pip install 'lorainv[ray]'\n")
        return 2
    db = db_spec(a.db)
    try:
        database_from_spec(db)
    except ConfigError as e:
        sys.stderr.write(f"lorainv fuzz: {e}\n")
        return 2
    if a.ray and a.ray != "local" and not is_shared(db) and db.strip().lower() != "none":
        sys.stderr.write(
            f"lorainv fuzz: note: example database {db!r} is a directory on each Ray node; "
            "share one with --db redis://HOST:PORT\n"
        )
    torch_threads()
    policy = None if not off else frozenset(POLICY_CHECKS) - off
    budget_s = None if a.minutes is None and a.max_examples is not None else 60 * (a.minutes or 0.75)
    modes = ["numeric"] if a.numeric else ["fast"] if a.fast else ["fast", "fast", "fast", "numeric"]
    workers = a.workers if not (a.ray and a.workers == 1) else 2
    inline = workers == 1 and not a.ray
    stop_first = a.stop_on_first or inline
    from lorainv.testing.fuzzrun import LocalHooks, ShardReport, merge, pick_failures, plan_shards, run_shard

    specs = plan_shards(
        workers=workers,
        seed=a.seed,
        modes=modes,
        faults=faults,
        strict=a.strict,
        policy=policy,
        max_examples=a.max_examples,
        deadline=None if budget_s is None else time.time() + budget_s,
        shrink=not a.no_shrink,
        stop_on_first=stop_first,
        db=db,
        checkers=list(a.checkers),
    )
    backend = "ray" if a.ray else "processes" if not inline else "this process"
    n = len(specs)
    out.write(
        f"lorainv fuzz: seed {a.seed}, modes {sorted(set(modes))}, faults {sorted(faults) or 'none'}, "
        f"{n} worker{'s' if n > 1 else ''} ({backend}{' ' + a.ray if a.ray else ''}), example database {db}\n"
    )
    out.write(_budget_text(budget_s, a.max_examples, stop_first))
    if not a.quiet:
        out.write(STATES_NOTE)
    out.flush()
    live = not a.quiet and out.isatty()
    display = Display(out, live=live, periodic=not a.quiet, budget_s=budget_s, max_examples=a.max_examples)
    t0 = time.monotonic()
    if a.ray:
        from lorainv.testing.workers import run_ray

        reports, interrupted = run_ray(specs, a.ray, display.update)
    elif not inline:
        from lorainv.testing.workers import run_processes

        reports, interrupted = run_processes(specs, display.update)
    else:
        hooks = LocalHooks(display.update)
        with _ctrl_c_also_stops(hooks) as asked:
            try:
                rep = run_shard(specs[0], hooks)
            except KeyboardInterrupt:  # before the shard's own loop began (still importing or setting up)
                rep = ShardReport(shard=0, stop_reason="interrupted")
        if asked:  # a Ctrl-C whose KeyboardInterrupt was swallowed still ends the run as interrupted
            rep.stop_reason = "interrupted"
        reports, interrupted = [rep], rep.stop_reason == "interrupted"
    dt = time.monotonic() - t0
    if live:
        out.write("\n")
    total = merge(reports)
    kept = pick_failures(reports)
    if not inline:
        from lorainv.testing.workers import save_traces
        from lorainv.trace import trace_dir

        save_traces([f for f, _ in kept], trace_dir())
    if interrupted:
        out.write("\ninterrupted (Ctrl-C): the summary covers the work done until then\n")
    return _summary(a, out, total, kept, dt, n, backend, db, reports, sorted(faults), sorted(off), interrupted)


@contextlib.contextmanager
def _ctrl_c_also_stops(hooks: Any) -> Iterator[list[bool]]:
    """While inside: SIGINT also sets the shard's stop flag (polled after every example) before
    raising KeyboardInterrupt as usual. Python drops an exception raised while a garbage
    collector callback runs (Hypothesis registers one to time collections), so a Ctrl-C that
    lands in a collection used to be ignored; the flag ends the run anyway. Python reports such
    a dropped KeyboardInterrupt through ``sys.unraisablehook`` ("Exception ignored in ...",
    with a traceback): once a SIGINT arrived, that report is expected and left out; any other
    goes to the hook in force before. Yields a list that holds True once a SIGINT arrived."""
    asked: list[bool] = []
    if threading.current_thread() is not threading.main_thread():
        yield asked
        return

    def on_sigint(signum: int, frame: Any) -> None:
        asked[:] = [True]
        hooks.request_stop()
        raise KeyboardInterrupt

    def on_unraisable(report: Any) -> None:
        if not (asked and isinstance(report.exc_value, KeyboardInterrupt)):
            previous_hook(report)

    previous = signal.signal(signal.SIGINT, on_sigint)
    previous_hook = sys.unraisablehook
    sys.unraisablehook = on_unraisable
    try:
        yield asked
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = previous_hook


def _summary(
    a: argparse.Namespace,
    out: TextIO,
    total: Any,
    kept: list[Any],
    dt: float,
    n: int,
    backend: str,
    db: str,
    reports: list[Any],
    faults: list[str],
    off: list[str],
    interrupted: bool,
) -> int:
    """Print the summary, the coverage and the violations; write the JSON report; the exit code."""
    from lorainv.testing.machine import coverage_report

    rows = [
        ("examples", total.examples),
        ("ops", total.ops),
        ("ops/s", f"{total.ops / max(dt, 1e-9):.0f}"),
        ("distinct states", len(total.states)),
        ("transitions", len(total.transitions)),
        ("workers", n),
        ("wall time", f"{dt:.1f}s"),
        ("violations", len(kept)),
    ]
    out.write("\n  summary\n  " + "-" * 32 + "\n")
    for k, v in rows:
        out.write(f"  {k:<18}{v:>14}\n")
    coverage = coverage_report(total.counters)
    _write_coverage(out, coverage)
    report: dict[str, Any] = {
        "seed": a.seed,
        "faults": faults,
        "strict": a.strict,
        "policy_off": off,
        "workers": n,
        "backend": backend,
        "db": db,
        "rounds": total.rounds,
        "examples": total.examples,
        "replayed": total.replayed,
        "ops": total.ops,
        "ops_per_s": total.ops / max(dt, 1e-9),
        "states": len(total.states),
        "transitions": len(total.transitions),
        "seconds": dt,
        "stop_reason": "interrupted" if interrupted else total.stop_reason,
        "violations": len(kept),
        "coverage": coverage,
        "shards": [
            {"shard": r.shard, "examples": r.examples, "ops": r.ops, "states": len(r.states)}
            | {"seconds": r.seconds, "stop_reason": r.stop_reason, "failures": len(r.failures)}
            for r in sorted(reports, key=lambda r: r.shard)
        ],
        "failures": [
            {k: v for k, v in f.__dict__.items() if k != "trace_json"} | {"count": count} for f, count in kept
        ],
    }
    for i, (f, count) in enumerate(kept):
        if i == 0:
            report.update(
                violation=f.message,
                expect={"pool": f.pool, "invariant": f.invariant},
                trace=f.trace_path,
                trace_ops=f.trace_ops,
            )
        where = f"fault {f.fault}, {f.mode} mode, shard {f.shard}, {f.phase}"
        again = f", found {count}x" if count > 1 else ""
        out.write(f"\nVIOLATION {f.pool}/{f.invariant}: {f.message}\n  ({where}{again})\n")
        out.write(f"{'shrunk trace' if f.shrunk else 'trace (not shrunk)'}: {f.trace_ops} ops -> {f.trace_path}\n")
        out.write(f"replay with:  lorainv replay {f.trace_path}\n")
    if not kept:
        out.write("\nclean: no violation found\n")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(report, indent=1, default=str) + "\n")
    if interrupted:
        return 130
    return 1 if kept else 0


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
