"""What strict level 2 (every pool checked after every op) costs per engine step.

For each mode and number of live requests, two engines that differ only in
``strict_mem_check`` (0 and 2) are driven through the same op sequence: register three
adapters, submit N requests spread over the base model and the adapters, run the prefill to
completion, then time decode steps. The timed steps alternate in blocks between the two
engines (so background load hits both alike) and both must emit identical events. The
result is the ratio of the median step times, level 2 over level 0.

* fast mode: the dummy network (fake logits), at 10, 100 and 1000 live requests;
* numeric mode: the tiny random Llama, at 10 and 100 live requests.

Run ``python -m bench.check_overhead [--quick]``; writes ``bench/results/check_overhead.json``.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from bench import common
from lorainv.config import RuntimeConfig
from lorainv.impl.engine import Engine
from lorainv.ops import AddRequest, LoadAdapter, Op, Step

ADAPTERS = (None, "a", "b", "c")
PROMPT_LEN = 8
NAME = "check_overhead"


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


def measure(case: Case, repeats: int, steps: int) -> Result:
    max_new_tokens = 4 + repeats * steps + 2  # never finishes while timed: N stays live
    e0, s0 = _prepare(case, 0, max_new_tokens)
    e2, s2 = _prepare(case, 2, max_new_tokens)
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
    )


def table(results: Sequence[Result]) -> str:
    head = f"{'mode':<8} {'network':<7} {'live':>5} {'L0 step ms':>11} {'L2 step ms':>11} {'L2/L0':>7}"
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(
            f"{r.mode:<8} {r.network:<7} {r.live:>5} {r.level0_ms:>11.3f} {r.level2_ms:>11.3f} {r.ratio:>6.2f}x"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(NAME, __doc__)
    p.add_argument("--repeats", type=int, default=None, help="timed blocks per level (default 7, quick 3)")
    p.add_argument("--steps", type=int, default=None, help="decode steps per block (default 10, quick 4)")
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
    elapsed = time.perf_counter() - t0
    print(f"check_overhead — strict level 2 vs level 0 ({common.MACHINE_NOTE})\n")
    print(table(results))
    doc = {
        "quick": args.quick,
        "repeats": args.repeats,
        "steps_per_repeat": args.steps,
        "torch_threads": args.threads,
        "elapsed_s": round(elapsed, 2),
        "results": [asdict(r) for r in results],
    }
    path = common.write_json(args.out, NAME, doc)
    print(f"\n{len(results)} cases in {elapsed:.1f} s; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
