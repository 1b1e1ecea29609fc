"""What the fairness drainer does to TTFT and end-to-end latency, in simulated time.

Workload (seeded ``numpy.random.Generator``): Poisson arrivals at 4 requests/s over 6
adapters with Zipf(1) popularity (a0 gets 41 %, a5 7 %), prompts of 16–256 tokens and
skewed output lengths (log-normal, median 96 tokens, sigma 1, clipped to 2–768). The engine
runs the dummy network (fake logits, real scheduler and pools) on a `SimClock`; after each
step the clock advances by the step's modelled cost::

    12 ms + 0.05 ms x prefill tokens + 0.3 ms x decode batch size + 30 ms x adapter loads

Requests enter at the first step boundary after their arrival; TTFT is measured from the
arrival to the end of the step that produced the first token, E2E to the end of the last.
The same workload runs with the drainer off, with the ``admission`` policy (a draining
adapter stops admitting long requests) at a 1 s threshold, and with the default ``preempt``
policy (one drain at a time, least-demand victim retracted after a quantum, the freed slot
reserved for the starving adapter) at several thresholds, for ``max_loras_per_batch``
P = 2, 3, 4. Every run must finish every request with the same tokens as the drainer-off run
and end with every checker clean (L10/L11 included).

Goal (issue #8): cut P99 TTFT by ~70 % (a field report) while keeping the median TTFT at
most 2x the no-drainer median. The table says, per P, whether some setting meets it; the
share of requests waiting over 1 s shows how many requests the drainer pushes past the
cliff (the median alone hides it when the 50th percentile sits just below the cliff).

Run ``python -m bench.drainer_ttft [--quick]``; writes ``bench/results/drainer_ttft.json``,
``drainer_ttft.png`` (TTFT CDFs) and ``drainer_ttft_headline.png`` (median and P99 TTFT per
slot count, drainer off against on). ``--replot JSON`` redraws the headline from a saved run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorainv.config import RuntimeConfig
from lorainv.events import (
    BatchFormed,
    Decoded,
    DrainCleared,
    DrainMarked,
    Finished,
    LoadCompleted,
    Retracted,
    Scheduled,
)
from lorainv.impl.clock import SimClock
from lorainv.impl.engine import Engine

from . import common

NAME = "drainer_ttft"
N_ADAPTERS = 6
RATE = 4.0
COST = {"step_s": 0.012, "prefill_token_s": 0.00005, "decode_req_s": 0.0003, "adapter_load_s": 0.030}
GOAL_P99_CUT = 0.70
GOAL_MEDIAN_RATIO = 2.0

Job = tuple[float, str, tuple[int, ...], int]  # arrival, adapter, prompt, max_new_tokens


def workload(n: int, seed: int) -> list[Job]:
    """``n`` requests: Poisson arrivals, Zipf(1) adapters, log-normal output lengths."""
    g = np.random.default_rng(seed)
    arrivals = np.cumsum(g.exponential(1.0 / RATE, n))
    w = 1.0 / np.arange(1, N_ADAPTERS + 1)
    adapters = g.choice(N_ADAPTERS, n, p=w / w.sum())
    outs = np.clip(np.round(g.lognormal(np.log(96), 1.0, n)), 2, 768).astype(int)
    lens = g.integers(16, 257, n)
    return [
        (float(arrivals[i]), f"a{adapters[i]}", tuple(int(t) for t in g.integers(1, 256, lens[i])), int(outs[i]))
        for i in range(n)
    ]


@dataclass
class Sim:
    """One simulated run: per-request latencies (seconds) and what the drainer did."""

    ttft: dict[str, float] = field(default_factory=dict)
    e2e: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, list[int]] = field(default_factory=dict)
    marks: int = 0
    preempted: int = 0  # requests retracted for a drain
    drain_s: list[float] = field(default_factory=list)
    steps: int = 0
    loads: int = 0
    sim_s: float = 0.0


def step_cost(events: Sequence[Any]) -> tuple[float, int]:
    cost, loads = COST["step_s"], 0
    for e in events:
        if isinstance(e, Scheduled):
            cost += COST["prefill_token_s"] * e.chunk_tokens
        elif isinstance(e, BatchFormed) and e.mode == "decode":
            cost += COST["decode_req_s"] * len(e.rids)
        elif isinstance(e, LoadCompleted):
            cost += COST["adapter_load_s"]
            loads += 1
    return cost, loads


def simulate(jobs: Sequence[Job], p: int, threshold: float, policy: str = "preempt") -> Sim:
    clock = SimClock()
    cfg = RuntimeConfig(
        network="dummy",
        max_loras_per_batch=p,
        max_lora_rank=8,
        max_total_tokens=1 << 17,
        max_running_requests=64,
        chunked_prefill_size=1024,
        lora_drain_wait_threshold=threshold,
        lora_drain_policy=policy,
    )
    engine = Engine(cfg, clock=clock)
    for i in range(N_ADAPTERS):
        engine.load_adapter(f"a{i}", f"gen:8:{i}")
    sim, arrival, marked = Sim(), {}, {}
    nxt = 0
    while len(sim.e2e) < len(jobs):
        while nxt < len(jobs) and jobs[nxt][0] <= clock.now():
            t, adapter, prompt, m = jobs[nxt]
            rid = engine.add_request(prompt, adapter, m, rid=f"q{nxt}")
            arrival[rid] = t
            nxt += 1
        if engine.is_idle():
            clock.advance(jobs[nxt][0] - clock.now())
            continue
        events = engine.step()
        cost, loads = step_cost(events)
        clock.advance(cost)
        now = clock.now()
        sim.steps, sim.loads = sim.steps + 1, sim.loads + loads
        for e in events:
            if isinstance(e, Decoded) and e.rid not in sim.ttft:
                sim.ttft[e.rid] = now - arrival[e.rid]
            elif isinstance(e, Finished):
                if e.reason != "length":
                    raise RuntimeError(f"P={p} threshold={threshold}: {e.rid} ended with {e.reason}: {e.detail}")
                sim.e2e[e.rid] = now - arrival[e.rid]
            elif isinstance(e, Retracted) and e.reason == "drain":
                sim.preempted += 1
            elif isinstance(e, DrainMarked):
                sim.marks += 1
                marked[e.adapter] = now
            elif isinstance(e, DrainCleared) and e.adapter in marked:
                sim.drain_s.append(now - marked.pop(e.adapter))
    violations = engine.check()
    if violations:
        raise RuntimeError(f"P={p} threshold={threshold}: checkers failed: {violations[:3]}")
    sim.outputs = {rid: engine.output(rid) for rid in arrival}
    sim.sim_s = clock.now()
    return sim


@dataclass
class Row:
    p: int
    threshold: float  # 0 = drainer off
    policy: str  # "off" | "admission" | "preempt"
    requests: int
    ttft_p50_s: float
    ttft_p99_s: float
    ttft_over_1s: float  # share of requests waiting more than 1 s for their first token
    e2e_p50_s: float
    e2e_p99_s: float
    marks: int
    preempted: int
    drain_p50_s: float | None
    drain_p90_s: float | None
    loads: int
    steps: int
    wall_s: float
    p99_cut: float = 0.0  # 1 - p99 / p99(off)
    median_ratio: float = 1.0  # p50 / p50(off)
    meets_goal: bool = False
    ttft_sorted: list[float] = field(default_factory=list, repr=False)


def run_setting(
    p: int, threshold: float, policy: str, jobs_by_seed: Sequence[list[Job]], ref: list[Sim] | None
) -> list[Sim]:
    sims = [simulate(jobs, p, threshold, policy) for jobs in jobs_by_seed]
    if ref is not None:
        for a, b in zip(sims, ref):
            if a.outputs != b.outputs:
                bad = [r for r in a.outputs if a.outputs[r] != b.outputs.get(r)]
                raise RuntimeError(f"P={p} threshold={threshold}: outputs differ from drainer off for {bad[:5]}")
    return sims


def row(p: int, threshold: float, policy: str, sims: Sequence[Sim], wall: float) -> Row:
    """Percentiles over the requests of every seed pooled."""
    ttft = [x for s in sims for x in s.ttft.values()]
    e2e = [x for s in sims for x in s.e2e.values()]
    drains = [x for s in sims for x in s.drain_s]
    return Row(
        p,
        threshold,
        policy if threshold > 0 else "off",
        len(ttft),
        round(common.percentile(ttft, 50), 4),
        round(common.percentile(ttft, 99), 3),
        round(sum(x > 1.0 for x in ttft) / len(ttft), 4),
        round(common.percentile(e2e, 50), 3),
        round(common.percentile(e2e, 99), 3),
        sum(s.marks for s in sims),
        sum(s.preempted for s in sims),
        round(common.percentile(drains, 50), 3) if drains else None,
        round(common.percentile(drains, 90), 3) if drains else None,
        sum(s.loads for s in sims),
        sum(s.steps for s in sims),
        round(wall, 1),
        ttft_sorted=sorted(round(x, 4) for x in ttft),
    )


def judge(rows: list[Row]) -> dict[int, dict[str, Any]]:
    """Fill in each row's cut and median ratio against drainer off; the per-P verdict."""
    verdict: dict[int, dict[str, Any]] = {}
    for p in sorted({r.p for r in rows}):
        off = next(r for r in rows if r.p == p and r.threshold == 0)
        ons = [r for r in rows if r.p == p and r.threshold > 0]
        for r in ons:
            r.p99_cut = round(1 - r.ttft_p99_s / off.ttft_p99_s, 3)
            r.median_ratio = round(r.ttft_p50_s / off.ttft_p50_s, 2)
            r.meets_goal = r.p99_cut >= GOAL_P99_CUT and r.median_ratio <= GOAL_MEDIAN_RATIO
        ok = [r for r in ons if r.median_ratio <= GOAL_MEDIAN_RATIO]
        best = max(ok, key=lambda r: r.p99_cut) if ok else None
        verdict[p] = {
            "goal_met": any(r.meets_goal for r in ons),
            "best_policy_within_2x_median": best.policy if best else None,
            "best_threshold_within_2x_median": best.threshold if best else None,
            "best_p99_cut_within_2x_median": best.p99_cut if best else None,
            "largest_p99_cut": max((r.p99_cut for r in ons), default=None),
        }
    return verdict


