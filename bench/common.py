"""Shared plumbing for the benchmarks: the command line, machine facts, tables, JSON and PNG output.

Every benchmark takes ``--quick`` and ``--out DIR`` (default ``bench/results``), prints a
table, and writes ``DIR/<name>.json`` (and, where a picture helps, ``DIR/<name>.png``).
Nothing here measures anything; it only records where and how a measurement was taken.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorainv import __version__

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MACHINE_NOTE = "CPU, 2 cores, no GPU"


def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the flags every benchmark shares: ``--quick``, ``--out``, ``--threads``."""
    p = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=(doc or name).split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smaller run that finishes in under a minute")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"output directory (default {RESULTS_DIR})")
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


def machine() -> dict[str, Any]:
    """Where the numbers come from. There is no GPU on the benchmark machine; say so."""
    import torch

    return {
        "note": MACHINE_NOTE,
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "gpu": "none" if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
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
