"""Fuzzer throughput, measured two ways.

**As users run it (the headline, issue 14):** ``lorainv fuzz --fast --max-examples N --seed S
--strict L --json R`` in a subprocess, reading ``ops_per_s`` from its JSON report (one worker;
wall time from after the imports to the end of the last round, so interpreter and torch
start-up are excluded, as in the CLI itself) and the child's user+system CPU seconds per op
beyond a base run of the same command at ``--max-examples 1`` on the same tree (so each tree's
own start-up is subtracted, not a guess at it). With ``--old DIR`` (default: ``/work/base`` when
it exists) the same command also runs against that tree (``PYTHONPATH=DIR``), alternating
old/new for ``--pairs`` pairs, same seed and budget, at each ``--strict`` level. The two trees
may run different op mixes (ops per example differ), so compare ops/s and CPU ms/op, not
wall time. The machine is shared: the medians of the pairs are reported.

**The ceiling:** at ``--strict 0`` each pair also runs this tree through `bench.fuzz_ceiling`,
the same command with every oracle switched off (snapshot, checkers, reference model, token
oracle). It applies the very same ops (checked: equal op counts), so its ops/s is the most any
cheaper oracle could give; the rest is Hypothesis and the engine under test. ``--no-ceiling``
skips it.

**In-process campaigns** (the earlier measure): ops/s and examples/s of a clean campaign, in
fast and numeric mode, with 1 and 2 workers:

* fast mode: the fingerprint network (tokens checked by the token oracle);
* numeric mode: the tiny random Llama in float64, checked against the numeric oracle.

A *worker* is a separate process (``multiprocessing``, spawn) running
``run_campaign(shrink=False, derandomize=False)`` without faults, as a pytest-xdist worker
would. Both settings do exactly the same work — one campaign per seed of a fixed pair:

* 1 worker: one process runs the two campaigns one after the other;
* 2 workers: two processes run one campaign each, at the same time (they start together
  after a barrier, so interpreter start-up is not timed).

Throughput is total ops (and examples) over the wall time from the barrier to the last
campaign's end; the median over repeats is reported. Workers use one torch thread each.
This differs from the CLI path in three ways: one ``run_campaign`` per seed instead of the
CLI's rounds of 25 examples, no shrinking phase set-up, and the imports are warmed first.

Run ``python -m bench.fuzz_throughput [--quick]``; writes ``bench/results/fuzz_throughput.json``.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import common

NAME = "fuzz_throughput"
MODES = {"fast": ("dummy", False), "numeric": ("tiny", True)}
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OLD = Path("/work/base")


@dataclass
class CliRun:
    tree: str  # "new" (this checkout), "old" (--old) or "ceiling" (this checkout, every oracle off)
    strict: int
    examples: int
    ops: int
    ops_per_s: float  # the report's own figure
    cpu_s: float  # the child's user + system CPU seconds (start-up included)
    # (cpu_s - base CPU) / (ops - base ops): the campaign's own CPU per op; None when the budget
    # is too small for the difference to rise above the noise (it came out <= 0)
    cpu_ms_per_op: float | None
    startup_cpu_s: float  # CPU of the tree's base run: the same command at --max-examples 1
    startup_ops: int  # ops of that base run


CEILING = "ceiling"  # the tree name of this checkout run through bench.fuzz_ceiling


def run_cli(
    tree: Path, strict: int, examples: int, seed: int, work: str, module: str = "lorainv.cli"
) -> tuple[int, float, float]:
    """One ``lorainv fuzz --fast`` subprocess on ``tree`` (through ``module``: the CLI, or
    `bench.fuzz_ceiling`); returns (ops, report ops/s, CPU seconds)."""
    report = Path(work) / f"fuzz-{os.getpid()}.json"
    env = {**os.environ, "PYTHONPATH": str(tree), "LORAINV_TRACE_DIR": work, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", module, "fuzz", "--fast", "--max-examples", str(examples)]
    cmd += ["--seed", str(seed), "--strict", str(strict), "--json", str(report), "--quiet"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=3600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"lorainv fuzz on {tree} exited {proc.returncode}: {proc.stderr[-2000:]}")
    doc = json.loads(report.read_text())
    if doc.get("violations"):
        raise RuntimeError(f"clean fuzz on {tree} found a violation: {doc.get('violation')}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return int(doc["ops"]), float(doc["ops_per_s"]), cpu


def base_run(tree: Path, strict: int, seed: int, work: str, module: str = "lorainv.cli") -> tuple[int, float]:
    """(ops, CPU seconds) of the same command at ``--max-examples 1`` on ``tree``.

    Subtracted from each run, it removes start-up (interpreter, each tree's own imports, which
    differ: a lazily importing CLI pays less than ``import lorainv.cli`` does) and the one-off
    campaign set-up, so that what is left is the cost of the extra examples alone."""
    ops, _, cpu = run_cli(tree, strict, 1, seed, work, module)
    return ops, cpu


def per_op_ms(cpu: float, ops: int, base: tuple[int, float]) -> float | None:
    """Campaign CPU ms per op beyond the base run, or None when the difference is not positive."""
    d_ops, d_cpu = ops - base[0], cpu - base[1]
    return round(1000 * d_cpu / d_ops, 3) if d_ops > 0 and d_cpu > 0 else None


def measure_cli(
    trees: dict[str, Path], levels: Sequence[int], examples: int, pairs: int, seed: int, work: str
) -> list[CliRun]:
    """Every tree at every level, ``pairs`` times, alternating trees within each pair. A tree
    named `CEILING` runs through `bench.fuzz_ceiling`, at level 0 only, and must apply as many
    ops as "new" (the same op stream, judged by nothing)."""
    out = []
    for strict in levels:
        here = {name: tree for name, tree in trees.items() if name != CEILING or strict == 0}
        module = {name: "bench.fuzz_ceiling" if name == CEILING else "lorainv.cli" for name in here}
        start = {name: base_run(tree, strict, seed, work, module[name]) for name, tree in here.items()}
        for _ in range(pairs):
            for name, tree in here.items():
                ops, rate, cpu = run_cli(tree, strict, examples, seed, work, module[name])
                if name == CEILING and "new" in here and ops != out[-1].ops:
                    raise RuntimeError(f"the ceiling applied {ops} ops, the CLI {out[-1].ops}: not the same op stream")
                out.append(
                    CliRun(
                        name,
                        strict,
                        examples,
                        ops,
                        round(rate, 1),
                        round(cpu, 2),
                        per_op_ms(cpu, ops, start[name]),
                        round(start[name][1], 2),
                        start[name][0],
                    )
                )
                print(
                    f"  cli {name} strict {strict}: {rate:.0f} ops/s, {out[-1].cpu_ms_per_op} CPU ms/op",
                    file=sys.stderr,
                    flush=True,
                )
    return out


def render_cli(runs: Sequence[CliRun]) -> tuple[str, list[dict[str, Any]]]:
    """A table of medians per (strict, tree), with new/old ratios; also returned as rows."""
    rows, summary = [], []
    for strict in sorted({r.strict for r in runs}):
        med: dict[str, tuple[float, float | None]] = {}
        for tree in ("old", "new", CEILING):
            mine = [r for r in runs if r.strict == strict and r.tree == tree]
            if mine:
                cpus = [r.cpu_ms_per_op for r in mine if r.cpu_ms_per_op is not None]
                med[tree] = (common.median([r.ops_per_s for r in mine]), common.median(cpus) if cpus else None)
        for tree, (rate, cpu) in med.items():
            ratio = rate / med["old"][0] if "old" in med else None
            old_cpu = med["old"][1] if "old" in med else None
            cpu_ratio = old_cpu / cpu if old_cpu is not None and cpu is not None else None
            rows.append(
                [
                    strict,
                    tree,
                    f"{rate:.0f}",
                    "-" if cpu is None else f"{cpu:.3f}",
                    "-" if ratio is None else f"{ratio:.2f}x",
                    "-" if cpu_ratio is None else f"{cpu_ratio:.2f}x",
                ]
            )
            summary.append(
                {
                    "strict": strict,
                    "tree": tree,
                    "ops_per_s": round(rate, 1),
                    "cpu_ms_per_op": cpu,
                    "vs_old_ops_per_s": None if ratio is None else round(ratio, 3),
                    "vs_old_cpu": None if cpu_ratio is None else round(cpu_ratio, 3),
                }
            )
    head = ["strict", "tree", "ops/s (median)", "CPU ms/op", "ops/s vs old", "CPU vs old"]
    return common.table(head, rows), summary


@dataclass
class Measure:
    mode: str
    workers: int
    repeats: int
    examples_per_campaign: int
    seeds: list[int]
    ops_per_s: float  # median over repeats
    examples_per_s: float
    wall_s: float
    ops: int  # per repeat (the same work in every repeat and worker count)
    examples: int
    repeat_ops_per_s: list[float]


def _campaign(mode: str, seed: int, examples: int) -> tuple[int, int, float]:
    from lorainv.testing.campaign import run_campaign

    network, numeric = MODES[mode]
    t0 = time.perf_counter()
    res = run_campaign(
        max_examples=examples, seed=seed, network=network, numeric=numeric, shrink=False, name=f"tp-{mode}"
    )
    if res.found:
        raise RuntimeError(f"clean {mode} campaign (seed {seed}) found a violation: {res.error}")
    return res.ops, res.examples, time.perf_counter() - t0


def _worker(mode: str, seeds: list[int], examples: int, barrier: Any, queue: Any, trace_dir: str) -> None:
    import torch

    torch.set_num_threads(1)
    os.environ["LORAINV_TRACE_DIR"] = trace_dir
    _campaign(mode, 10_000 + seeds[0], 2)  # warm the imports and the first compilations
    barrier.wait()
    t0 = time.perf_counter()
    ops = exs = 0
    for s in seeds:
        o, e, _ = _campaign(mode, s, examples)
        ops, exs = ops + o, exs + e
    queue.put((ops, exs, t0, time.perf_counter()))


def run_workers(mode: str, seeds: list[int], workers: int, examples: int, trace_dir: str) -> tuple[int, int, float]:
    """Split ``seeds`` over ``workers`` processes; returns (ops, examples, wall seconds)."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(workers), ctx.Queue()
    parts = [seeds[i::workers] for i in range(workers)]
    procs = [ctx.Process(target=_worker, args=(mode, part, examples, barrier, queue, trace_dir)) for part in parts]
    for pr in procs:
        pr.start()
    results = [queue.get(timeout=1800) for _ in procs]
    for pr in procs:
        pr.join()
        if pr.exitcode != 0:
            raise RuntimeError(f"worker exited with {pr.exitcode}")
    start = min(r[2] for r in results)
    end = max(r[3] for r in results)
    return sum(r[0] for r in results), sum(r[1] for r in results), end - start