def render(rows: Sequence[Row], verdict: dict[int, dict[str, Any]]) -> str:
    head = [
        "P",
        "drainer",
        "TTFT p50",
        "TTFT p99",
        ">1 s",
        "E2E p50",
        "E2E p99",
        "p99 cut",
        "p50 x",
        "marks",
        "preempted",
    ]
    head += ["drain p50", "goal"]
    body = []
    for r in rows:
        on = r.threshold > 0
        body.append(
            [
                r.p,
                f"{r.policy} {r.threshold:g} s" if on else "off",
                f"{r.ttft_p50_s * 1e3:.0f} ms",
                f"{r.ttft_p99_s:.2f} s",
                f"{r.ttft_over_1s:.0%}",
                f"{r.e2e_p50_s:.2f} s",
                f"{r.e2e_p99_s:.2f} s",
                f"{r.p99_cut:+.0%}" if on else "-",
                f"{r.median_ratio:.2f}" if on else "-",
                r.marks,
                r.preempted,
                "-" if r.drain_p50_s is None else f"{r.drain_p50_s:.1f} s",
                ("yes" if r.meets_goal else "no") if on else "",
            ]
        )
    lines = [common.table(head, body), ""]
    for p, v in verdict.items():
        best = v["best_threshold_within_2x_median"]
        cut = v["best_p99_cut_within_2x_median"]
        detail = (
            f"best P99 cut with median <= 2x: {cut:+.0%} ({v['best_policy_within_2x_median']}, threshold {best:g} s)"
            if best
            else "no setting keeps median <= 2x"
        )
        lines.append(f"P={p}: goal {'MET' if v['goal_met'] else 'NOT met'}; {detail}")
    return "\n".join(lines)


