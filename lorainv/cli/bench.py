"""``lorainv bench``: list the benchmarks, or run one from any directory.

The benchmarks ship in the wheel as the package ``lorainv_bench`` (the repository's ``bench/``
directory, mapped in pyproject.toml). Listing reads each module's docstring from its source,
so it imports neither the benchmarks nor torch.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import pkgutil
import sys
from typing import Any, TextIO

from lorainv.cli.common import torch_threads

PACKAGE = "lorainv_bench"


def add_parser(sub: Any) -> None:
    """Add this command's subparser to ``sub``."""
    b = sub.add_parser(
        "bench",
        help="list the benchmarks, or run one (any directory)",
        description="Without NAME: list the benchmarks. With NAME: run it; the arguments after NAME go to the "
        "benchmark (see `lorainv bench NAME --help`). A full run writes bench/results/ in a source checkout "
        "(./bench-results elsewhere); --quick writes to a temporary directory unless --out is given, "
        "so it never overwrites committed results.",
    )
    b.add_argument("name", nargs="?", help="the benchmark to run (omit to list them)")
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark, e.g. --quick")


def benchmarks() -> dict[str, str]:
    """Every benchmark: name -> the first paragraph of its docstring on one line.

    A benchmark is a module of ``lorainv_bench`` with a top-level ``main``; nothing is imported.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return {}
    found: dict[str, str] = {}
    for info in sorted(pkgutil.iter_modules(spec.submodule_search_locations), key=lambda m: m.name):
        mod_spec = importlib.util.find_spec(f"{PACKAGE}.{info.name}")
        if info.ispkg or mod_spec is None or mod_spec.origin is None:
            continue
        with open(mod_spec.origin, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        if not any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
            continue
        doc = ast.get_docstring(tree) or ""
        found[info.name] = " ".join(doc.split("\n\n")[0].split())
    return found


def _list(out: TextIO) -> int:
    found = benchmarks()
    if not found:
        msg = f"the {PACKAGE} package is not installed; reinstall lorainv (pip install -e .)"
        sys.stderr.write(f"lorainv bench: {msg}\n")
        return 2
    width = max(map(len, found))
    out.write("Benchmarks (run one with: lorainv bench NAME [--quick] [--out DIR]):\n\n")
    for name, desc in found.items():
        out.write(f"  {name:<{width}}  {desc}\n")
    return 0


def run(a: argparse.Namespace, out: TextIO) -> int:
    """List the benchmarks (no name), or import ``lorainv_bench.NAME`` and run its ``main(args)``."""
    if not a.name:
        return _list(out)
    if a.name not in benchmarks():
        known = ", ".join(benchmarks()) or "none installed"
        sys.stderr.write(f"lorainv bench: no benchmark named {a.name!r} (known: {known})\n")
        return 2
    args = list(a.args)
    if "--quick" in args and not any(x == "--out" or x.startswith("--out=") for x in args):
        # every benchmark's own parser already defaults there; saying it here covers any that does not
        common = importlib.import_module(f"{PACKAGE}.common")
        args += ["--out", str(common.quick_dir())]
    torch_threads()
    try:
        mod = importlib.import_module(f"{PACKAGE}.{a.name}")
    except ModuleNotFoundError as e:
        sys.stderr.write(f"lorainv bench: benchmark {a.name!r} needs the missing module {e.name!r} ({e})\n")
        return 2
    return int(mod.main(args) or 0)
