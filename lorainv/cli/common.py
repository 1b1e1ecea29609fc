"""What several commands share: torch set-up, the fault catalogue, user checkers.

Nothing here imports torch at module level, so ``--help`` and ``--list-faults`` stay instant.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from typing import TextIO


def torch_threads() -> None:
    """Import torch and use one intra-op thread (mutates torch's global thread setting).

    The tensors are tiny: intra-op threads cost more than they give, and fuzz workers
    parallelise by process.
    """
    import torch

    torch.set_num_threads(1)


def fault_catalogue() -> dict[str, str]:
    """Every fault a run may enable: name -> one-line description."""
    from lorainv.fault_names import FAULTS

    return dict(FAULTS)


def list_faults(out: TextIO) -> int:
    """Print the fault catalogue, one per line; exit code 0."""
    faults = fault_catalogue()
    width = max(map(len, faults))
    for name, desc in faults.items():
        out.write(f"{name:<{width}}  {desc}\n")
    return 0


def parse_faults(spec: str, cmd: str) -> frozenset[str] | None:
    """The faults named in a comma-separated ``spec``; None (after a message on stderr) if
    any is unknown."""
    faults = frozenset(f.strip() for f in spec.split(",") if f.strip())
    unknown = sorted(faults - set(fault_catalogue()))
    if unknown:
        sys.stderr.write(f"lorainv {cmd}: unknown fault(s) {unknown}; see lorainv fuzz --list-faults\n")
        return None
    return faults


def add_checkers_arg(p: argparse.ArgumentParser) -> None:
    """Add ``--checkers MODULE`` (repeatable; dest ``checkers``, a list of module names)."""
    p.add_argument(
        "--checkers",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE and use the checkers and faults it registers (repeatable)",
    )


@contextlib.contextmanager
def user_extensions(modules: list[str]) -> Iterator[None]:
    """Within the block, the user checkers and faults of ``modules`` (and of the installed
    entry points) are registered; on exit the registries are as before.

    Picklable input (module names) so that worker processes can enter the same scope.
    """
    yield
