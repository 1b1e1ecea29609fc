"""Ops/s against vLLM's real v1 scheduler and KV cache manager (the ``vllm`` target), next to
lorainv's own engine on the same ops.

One fixed, seeded workload (three adapters, shared prompt prefixes, aborts, a small KV cache
so that vLLM preempts) is applied three ways per target:

* ``apply``: the target alone (vLLM: ``schedule()`` + ``update_from_output()`` with oracle tokens);
* ``checked``: through `lorainv.targets.drive.TargetRun` -- after every op the target's model,
  every checker on a fresh snapshot and the token oracle;
* ``campaign`` (vLLM only): the Hypothesis campaign of ``lorainv fuzz --target vllm``.

Needs vLLM (``ci/install-vllm.sh``). Run ``python -m bench.vllm_target [--quick]``; writes
``bench/results/vllm_target.json``. The first vLLM import (about 20 s here) is not timed.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any

from lorainv.config import RuntimeConfig
from lorainv.ops import Abort, AddRequest, LoadAdapter, Op, Step

from . import common

NAME = "vllm_target"
CFG = RuntimeConfig(
    network="dummy",
    page_size=4,
    max_total_tokens=96,
    max_running_requests=6,
    chunked_prefill_size=16,
    max_loras_per_batch=2,
)


def workload(n_requests: int, seed: int = 0) -> list[Op]:
    """Loads, then requests on shared prefixes under mixed adapters, steps and a few aborts."""
    rng = random.Random(seed)
    ops: list[Op] = [LoadAdapter(a, f"gen:8:{i + 1}") for i, a in enumerate("abc")]
    for i in range(n_requests):
        base = rng.choice((0, 0, 1, 2)) * 100 + 1
        prompt = tuple(range(base, base + rng.choice((4, 8, 12)))) + tuple(rng.randrange(1024) for _ in range(3))
        ops.append(AddRequest(f"r{i}", prompt, rng.choice((None, "a", "b", "c")), rng.randint(1, 8)))
        ops += [Step()] * rng.randint(0, 3)
        if rng.random() < 0.1:
            ops.append(Abort(f"r{rng.randrange(i + 1)}"))
    return ops


def _time(target_name: str, ops: list[Op], checked: bool) -> dict[str, Any]:
    from lorainv.targets import make_target
    from lorainv.targets.drive import TargetRun

    target = make_target(target_name, CFG)
    run = TargetRun(target) if checked else None
    t0 = time.perf_counter()
    violations = 0
    for op in ops:
        if run is not None:
            violations += len(run.apply(op).violations)
        else:
            target.apply(op)
    steps = 0
    while not target.is_idle() and steps < 10_000:
        if run is not None:
            violations += len(run.apply(Step()).violations)
        else:
            target.apply(Step())
        steps += 1
    dt = time.perf_counter() - t0
    n = len(ops) + steps
    return {
        "target": target_name,
        "mode": "checked" if checked else "apply",
        "ops": n,
        "seconds": dt,
        "ops_per_s": n / dt,
        "violations": violations,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(NAME, __doc__)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    import vllm  # noqa: F401 - the first import is slow; keep it out of the timings

    from lorainv.targets.fuzz import coverage, run_target_campaign

    ops = workload(60 if a.quick else 400)
    rows: list[dict[str, Any]] = []
    for name in ("vllm", "lorainv"):
        for checked in (False, True):
            rows.append(_time(name, ops, checked))
    t0 = time.perf_counter()
    res = run_target_campaign(
        "vllm", max_examples=20 if a.quick else 150, seed=0, target_kw={"reload_paths": "versioned"}
    )
    dt = time.perf_counter() - t0
    rows.append(
        {
            "target": "vllm",
            "mode": "campaign",
            "ops": res.stats.ops,
            "seconds": dt,
            "ops_per_s": res.stats.ops / dt,
            "violations": int(res.found),
        }
    )
    print(
        common.table(
            ["target", "mode", "ops", "seconds", "ops/s", "violations"],
            [
                [r["target"], r["mode"], r["ops"], f"{r['seconds']:.2f}", f"{r['ops_per_s']:.0f}", r["violations"]]
                for r in rows
            ],
        )
    )
    doc = {
        "machine": common.machine(),
        "config": CFG.to_dict(),
        "rows": rows,
        "campaign_coverage": coverage(res.stats),
        "quick": a.quick,
    }
    path = common.write_json(a.out, NAME, doc)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
