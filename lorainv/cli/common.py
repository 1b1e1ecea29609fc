"""What several commands share: torch set-up, the fault catalogue, user checkers.

Nothing here imports torch at module level, so ``--help`` and ``--list-faults`` stay instant.
"""

from __future__ import annotations

import argparse
import contextlib
import os
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
    """Every fault a run may enable: name -> one-line description (the catalogue, then the
    user faults in force)."""
    from lorainv.fault_names import FAULTS

    return dict(FAULTS)


def list_faults(out: TextIO) -> int:
    """Print the fault catalogue, one per line, then the user faults in force; exit code 0."""
    from lorainv.fault_names import CATALOGUE

    faults = fault_catalogue()
    width = max(map(len, faults))
    for name, desc in faults.items():
        out.write(f"{name:<{width}}  {desc}\n")
    user = [n for n in faults if n not in CATALOGUE]
    if user:
        out.write(f"({len(user)} user fault(s): {', '.join(user)})\n")
    return 0


def env_faults(cmd: str) -> frozenset[str] | None:
    """The faults ``LORAINV_FAULTS`` names (comma-separated; empty when unset); None (after a
    message on stderr) if any is unknown."""
    return _known_faults(os.environ.get("LORAINV_FAULTS", ""), cmd, "LORAINV_FAULTS")


def parse_faults(spec: str, cmd: str) -> frozenset[str] | None:
    """The faults named in a comma-separated ``spec`` together with those of ``LORAINV_FAULTS``;
    None (after a message on stderr naming the unknown ones and where they came from) if any
    is unknown. A user fault is known inside `user_extensions` only."""
    given = _known_faults(spec or "", cmd, "--faults")
    from_env = env_faults(cmd)
    if given is None or from_env is None:
        return None
    return given | from_env


def _known_faults(spec: str, cmd: str, where: str) -> frozenset[str] | None:
    faults = frozenset(f.strip() for f in spec.split(",") if f.strip())
    unknown = sorted(faults - set(fault_catalogue()))
    if unknown:
        sys.stderr.write(
            f"lorainv {cmd}: {where}: unknown fault(s) {unknown}; see lorainv fuzz --list-faults "
            "(a user fault needs its module: --checkers MODULE or an installed entry point)\n"
        )
        return None
    return faults


def add_checkers_arg(p: argparse.ArgumentParser) -> None:
    """Add ``--checkers MODULE`` (repeatable; dest ``checkers``, a list of module names)."""
    p.add_argument(
        "--checkers",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE and use the checkers and faults it declares (repeatable); installed "
        "entry points (groups lorainv.checkers, lorainv.faults) are always used",
    )


@contextlib.contextmanager
def user_extensions(modules: list[str]) -> Iterator[None]:
    """Within the block, the user checkers and faults of ``modules`` (and of the installed
    entry points) are in force; on exit the registries are as before.

    Picklable input (module names) so that worker processes can enter the same scope. A module
    that cannot be imported, a failing entry point or a name clash raises `ExtensionError`
    (a `LorainvError`: the CLI exits 2 naming it) before anything is put in force.
    """
    from lorainv.extensions import using

    with using(*modules, entry_points=True):
        yield
