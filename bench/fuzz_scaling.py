"""Fuzz scaling: examples/s and ops/s at 1, 2, 4 workers and via Ray; time to first failure at 1 and 2 workers.

What runs is what ``lorainv fuzz --workers N`` and ``--ray local`` run: the campaign shards of
`lorainv.testing.fuzzrun` (fast mode, no faults, no example database, seed 0) through
`lorainv.testing.workers.run_processes` / `run_ray`, each configuration for the same wall-clock
budget (``--seconds``), one after the other in the same run.

* **Throughput.** ``wall``: examples and ops over the driver's wall time, worker start-up
  (spawn, imports) included, as a user sees it; ``in shards``: the sum over shards of each
  shard's ops over its own run time (start-up excluded). Speed-up is against 1 local worker;
  efficiency = speed-up / workers. The machine's core count is detected and printed: on 2 cores,
  4 workers share 2 cores, and nothing is extrapolated beyond the measured worker counts.
* **Time to first failure** for the three hardest catalogue faults (most examples to the first
  violation in ``bench/results/detect.json``; a fixed fallback when it is missing), at 1 and 2
  workers, ``--seeds`` seeds each, shrinking off, stop at the first failure. Reported: the
  first failure's time inside its shard (search time, start-up excluded), the driver's wall time
  to the end of the run (start-up included) and the examples the finding shard passed first.

Run ``python -m bench.fuzz_scaling [--quick]``; writes ``bench/results/fuzz_scaling.json``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import common

NAME = "fuzz_scaling"
FALLBACK_HARDEST = ("session_double_count", "abort_chunked_leaks_kv", "drainer_never_clears")


def hardest_faults(n: int = 3) -> tuple[list[str], str]:
    """The ``n`` catalogue faults that took the most examples to detect in the committed
    detection benchmark, and where that ranking came from."""
    path = Path(__file__).resolve().parent / "results" / "detect.json"
    try:
        rows = json.loads(path.read_text())["summary"]
        ranked = sorted(rows, key=lambda r: (-r["median_examples"], -r["median_detect_s"]))
        return [r["fault"] for r in ranked[:n]], f"{path.name}: median examples to first violation"
    except (OSError, KeyError, ValueError, TypeError):
        return list(FALLBACK_HARDEST[:n]), "fallback list (bench/results/detect.json not readable)"


def _specs(workers: int, *, deadline: float, faults: frozenset[str] = frozenset(), seed: int = 0) -> list[Any]:
    from lorainv.testing.fuzzrun import plan_shards

    return plan_shards(
        workers=workers,
        seed=seed,
        modes=["fast"],
        faults=faults,
        strict=0,
        policy=None,
        max_examples=None,
        deadline=deadline,
        shrink=False,
        stop_on_first=bool(faults),
        db="none",
        checkers=[],
    )


def _run(backend: str, specs: list[Any]) -> tuple[list[Any], float]:
    from lorainv.testing.workers import run_processes, run_ray

    t0 = time.monotonic()
    if backend == "ray":
        reports, _ = run_ray(specs, "local", lambda msg: None)
    else:
        reports, _ = run_processes(specs, lambda msg: None)
    return reports, time.monotonic() - t0


def throughput(backend: str, workers: int, seconds: float) -> dict[str, Any]:
    """One clean campaign of ``seconds`` (wall clock, start-up included) on ``workers`` shards."""
    reports, wall = _run(backend, _specs(workers, deadline=time.time() + seconds))
    examples = sum(r.examples for r in reports)
    ops = sum(r.ops for r in reports)
    return {
        "backend": backend,
        "workers": workers,
        "budget_s": seconds,
        "wall_s": round(wall, 2),
        "examples": examples,
        "ops": ops,
        "examples_per_s": round(examples / wall, 2),
        "ops_per_s": round(ops / wall, 1),
        "shard_examples_per_s": round(sum(r.examples / max(r.seconds, 1e-9) for r in reports), 2),
        "shard_ops_per_s": round(sum(r.ops / max(r.seconds, 1e-9) for r in reports), 1),
        "shard_seconds": [round(r.seconds, 2) for r in reports],
    }


def time_to_failure(fault: str, workers: int, seed: int, limit_s: float) -> dict[str, Any]:
    """Hunt ``fault`` on ``workers`` shards until the first failure (or ``limit_s``)."""
    from lorainv.testing.fuzzrun import pick_failures

    reports, wall = _run(
        "processes", _specs(workers, deadline=time.time() + limit_s, faults=frozenset({fault}), seed=seed)
    )
    found = sorted((f for f, _ in pick_failures(reports)), key=lambda f: f.seconds)
    first = found[0] if found else None
    return {
        "fault": fault,
        "workers": workers,
        "seed": seed,
        "found": first is not None,
        "ttf_s": None if first is None else round(first.seconds, 3),
        "wall_s": round(wall, 2),
        "examples_before": None if first is None else first.examples_before,
        "violation": None if first is None else f"{first.pool}/{first.invariant}",
        "examples_all_shards": sum(r.examples for r in reports),
    }


def _median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 3) if xs else None


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(NAME, __doc__)
    p.add_argument("--seconds", type=float, default=None, help="wall budget per throughput run (default 30, quick 4)")
    p.add_argument("--workers", default=None, help="local worker counts (default 1,2,4; quick 1,2)")
    p.add_argument("--ray", choices=["auto", "on", "off"], default="auto", help="Ray at 2 workers (auto: if installed)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per fault and worker count (default 3, quick 1)")
    p.add_argument("--faults", default=None, help="comma-separated faults for time to failure (default: 3 hardest)")
    p.add_argument("--limit", type=float, default=None, help="give up a failure hunt after this many s (default 120)")
    args = p.parse_args(argv)
    seconds = args.seconds or (4.0 if args.quick else 30.0)
    counts = [int(x) for x in (args.workers or ("1,2" if args.quick else "1,2,4")).split(",") if x.strip()]
    seeds = args.seeds or (1 if args.quick else 3)
    limit = args.limit or (30.0 if args.quick else 120.0)
    if args.faults:
        faults, ranking = [f.strip() for f in args.faults.split(",") if f.strip()], "--faults"
    else:
        faults, ranking = hardest_faults(1 if args.quick else 3)
    use_ray = args.ray == "on" or (args.ray == "auto" and importlib.util.find_spec("ray") is not None)
    if min(counts, default=0) < 1 or 1 not in counts or seconds <= 0 or seeds < 1:
        p.error("--workers must include 1 (the baseline); --seconds and --seeds must be positive")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local Ray instance needs no token
    cores = os.cpu_count() or 0
    t0 = time.perf_counter()

    runs = [throughput("processes", n, seconds) for n in counts]
    if use_ray:
        runs.append(throughput("ray", 2, seconds))
    base = next(r for r in runs if r["backend"] == "processes" and r["workers"] == 1)
    for r in runs:
        for kind in ("ops_per_s", "shard_ops_per_s"):
            speedup = r[kind] / base[kind] if base[kind] else float("nan")
            r[f"speedup_{kind}"] = round(speedup, 3)
            r[f"efficiency_{kind}"] = round(speedup / r["workers"], 3)
    ttf_counts = [n for n in (1, 2) if n in counts]
    ttf = [time_to_failure(f, n, s, limit) for f in faults for n in ttf_counts for s in range(seeds)]
    summary = []
    for f in faults:
        for n in ttf_counts:
            rows = [r for r in ttf if r["fault"] == f and r["workers"] == n]
            hit = [r for r in rows if r["found"]]
            summary.append(
                {
                    "fault": f,
                    "workers": n,
                    "found": f"{len(hit)}/{len(rows)}",
                    "median_ttf_s": _median([r["ttf_s"] for r in hit]),
                    "median_wall_s": _median([r["wall_s"] for r in rows]),
                    "median_examples_before": _median([r["examples_before"] for r in hit]),
                }
            )

    print(f"fuzz scaling on {common.MACHINE_NOTE} ({cores} cores: beyond {cores} workers they share cores)")
    print(f"throughput: fast mode, no faults, {seconds:.0f} s wall per configuration, start-up included in 'wall'\n")
    print(
        common.table(
            ["backend", "workers", "examples/s", "ops/s", "ops/s in shards", "speed-up", "efficiency", "in shards"],
            [
                (
                    r["backend"],
                    r["workers"],
                    f"{r['examples_per_s']:.1f}",
                    f"{r['ops_per_s']:.0f}",
                    f"{r['shard_ops_per_s']:.0f}",
                    f"{r['speedup_ops_per_s']:.2f}x",
                    f"{r['efficiency_ops_per_s']:.2f}",
                    f"{r['efficiency_shard_ops_per_s']:.2f}",
                )
                for r in runs
            ],
        )
    )
    print(f"\ntime to first failure ({ranking}), shrinking off, {seeds} seed(s), medians\n")
    print(
        common.table(
            ["fault", "workers", "found", "ttf in shard (s)", "wall to end (s)", "examples before"],
            [
                (
                    s["fault"],
                    s["workers"],
                    s["found"],
                    s["median_ttf_s"],
                    s["median_wall_s"],
                    s["median_examples_before"],
                )
                for s in summary
            ],
        )
    )
    path = common.write_json(
        args.out,
        NAME,
        {
            "quick": args.quick,
            "cores": cores,
            "seconds_per_config": seconds,
            "worker_counts": counts,
            "ray": use_ray,
            "faults": faults,
            "fault_ranking": ranking,
            "seeds": seeds,
            "limit_s": limit,
            "throughput": runs,
            "time_to_failure": ttf,
            "time_to_failure_summary": summary,
            "elapsed_s": round(time.perf_counter() - t0, 1),
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
