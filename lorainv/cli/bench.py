"""``lorainv bench``: run a benchmark from ``bench/``."""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from lorainv.cli.common import torch_threads


def add_parser(sub: Any) -> None:
    """Add this command's subparser to ``sub``."""
    b = sub.add_parser("bench", help="run a benchmark from bench/ (from the repository root)")
    b.add_argument("name")
    b.add_argument("args", nargs=argparse.REMAINDER)


def run(a: argparse.Namespace, out: TextIO) -> int:
    """Import ``bench.NAME`` and run its ``main(args)``."""
    torch_threads()
    import importlib
    import os

    sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(f"bench.{a.name}")
    except ModuleNotFoundError as e:
        target = f"bench.{a.name}"
        if e.name and target != e.name and not target.startswith(e.name + "."):
            # the benchmark exists; something it imports does not
            sys.stderr.write(f"lorainv bench: bench/{a.name}.py needs the missing module {e.name!r}: {e}\n")
        else:
            sys.stderr.write(f"lorainv bench: no benchmark bench/{a.name}.py (run from the repository root)\n")
        return 2
    return int(mod.main(a.args) or 0)
