"""What strict level 2 (every pool checked after every op) costs per engine step.

For each mode and number of live requests, two engines that differ only in
``strict_mem_check`` (0 and 2) are driven through the same op sequence: register three
adapters, submit N requests spread over the base model and the adapters, run the prefill to
completion, then time decode steps. The timed steps alternate in blocks between the two
engines (so background load hits both alike) and both must emit identical events. The
result is the ratio of the median step times, level 2 over level 0.

A second, steadier figure: the level-2 engine's own ``Engine.check`` calls are timed inside
those steps (``check ms``, the median), and ``1 + check/L0`` adds that to the level-0 step.
The ratio of two medians taken at different moments moves with the host's load; the check
time is measured inside the very steps it slows, so it moves less.

* fast mode: the dummy network (fake logits), at 10, 100 and 1000 live requests;
* numeric mode: the tiny random Llama, at 10 and 100 live requests.

With ``--old DIR`` (default: ``/work/base`` when it exists) the same benchmark then runs
against that tree in a subprocess (``PYTHONPATH=DIR``, this file's code) right after, and both
tables are printed and saved (``old_results``), so old and new come from the same run.

Run ``python -m bench.check_overhead [--quick]``; writes ``bench/results/check_overhead.json``.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lorainv.config import RuntimeConfig
from lorainv.impl.engine import Engine
from lorainv.ops import AddRequest, LoadAdapter, Op, Step

from . import common

ADAPTERS = (None, "a", "b", "c")
PROMPT_LEN = 8
NAME = "check_overhead"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OLD = Path("/work/base")


@dataclass(frozen=True)
class Case:
    mode: str  # "fast" | "numeric"
    network: str
    live: int


@dataclass
class Result:
    mode: str
    network: str
    live: int
    repeats: int
    steps_per_repeat: int
    level0_ms: float  # median over repeats of the per-repeat median step time
    level2_ms: float
    ratio: float
    level0_repeats_ms: list[float]
    level2_repeats_ms: list[float]
    setup_s: dict[str, float]  # wall time to reach the timed steps, per level
    check_ms: float | None = None  # median of the level-2 engine's check() calls in the timed steps
    check_share: float | None = None  # 1 + check_ms / level0_ms


def cases(quick: bool) -> list[Case]:
    del quick  # the sizes are the point of the benchmark; --quick cuts repeats and steps
    return [Case("fast", "dummy", n) for n in (10, 100, 1000)] + [Case("numeric", "tiny", n) for n in (10, 100)]


def config(case: Case, level: int, max_new_tokens: int) -> RuntimeConfig:
    n = case.live
    per_request = PROMPT_LEN + max_new_tokens + 1
    return RuntimeConfig(
        network=case.network,
        strict_mem_check=level,
        max_running_requests=n,
        max_total_tokens=n * per_request,
        chunked_prefill_size=n * PROMPT_LEN,  # one prefill round admits everyone
        max_loras_per_batch=len(ADAPTERS),
        max_lora_rank=8,
    )


def setup_ops(case: Case, max_new_tokens: int) -> list[Op]:
    ops: list[Op] = [LoadAdapter(name, f"gen:4:{i}") for i, name in enumerate(ADAPTERS) if name is not None]
    for i in range(case.live):
        prompt = tuple((i * 7 + j * 13) % 250 + 1 for j in range(PROMPT_LEN))
        ops.append(AddRequest(f"r{i}", prompt, ADAPTERS[i % len(ADAPTERS)], max_new_tokens))
    return ops


def _prepare(case: Case, level: int, max_new_tokens: int) -> tuple[Engine, float]:
    t0 = time.perf_counter()
    engine = Engine(config(case, level, max_new_tokens))
    for op in setup_ops(case, max_new_tokens):
        engine.apply(op)
    for _ in range(4):  # prefill (one round), then one decode round
        engine.apply(Step())
    running = len(engine.scheduler.running)
    if running != case.live:
        raise RuntimeError(f"{case}: {running} requests decoding after warm-up, expected {case.live}")
    return engine, time.perf_counter() - t0


def _timed_block(engine: Engine, steps: int) -> tuple[list[float], list[list[Any]]]:
    times, events = [], []
    gc.collect()
    gc.disable()
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            ev = engine.apply(Step())
            times.append(time.perf_counter() - t0)
            events.append(ev)
    finally:
        gc.enable()
    return times, events


def _time_checks(engine: Engine) -> list[float]:
    """Record the duration of every ``engine.check`` call from now on (the strict-level hook
    calls it through the instance, so an instance attribute shadows the method)."""
    took: list[float] = []
    check = engine.check

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return check(*args, **kwargs)
        finally:
            took.append(time.perf_counter() - t0)

    engine.check = timed  # type: ignore[method-assign]
    return took


def measure(case: Case, repeats: int, steps: int) -> Result:
    max_new_tokens = 4 + repeats * steps + 2  # never finishes while timed: N stays live
    e0, s0 = _prepare(case, 0, max_new_tokens)
    e2, s2 = _prepare(case, 2, max_new_tokens)
    checks = _time_checks(e2)
    med0, med2 = [], []
    for _ in range(repeats):
        t0, ev0 = _timed_block(e0, steps)
        t2, ev2 = _timed_block(e2, steps)
        if ev0 != ev2:
            raise RuntimeError(f"{case}: the two levels diverged (same ops must give the same events)")
        med0.append(statistics.median(t0) * 1e3)
        med2.append(statistics.median(t2) * 1e3)
    live = sum(1 for r in e2.requests.values() if r.state.live)
    if live != case.live:
        raise RuntimeError(f"{case}: {live} live requests at the end, expected {case.live}")
    l0, l2 = statistics.median(med0), statistics.median(med2)
    check_ms = statistics.median(checks) * 1e3 if checks else None
    return Result(
        case.mode,
        case.network,
        case.live,
        repeats,
        steps,
        round(l0, 4),
        round(l2, 4),
        round(l2 / l0, 3),
        [round(x, 4) for x in med0],
        [round(x, 4) for x in med2],
        {"level0": round(s0, 3), "level2": round(s2, 3)},
        None if check_ms is None else round(check_ms, 4),
        None if check_ms is None else round(1 + check_ms / l0, 3),
    )


def table(results: Sequence[Result]) -> str:
    head = f"{'mode':<8} {'network':<7} {'live':>5} {'L0 step ms':>11} {'L2 step ms':>11} {'L2/L0':>7}"
    head += f" {'check ms':>9} {'1+check/L0':>11}"
    rows = [head, "-" * len(head)]
    for r in results:
        check = "-" if r.check_ms is None else f"{r.check_ms:.3f}"
        share = "-" if r.check_share is None else f"{r.check_share:.2f}x"
        rows.append(
            f"{r.mode:<8} {r.network:<7} {r.live:>5} {r.level0_ms:>11.3f} {r.level2_ms:>11.3f} {r.ratio:>6.2f}x"
            f" {check:>9} {share:>11}"
        )
    return "\n".join(rows)


def run_old(tree: Path, quick: bool, repeats: int, steps: int, threads: int) -> list[dict[str, Any]]:
    """This benchmark on ``tree``'s lorainv (a subprocess with ``PYTHONPATH=tree``); its results."""
    with tempfile.TemporaryDirectory() as out:
        # a path holding only this benchmark package and the old tree's lorainv (the old tree
        # may have a bench package of its own)
        (Path(out) / "bench").symlink_to(ROOT / "bench")
        (Path(out) / "lorainv").symlink_to(tree.resolve() / "lorainv")
        env = {**os.environ, "PYTHONPATH": out}
        cmd = [sys.executable, "-m", "bench.check_overhead", "--no-old", "--out", out]
        cmd += ["--repeats", str(repeats), "--steps", str(steps), "--threads", str(threads)]
        cmd += ["--quick"] if quick else []
        subprocess.run(cmd, cwd=out, env=env, check=True, capture_output=True, timeout=3600)
        doc = json.loads((Path(out) / f"{NAME}.json").read_text())
    return list(doc["results"])


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(NAME, __doc__)
    p.add_argument("--repeats", type=int, default=None, help="timed blocks per level (default 7, quick 3)")
    p.add_argument("--steps", type=int, default=None, help="decode steps per block (default 10, quick 4)")
    p.add_argument(
        "--old", type=Path, default=DEFAULT_OLD if DEFAULT_OLD.is_dir() else None, help="old tree to compare"
    )
    p.add_argument("--no-old", action="store_true", help="measure this tree only")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 7)
    args.steps = args.steps or (4 if args.quick else 10)
    if args.repeats < 1 or args.steps < 1 or args.threads < 1:
        p.error("--repeats, --steps and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = []
    for case in cases(args.quick):
        results.append(measure(case, args.repeats, args.steps))
        print(f"  {case.mode}/{case.network} live={case.live}: done", file=sys.stderr, flush=True)
    old: list[dict[str, Any]] = []
    if args.old is not None and not args.no_old:
        old = run_old(args.old, args.quick, args.repeats, args.steps, args.threads)
    elapsed = time.perf_counter() - t0
    print(f"check_overhead — strict level 2 vs level 0 ({common.MACHINE_NOTE})\n")
    print(table(results))
    if old:
        print(f"\nold tree {args.old} (same benchmark code, run right after):")
        print(table([Result(**r) for r in old]))
    doc = {
        "quick": args.quick,
        "repeats": args.repeats,
        "steps_per_repeat": args.steps,
        "torch_threads": args.threads,
        "elapsed_s": round(elapsed, 2),
        "results": [asdict(r) for r in results],
        "old_tree": None if not old else str(args.old),
        "old_results": old,
    }
    path = common.write_json(args.out, NAME, doc)
    print(f"\n{len(results)} cases in {elapsed:.1f} s; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
