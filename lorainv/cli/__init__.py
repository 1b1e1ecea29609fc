"""The ``lorainv`` command line: ``generate``, ``fuzz``, ``replay`` and ``bench``.

One module per command (``generate.py``, ``fuzz.py``, ``replay.py``, ``bench.py``); each has
``add_parser(sub)`` and ``run(args, out) -> exit code``. Options shared by several commands
(user checkers, faults) live in ``common.py``.

Exit codes: 0 clean, 1 a violation was found, 2 a usage error or an invalid input file.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from lorainv import __version__
from lorainv.cli import bench, fuzz, generate, replay
from lorainv.errors import LorainvError, TraceError

COMMANDS = {"generate": generate, "fuzz": fuzz, "replay": replay, "bench": bench}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorainv", description="Prove a multi-LoRA serving runtime correct.")
    p.add_argument("--version", action="version", version=f"lorainv {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    for mod in COMMANDS.values():
        mod.add_parser(sub)
    return p


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    """Parse ``argv`` and run one command; returns its exit code (never raises a LorainvError)."""
    a = _parser().parse_args(argv)
    out = out if out is not None else sys.stdout
    try:
        return int(COMMANDS[a.cmd].run(a, out))
    except TraceError as e:
        sys.stderr.write(f"lorainv {a.cmd}: TraceError: {e}\n")
        return 2
    except LorainvError as e:
        sys.stderr.write(f"lorainv {a.cmd}: {type(e).__name__}: {e}\n")
        return 2