def measure(mode: str, workers: int, examples: int, repeats: int, trace_dir: str) -> Measure:
    seeds = [1, 2]
    rates, ex_rates, walls = [], [], []
    ops = exs = 0
    for _ in range(repeats):
        ops, exs, wall = run_workers(mode, seeds, workers, examples, trace_dir)
        rates.append(ops / wall)
        ex_rates.append(exs / wall)
        walls.append(wall)
    return Measure(
        mode,
        workers,
        repeats,
        examples,
        seeds,
        round(common.median(rates), 1),
        round(common.median(ex_rates), 2),
        round(common.median(walls), 2),
        ops,
        exs,
        [round(r, 1) for r in rates],
    )


def render(results: Sequence[Measure]) -> str:
    one = {r.mode: r for r in results if r.workers == 1}
    rows = []
    for r in results:
        base = one.get(r.mode)
        speedup = f"{r.ops_per_s / base.ops_per_s:.2f}x" if base is not None else "-"
        rates = [f"{r.ops_per_s:.0f}", f"{r.examples_per_s:.1f}", speedup]
        rows.append([r.mode, r.workers, r.examples, r.ops, f"{r.wall_s:.1f}", *rates])
    head = ["mode", "workers", "examples", "ops", "wall s", "ops/s", "examples/s", "vs 1 worker"]
    return common.table(head, rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(NAME, __doc__)
    p.add_argument("--fast-examples", type=int, default=None, help="examples per campaign (default 300, quick 60)")
    p.add_argument("--numeric-examples", type=int, default=None, help="examples per campaign (default 40, quick 8)")
    p.add_argument("--repeats", type=int, default=None, help="repeats per setting (default 3, quick 1)")
    p.add_argument("--modes", default="fast,numeric", help="comma-separated subset of fast,numeric ('' for none)")
    p.add_argument("--cli-examples", type=int, default=None, help="lorainv fuzz --max-examples (default 200, quick 20)")
    p.add_argument("--pairs", type=int, default=None, help="old/new pairs per strict level (default 3, quick 1)")
    p.add_argument("--strict", default=None, help="strict levels for the CLI runs (default 0,2; quick 0)")
    p.add_argument("--seed", type=int, default=1, help="lorainv fuzz --seed (default 1)")
    p.add_argument(
        "--old", type=Path, default=DEFAULT_OLD if DEFAULT_OLD.is_dir() else None, help="old tree to compare"
    )
    p.add_argument("--no-cli", action="store_true", help="skip the lorainv fuzz subprocess runs")
    p.add_argument("--no-ceiling", action="store_true", help="skip the every-oracle-off runs (bench.fuzz_ceiling)")
    args = p.parse_args(argv)
    n_fast = args.fast_examples or (60 if args.quick else 300)
    n_num = args.numeric_examples or (8 if args.quick else 40)
    repeats = args.repeats or (1 if args.quick else 3)
    n_cli = args.cli_examples or (20 if args.quick else 200)
    pairs = args.pairs or (1 if args.quick else 3)
    levels = [int(x) for x in (args.strict or ("0" if args.quick else "0,2")).split(",") if x.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in MODES for m in modes) or min(n_fast, n_num, repeats, n_cli, pairs) < 1:
        p.error("--modes takes fast,numeric; counts must be >= 1")
    if any(lv not in (0, 1, 2) for lv in levels):
        p.error("--strict takes levels 0, 1, 2")
    t0 = time.perf_counter()
    results = []
    cli: list[CliRun] = []
    trees = {"old": args.old.resolve()} if args.old is not None else {}
    trees["new"] = ROOT
    if not args.no_ceiling:
        trees[CEILING] = ROOT  # run right after "new" in each pair
    with tempfile.TemporaryDirectory() as traces:
        if not args.no_cli:
            cli = measure_cli(trees, levels, n_cli, pairs, args.seed, traces)
        for mode in modes:
            n = n_fast if mode == "fast" else n_num
            for workers in (1, 2):
                results.append(measure(mode, workers, n, repeats, traces))
                print(f"  {mode} x{workers}: {results[-1].ops_per_s:.0f} ops/s", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - t0
    summary: list[dict[str, Any]] = []
    print(f"fuzz_throughput ({common.MACHINE_NOTE}; shared machine)\n")
    if cli:
        table, summary = render_cli(cli)
        print(f"lorainv fuzz --fast --max-examples {n_cli} --seed {args.seed}, one worker, {pairs} pair(s), medians:")
        print(table)
        print(
            "ops/s: the report's ops_per_s (wall, after imports); CPU ms/op: the child's user+system CPU minus that"
            "\nof the same command at --max-examples 1 on the same tree, over the extra ops ('-': below the noise)."
            f"\n old = {trees.get('old', '-')}, new = {ROOT}; run alternately. ceiling (strict 0 only): new with"
            "\n every oracle off (bench.fuzz_ceiling), the same ops: the most a cheaper oracle could give.\n"
        )
    if results:
        print("in-process campaigns, 2 seeds per setting:")
        print(render(results))
        print(
            "\n'2 workers' = two spawned processes, one campaign (seed) each, run at the same time; '1 worker' runs"
            "\nthe same two campaigns one after the other in one process. Throughput = total / wall time."
        )
    doc = {
        "quick": args.quick,
        "repeats": repeats,
        "elapsed_s": round(elapsed, 2),
        "method": "2 workers: 2 spawned processes (multiprocessing), one campaign each, same seeds as 1 worker "
        "running both sequentially; throughput = total ops / wall time from a start barrier",
        "results": [asdict(r) for r in results],
        "cli_method": "lorainv fuzz --fast subprocesses, old (PYTHONPATH=old tree) and new alternating, same seed and "
        "budget; ops_per_s from the JSON report, CPU from getrusage(RUSAGE_CHILDREN)",
        "cli_runs": [asdict(r) for r in cli],
        "cli_summary": summary,
    }
    path = common.write_json(args.out, NAME, doc)
    print(f"\n{len(results) + len(cli)} runs in {elapsed:.1f} s; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