def plot(rows: Sequence[Row], out_dir: Any, title: str) -> str | None:
    plt = common.pyplot()
    if plt is None:
        return None
    ps = sorted({r.p for r in rows})
    fig, axes = plt.subplots(1, len(ps), figsize=(5.2 * len(ps), 4.4), sharey=True, squeeze=False)
    for ax, p in zip(axes[0], ps):
        for r in (r for r in rows if r.p == p):
            xs = np.maximum(np.asarray(r.ttft_sorted), 1e-3)
            ys = np.arange(1, len(xs) + 1) / len(xs)
            label = "drainer off" if r.threshold == 0 else f"{r.policy}, threshold {r.threshold:g} s"
            style = ":" if r.policy == "admission" else "-"
            ax.step(xs, ys, where="post", label=label, lw=2.2 if r.threshold == 0 else 1.3, ls=style)
        ax.set_xscale("log")
        ax.set_title(f"max_loras_per_batch = {p}")
        ax.set_xlabel("TTFT (simulated seconds, log)")
        ax.axhline(0.99, color="grey", lw=0.6, ls=":")
        ax.axhline(0.5, color="grey", lw=0.6, ls=":")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("fraction of requests")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    return str(common.save_png(fig, out_dir, NAME))


HEADLINE_THRESHOLD = 1.0  # the drainer setting the headline shows (s)


def headline(results: Sequence[dict[str, Any]], out_dir: Any, title: str) -> str | None:
    """Median and P99 TTFT per ``max_loras_per_batch``: drainer off, ``admission`` and
    ``preempt`` at `HEADLINE_THRESHOLD`, as grouped bars with their values written on them."""
    plt = common.pyplot()
    if plt is None:
        return None
    ps = sorted({int(r["p"]) for r in results})
    series = [("drainer off", "off", 0.0), ("admission, 1 s", "admission", 1.0), ("preempt, 1 s", "preempt", 1.0)]

    def pick(p: int, policy: str, thr: float) -> dict[str, Any] | None:
        for r in results:
            off = policy == "off" and float(r["threshold"]) == 0.0
            if int(r["p"]) == p and (off or (r["policy"] == policy and float(r["threshold"]) == thr)):
                return r
        return None

    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.2))
    width = 0.8 / len(series)
    for ax, key, label in ((axes[0], "ttft_p50_s", "median TTFT (s)"), (axes[1], "ttft_p99_s", "P99 TTFT (s)")):
        for i, (name, policy, thr) in enumerate(series):
            xs, ys = [], []
            for j, p in enumerate(ps):
                r = pick(p, policy, thr)
                if r is not None:
                    xs.append(j + (i - (len(series) - 1) / 2) * width)
                    ys.append(float(r[key]))
            bars = ax.bar(xs, ys, width, label=name)
            ax.bar_label(bars, fmt="%.2g", fontsize=7, padding=1)
        ax.set_xticks(range(len(ps)), [f"P = {p}" for p in ps])
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    return str(common.save_png(fig, out_dir, f"{NAME}_headline"))


