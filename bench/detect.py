"""How fast the stateful fuzzer finds each historic bug of the fault catalogue, and how short
the shrunk trace is.

For every fault and seed, two campaigns run on the fast (dummy network) machine with only
that fault enabled (``run_campaign(faults={f}, derandomize=False, seed=s)``):

* **detect** (``shrink=False``): the time and the number of examples until the first
  violation. Both are read at the moment the machine records its first failure (the
  campaign's own time also includes one re-run of the failing example for the report);
* **shrink** (``shrink=True``): the same search, then the campaign's shrinking (delta
  debugging of the trace by replay, `lorainv.testing.minimize`, the default shrinker); the
  length of the final trace (ops) and the time from the first failure to the saved trace.

Reported per fault: seeds detected, median and worst time to first failure, median and
worst examples needed, median and worst shrunk trace length. A fault not found within the
example budget counts as undetected (its censored time is kept in the JSON).

Run ``python -m bench.detect [--quick]``; writes ``bench/results/detect.json`` and ``detect.png``.
``--quick``: seed 0 only, and shrinking only for three faults that shrink fast.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from lorainv.impl.faults import FAULTS
from lorainv.testing import campaign

from . import common

NAME = "detect"
QUICK_SHRINK = ("nonresident_falls_back_to_slot0", "pinned_cache_key_collision", "stale_overlap_event")


@dataclass
class Run:
    """One campaign of one fault and seed."""

    fault: str
    seed: int
    shrink: bool
    found: bool
    first_failure_s: float | None  # from the campaign start to the first recorded violation
    examples_to_failure: int | None  # examples run up to and including the first failing one
    campaign_s: float
    trace_len: int | None  # ops in the final (shrunk when shrink=True) trace
    error: str


class _Probe:
    """Counts machine instances (one per example) and stamps the first failure."""

    def __init__(self) -> None:
        self.instances = 0
        self.first: tuple[float, int] | None = None
        self.t0 = 0.0


@contextlib.contextmanager
def _instrumented(probe: _Probe) -> Iterator[None]:
    """Make ``run_campaign`` build machines that report to ``probe`` (restored on exit)."""
    original = campaign.make_machine

    def make_machine(*args: Any, **kwargs: Any) -> Any:
        cls = original(*args, **kwargs)

        class Probed(cls):  # type: ignore[misc, valid-type]
            def __init__(self) -> None:
                probe.instances += 1
                super().__init__()

            def _fail(self, violations: Any) -> None:
                if probe.first is None:
                    probe.first = (time.monotonic() - probe.t0, probe.instances)
                super()._fail(violations)

        Probed.__name__ = cls.__name__
        return Probed

    campaign.make_machine = make_machine
    try:
        yield
    finally:
        campaign.make_machine = original


def run_one(fault: str, seed: int, budget: int, shrink: bool) -> Run:
    probe = _Probe()
    with _instrumented(probe), contextlib.redirect_stdout(io.StringIO()):  # "trace saved to ..." lines
        probe.t0 = time.monotonic()
        res = campaign.run_campaign(
            max_examples=budget, seed=seed, faults=frozenset({fault}), derandomize=False, shrink=shrink, name=fault
        )
    first_s, first_n = probe.first if probe.first is not None else (None, None)
    if res.found and first_s is None:  # a failure that bypassed the machine's recorder
        first_s, first_n = res.seconds, max(probe.instances - 1, 1)
    return Run(
        fault,
        seed,
        shrink,
        res.found,
        None if first_s is None else round(first_s, 4),
        first_n,
        round(res.seconds, 3),
        len(res.trace.ops) if res.trace is not None else None,
        res.error,
    )


def summarize(fault: str, runs: Sequence[Run]) -> dict[str, Any]:
    det = [r for r in runs if not r.shrink]
    shr = [r for r in runs if r.shrink]
    found = [r for r in det if r.found]
    times = [r.first_failure_s for r in found if r.first_failure_s is not None]
    examples = [r.examples_to_failure for r in found if r.examples_to_failure is not None]
    lens = [r.trace_len for r in shr if r.found and r.trace_len is not None]
    shrink_s = [r.campaign_s - (r.first_failure_s or 0.0) for r in shr if r.found]
    return {
        "fault": fault,
        "seeds": len(det),
        "detected": len(found),
        "median_detect_s": round(common.median(times), 3) if times else None,
        "worst_detect_s": round(max(times), 3) if times else None,
        "median_examples": common.median(examples) if examples else None,
        "worst_examples": max(examples) if examples else None,
        "shrunk_seeds": len(shr),
        "median_shrunk_len": common.median(lens) if lens else None,
        "worst_shrunk_len": max(lens) if lens else None,
        "median_shrink_s": round(common.median(shrink_s), 2) if shrink_s else None,
    }


def _f(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def render(summary: Sequence[dict[str, Any]]) -> str:
    head = ["fault", "found", "median s", "worst s", "med ex", "worst ex", "shrunk len", "worst len", "shrink s"]
    rows = [
        [
            s["fault"],
            f"{s['detected']}/{s['seeds']}",
            _f(s["median_detect_s"], ".2f"),
            _f(s["worst_detect_s"], ".2f"),
            _f(s["median_examples"], ".0f"),
            _f(s["worst_examples"], "d"),
            _f(s["median_shrunk_len"], ".0f"),
            _f(s["worst_shrunk_len"], "d"),
            _f(s["median_shrink_s"], ".1f"),
        ]
        for s in summary
    ]
    return common.table(head, rows)


def plot(summary: Sequence[dict[str, Any]], out_dir: Any, title: str) -> str | None:
    plt = common.pyplot()
    if plt is None:
        return None
    names = [s["fault"] for s in summary]
    med = [s["median_detect_s"] or 0.0 for s in summary]
    worst = [s["worst_detect_s"] or 0.0 for s in summary]
    lens = [s["median_shrunk_len"] or 0.0 for s in summary]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [2, 1]})
    y = range(len(names))
    ax1.barh([i + 0.2 for i in y], worst, height=0.4, color="#f4a582", label="worst seed")
    ax1.barh([i - 0.2 for i in y], med, height=0.4, color="#2166ac", label="median")
    ax1.set_yticks(list(y), names)
    ax1.invert_yaxis()
    ax1.set_xscale("log")
    ax1.set_xlabel("seconds to first violation (log)")
    ax1.legend(loc="lower right")
    ax1.set_title("time to first failure")
    ax2.barh(list(y), lens, color="#4d9221")
    ax2.set_yticks(list(y), [""] * len(names))
    ax2.invert_yaxis()
    ax2.set_xlabel("ops in the shrunk trace (median)")
    ax2.set_title("shrunk trace length")
    fig.suptitle(title)
    return str(common.save_png(fig, out_dir, NAME))


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(NAME, __doc__)
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 per fault (default 5, quick 1)")
    p.add_argument("--budget", type=int, default=None, help="max examples per campaign (default 2000, quick 1000)")
    p.add_argument("--faults", default="", help="comma-separated subset of the catalogue (default: all)")
    p.add_argument(
        "--shrink", default=None, help="faults to shrink: 'all', 'none' or a comma list (default all, quick 3)"
    )
    args = p.parse_args(argv)
    seeds = args.seeds or (1 if args.quick else 5)
    budget = args.budget or (1000 if args.quick else 2000)
    faults = [f.strip() for f in args.faults.split(",") if f.strip()] or list(FAULTS)
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown or seeds < 1 or budget < 1:
        p.error(f"unknown fault(s) {unknown}" if unknown else "--seeds and --budget must be >= 1")
    spec = args.shrink or (",".join(QUICK_SHRINK) if args.quick else "all")
    shrink = set(faults) if spec == "all" else set() if spec == "none" else {s.strip() for s in spec.split(",")}
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    runs: list[Run] = []
    summary = []
    with tempfile.TemporaryDirectory() as traces:
        old = os.environ.get("LORAINV_TRACE_DIR")
        os.environ["LORAINV_TRACE_DIR"] = traces  # keep the failing traces out of the repository
        try:
            for fault in faults:
                mine = []
                for seed in range(seeds):
                    mine.append(run_one(fault, seed, budget, shrink=False))
                    if fault in shrink:
                        mine.append(run_one(fault, seed, budget, shrink=True))
                runs += mine
                summary.append(summarize(fault, mine))
                s = summary[-1]
                print(f"  {fault}: {s['detected']}/{s['seeds']} found", file=sys.stderr, flush=True)
        finally:
            if old is None:
                os.environ.pop("LORAINV_TRACE_DIR", None)
            else:
                os.environ["LORAINV_TRACE_DIR"] = old
    elapsed = time.perf_counter() - t0
    print(f"detect — fuzzer power per fault ({common.MACHINE_NOTE}; {seeds} seed(s), budget {budget} examples)\n")
    print(render(summary))
    title = f"lorainv detect: {seeds} seed(s) per fault, dummy network ({common.MACHINE_NOTE})"
    args.out.mkdir(parents=True, exist_ok=True)
    png = plot(summary, args.out, title)
    doc = {
        "quick": args.quick,
        "seeds": seeds,
        "budget": budget,
        "torch_threads": args.threads,
        "elapsed_s": round(elapsed, 2),
        "method": "detect: shrink=False, time and example count at the machine's first recorded failure; "
        "shrink: shrink=True, final trace length, shrink time = campaign time - first-failure time",
        "summary": summary,
        "runs": [asdict(r) for r in runs],
        "png": png,
    }
    path = common.write_json(args.out, NAME, doc)
    found = sum(s["detected"] for s in summary)
    print(f"\n{found}/{seeds * len(faults)} (fault, seed) pairs detected in {elapsed:.1f} s; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
