"""Composable per-pool invariant checkers (docs/design.md §5).

A user's own checker is declared with ``@register("name")`` and runs only inside a scope that
puts it in force (`lorainv.extensions.using`, ``--checkers MODULE``, an installed
``lorainv.checkers`` entry point, the pytest plugin's ``--lorainv-checkers`` or
``lorainv_extensions`` fixture).
"""

from lorainv.checkers.base import Checker, all_checkers, checker_names, generation, register, run_checks, select

__all__ = ["Checker", "all_checkers", "checker_names", "generation", "register", "run_checks", "select"]
