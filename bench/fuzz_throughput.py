"""Fuzzer throughput: ops/s and examples/s of a clean campaign, in fast and numeric mode, with
1 and 2 workers.

* fast mode: the dummy network (fake logits; memory, scheduling and checkers only);
* numeric mode: the tiny random Llama in float64, every finished request's tokens compared
  with the same request run alone.

A *worker* is a separate process (``multiprocessing``, spawn) running
``run_campaign(shrink=False, derandomize=False)`` without faults, as a pytest-xdist worker
would. Both settings do exactly the same work — one campaign per seed of a fixed pair:

* 1 worker: one process runs the two campaigns one after the other;
* 2 workers: two processes run one campaign each, at the same time (they start together
  after a barrier, so interpreter start-up is not timed).

Throughput is total ops (and examples) over the wall time from the barrier to the last
campaign's end; the median over repeats is reported. Workers use one torch thread each.

Run ``python -m bench.fuzz_throughput [--quick]``; writes ``bench/results/fuzz_throughput.json``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bench import common

NAME = "fuzz_throughput"
MODES = {"fast": ("dummy", False), "numeric": ("tiny", True)}


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
    p.add_argument("--modes", default="fast,numeric", help="comma-separated subset of fast,numeric")
    args = p.parse_args(argv)
    n_fast = args.fast_examples or (60 if args.quick else 300)
    n_num = args.numeric_examples or (8 if args.quick else 40)
    repeats = args.repeats or (1 if args.quick else 3)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in MODES for m in modes) or min(n_fast, n_num, repeats) < 1:
        p.error("--modes takes fast,numeric; counts must be >= 1")
    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as traces:
        for mode in modes:
            n = n_fast if mode == "fast" else n_num
            for workers in (1, 2):
                results.append(measure(mode, workers, n, repeats, traces))
                print(f"  {mode} x{workers}: {results[-1].ops_per_s:.0f} ops/s", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - t0
    print(f"fuzz_throughput — clean campaigns, 2 seeds per setting ({common.MACHINE_NOTE}; shared machine)\n")
    print(render(results))
    print(
        "\n'2 workers' = two spawned processes, one campaign (seed) each, run at the same time; '1 worker' runs the"
        "\nsame two campaigns one after the other in one process. Throughput = total / wall time."
    )
    doc = {
        "quick": args.quick,
        "repeats": repeats,
        "elapsed_s": round(elapsed, 2),
        "method": "2 workers: 2 spawned processes (multiprocessing), one campaign each, same seeds as 1 worker "
        "running both sequentially; throughput = total ops / wall time from a start barrier",
        "results": [asdict(r) for r in results],
    }
    path = common.write_json(args.out, NAME, doc)
    print(f"\n{len(results)} settings in {elapsed:.1f} s; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