def replot(path: str, out_dir: Any) -> int:
    """Redraw the headline figure from a saved JSON report (no simulation)."""
    import json

    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    png = headline(doc["results"], out_dir, _headline_title(doc["seeds"], doc["requests_per_seed"]))
    print(f"wrote {png}" if png else "matplotlib is not installed (pip install 'lorainv[bench]')")
    return 0 if png else 1


def _headline_title(seeds: int, n: int) -> str:
    return f"TTFT with the fairness drainer off and on ({seeds} x {n} requests, simulated time)"


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(NAME, __doc__)
    p.add_argument("--replot", metavar="JSON", default=None, help="redraw the headline PNG from a saved report")
    p.add_argument("--requests", type=int, default=None, help="requests per seed (default 400, quick 200)")
    p.add_argument("--seeds", type=int, default=None, help="workload seeds 0..N-1, pooled (default 3, quick 1)")
    p.add_argument("--p", default=None, help="max_loras_per_batch values (default 2,3,4; quick 3,4)")
    p.add_argument(
        "--thresholds", default=None, help="preempt-policy wait thresholds in s (default 0.5,1,2,4; quick 1)"
    )
    p.add_argument(
        "--admission-thresholds", default=None, help="admission-policy thresholds in s (default 1; '' for none)"
    )
    args = p.parse_args(argv)
    if args.replot:
        args.out.mkdir(parents=True, exist_ok=True)
        return replot(args.replot, args.out)
    n = args.requests or (200 if args.quick else 400)
    seeds = args.seeds or (1 if args.quick else 3)
    ps = [int(x) for x in (args.p or ("3,4" if args.quick else "2,3,4")).split(",")]
    thresholds = [float(x) for x in (args.thresholds or ("1" if args.quick else "0.5,1,2,4")).split(",")]
    adm = "1" if args.admission_thresholds is None else args.admission_thresholds
    settings = [(0.0, "preempt")] + [(float(x), "admission") for x in adm.split(",") if x]  # 0: off
    settings += [(t, "preempt") for t in thresholds]
    if n < 10 or seeds < 1 or any(x < 1 for x in ps) or any(t <= 0 for t, _ in settings[1:]):
        p.error("--requests >= 10, --seeds >= 1, --p >= 1 and thresholds > 0")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    jobs = [workload(n, s) for s in range(seeds)]
    rows: list[Row] = []
    for pp in ps:
        ref = None
        for thr, policy in settings:
            w0 = time.perf_counter()
            sims = run_setting(pp, thr, policy, jobs, ref)
            ref = ref or sims
            rows.append(row(pp, thr, policy, sims, time.perf_counter() - w0))
            print(f"  P={pp} {policy} threshold={thr:g}: {rows[-1].wall_s:.1f} s", file=sys.stderr, flush=True)
    verdict = judge(rows)
    elapsed = time.perf_counter() - t0
    print(f"drainer_ttft — simulated time, dummy network ({common.MACHINE_NOTE}; {seeds} seed(s) x {n} requests)\n")
    print(render(rows, verdict))
    args.out.mkdir(parents=True, exist_ok=True)
    png = plot(rows, args.out, f"TTFT CDF, 6 adapters, Poisson 4/s, {seeds} x {n} requests (simulated time)")
    results = [{k: v for k, v in asdict(r).items() if k != "ttft_sorted"} for r in rows]
    headline_png = headline(results, args.out, _headline_title(seeds, n))
    doc = {
        "quick": args.quick,
        "requests_per_seed": n,
        "seeds": seeds,
        "rate_per_s": RATE,
        "adapters": N_ADAPTERS,
        "cost_model": COST,
        "goal": {"p99_cut": GOAL_P99_CUT, "max_median_ratio": GOAL_MEDIAN_RATIO},
        "verdict": {str(k): v for k, v in verdict.items()},
        "elapsed_s": round(elapsed, 2),
        "results": results,
        "png": png,
        "headline_png": headline_png,
    }
    path = common.write_json(args.out, NAME, doc)
    print(f"\n{len(rows)} runs in {elapsed:.1f} s; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
