"""The ``lorainv`` command line: ``generate``, ``fuzz``, ``replay``, ``gate`` and ``bench``.

Importing this package imports no torch (nor numpy or Hypothesis): each command imports what
it needs when it runs, so ``--help`` and ``fuzz --list-faults`` answer at once
(tests/unit/test_cli.py checks it in a fresh interpreter).

One module per command (``generate.py``, ``fuzz.py``, ``replay.py``, ``gate.py``, ``bench.py``); each has
``add_parser(sub)`` and ``run(args, out) -> exit code``. Options shared by several commands
(user checkers, faults) live in ``common.py``.

Commands: ``generate``, ``fuzz``, ``replay``, ``gate`` (the CI gate) and ``bench``.

Exit codes:

====  ===============================================================================
0     clean (for ``replay``: clean, and the trace expects no violation)
1     a violation was found (``replay``: the trace's expected violation reproduced, or any
      violation for a trace without ``expect``; ``gate``: a step failed)
2     usage error or invalid input file (unknown fault, bad checker module, bad trace)
3     ``replay`` only: the trace's ``expect`` is not met (a different violation, or none)
130   interrupted (Ctrl-C)
====  ===============================================================================
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Any, TextIO

from lorainv import __version__
from lorainv.cli import bench, fuzz, gate, generate, replay
from lorainv.errors import LorainvError, TraceError

COMMANDS = {"generate": generate, "fuzz": fuzz, "replay": replay, "gate": gate, "bench": bench}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default in ``--help``, except the uninformative ones (None, False, an
    empty list or string) and where the help text already names its default."""

    @staticmethod
    def _informative(action: argparse.Action) -> bool:
        d = action.default
        return d is not argparse.SUPPRESS and d is not None and d is not False and d != [] and d != ""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if not self._informative(action) or "default" in text.lower():
            return action.help
        return super()._get_help_string(action)

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and action.option_strings and self._informative(action):
            action = copy.copy(action)  # an option without help text still shows its default
            action.help = "default: %(default)s"
        return super()._format_action(action)


class _Parser(argparse.ArgumentParser):
    """Every subcommand's parser: defaults shown in ``--help``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lorainv",
        description="Prove a multi-LoRA serving runtime correct. Run `lorainv COMMAND --help` for a command's "
        "options and their defaults.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"lorainv {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
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
