"""Shared plumbing for the benchmarks: the command line, machine facts, tables, JSON and PNG output.

Every benchmark takes ``--quick`` and ``--out DIR``, prints a table, and writes
``DIR/<name>.json`` (and, where a picture helps, ``DIR/<name>.png``). ``--out`` defaults to
``bench/results`` in a source checkout (the committed results), or ``./bench-results`` when the
benchmarks run from an installed wheel; a ``--quick`` run defaults to :func:`quick_dir`, a
temporary directory, so it never overwrites committed results.

The machine is detected at run time (:func:`machine`, :data:`MACHINE_NOTE`), never written in.
Nothing here measures anything; it only records where and how a measurement was taken.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorainv import __version__

_HERE = Path(__file__).resolve().parent
# A source checkout keeps its committed results next to the benchmarks; an installed wheel has
# no results directory, and site-packages is no place to write one.
RESULTS_DIR = _HERE / "results" if (_HERE / "results").is_dir() else Path("bench-results")


def quick_dir() -> Path:
    """Where ``--quick`` runs write by default: ``$TMPDIR/lorainv-bench-quick`` (never committed results)."""
    return Path(tempfile.gettempdir()) / "lorainv-bench-quick"


class _BenchParser(argparse.ArgumentParser):
    """Fills ``--out`` after parsing, since its default depends on ``--quick``."""

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        ns, rest = super().parse_known_args(args, namespace)
        if getattr(ns, "out", "absent") is None:
            ns.out = quick_dir() if getattr(ns, "quick", False) else RESULTS_DIR
        return ns, rest


def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the flags every benchmark shares: ``--quick``, ``--out``, ``--threads``."""
    p = _BenchParser(prog=f"lorainv bench {name}", description=(doc or name).split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smaller run that finishes in under a minute")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output directory (default: {RESULTS_DIR}; with --quick, {quick_dir()})",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared CPU)")
    return p


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (or ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_name() -> str:
    """The first CUDA device's name, or ``"none"`` (imports torch)."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"


@functools.cache
def machine_note() -> str:
    """One line for table headers and chart titles, detected: CPU model, cores, GPU."""
    gpu = gpu_name()
    cores = os.cpu_count() or 0
    return f"{cpu_model()}, {cores} core{'s' if cores != 1 else ''}, " + ("no GPU" if gpu == "none" else f"GPU {gpu}")


def __getattr__(name: str) -> Any:
    # ``common.MACHINE_NOTE`` stays the benchmarks' spelling, but is detected on first use
    if name == "MACHINE_NOTE":
        return machine_note()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def machine() -> dict[str, Any]:
    """Where the numbers come from, detected on this run: CPU, cores, GPU, Python, torch, load."""
    import torch

    return {
        "note": machine_note(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "gpu": gpu_name(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "lorainv": __version__,
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (``q`` in [0, 100]), as ``numpy.percentile``."""
    import numpy as np

    return float(np.percentile(np.asarray(xs, dtype=float), q)) if len(xs) else float("nan")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[bool] | None = None) -> str:
    """A plain text table; ``right[i]`` right-aligns column ``i`` (default: all but the first)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    right = right if right is not None else [i > 0 for i in range(len(headers))]

    def fmt(r: list[str]) -> str:
        return "  ".join(c.rjust(w) if right[i] else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))

    lines = [fmt(cells[0]), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in cells[1:]]
    return "\n".join(lines)


def write_json(out_dir: Path, name: str, doc: dict[str, Any]) -> Path:
    """Write ``out_dir/<name>.json`` atomically, with the machine facts added; returns the path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    full = {"benchmark": name, "machine": machine(), **doc}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(full, indent=2, default=_jsonable) + "\n")
    tmp.replace(path)
    return path


def _jsonable(x: Any) -> Any:
    if isinstance(x, (set, frozenset, tuple)):
        return sorted(x) if isinstance(x, (set, frozenset)) else list(x)
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - the [bench] extra is missing
        return None
    return plt


def save_png(fig: Any, out_dir: Path, name: str) -> Path:
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
