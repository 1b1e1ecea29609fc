"""Composable per-pool invariant checkers (docs/design.md §5)."""

from lorainv.checkers.base import Checker, all_checkers, checker_names, register, run_checks, select

__all__ = ["Checker", "all_checkers", "checker_names", "register", "run_checks", "select"]
