"""``lorainv`` with every oracle switched off: a throughput ceiling, never a way to test.

``python -m bench.fuzz_ceiling fuzz ...`` runs the normal CLI after replacing, in this process
only, everything that judges an op: the snapshot (``Engine.snapshot``), every checker
(``run_checks`` as the harness calls it), the memo comparison at teardown, the reference model
and the token oracle. What is left is what no oracle can remove: Hypothesis choosing and
drawing each op, the machine's own bookkeeping, and the engine under test applying it.

A run here applies the very same ops as the normal CLI with the same seed and budget (the draws
read the engine's state, never an oracle's verdict), so ``ops_per_s`` here bounds what any
cheaper oracle could reach. It also finds nothing an oracle would have found: a planted leak
passes (``tests/test_bench_quick.py``). Only ``--strict 0`` is meaningful: at level 2 the engine's
own hook takes the snapshot this module removes, so `main` refuses other levels.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence
from typing import Any


def switch_off() -> None:
    """Replace the oracles' entry points in this process (irreversible: a process of its own)."""
    import lorainv.testing.harness as harness
    from lorainv.impl.engine import Engine
    from lorainv.model.reference import ReferenceModel
    from lorainv.model.token_oracle import TokenOracle

    def nothing(*args: Any, **kwargs: Any) -> list[Any]:
        return []

    harness.run_checks = nothing  # type: ignore[assignment]
    harness.memo_violations = nothing  # type: ignore[assignment]
    ReferenceModel.observe = nothing  # type: ignore[method-assign]
    TokenOracle.observe = nothing  # type: ignore[method-assign]
    Engine.snapshot = lambda self: None  # type: ignore[method-assign]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    levels = [b for a, b in itertools.pairwise(args) if a == "--strict"]
    levels += [a.split("=", 1)[1] for a in args if a.startswith("--strict=")]
    if any(level != "0" for level in levels):
        print("fuzz_ceiling: only --strict 0 (level 2's own hook snapshots and checks)", file=sys.stderr)
        return 2
    switch_off()
    from lorainv.cli import main as cli

    return cli(args)


if __name__ == "__main__":
    raise SystemExit(main())
