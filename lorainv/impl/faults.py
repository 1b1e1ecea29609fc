"""The fault catalogue: each name re-creates a historic serving-engine bug at its real place.

A fault is enabled through ``RuntimeConfig(faults=...)`` or ``LORAINV_FAULTS``; none is on
by default. Code asks ``faults.on(cfg, NAME)`` at the exact line where the bug lived.

User faults (`lorainv.fault_names.Fault`) have no branch here: ``install_user_faults``, called
once at the end of ``Engine.__init__``, hands each enabled one the new engine to patch.
"""

from __future__ import annotations

from typing import Any

from lorainv.errors import ConfigError
from lorainv.fault_names import CATALOGUE, FAULTS, user_faults

__all__ = ["FAULTS", "install_user_faults", "on"]


def on(cfg: Any, name: str) -> bool:
    """True when fault ``name`` is enabled in ``cfg`` (a `RuntimeConfig`)."""
    return name in cfg.faults


def install_user_faults(engine: Any) -> None:
    """Plant every user fault ``engine.cfg.faults`` names into ``engine`` (mutates the engine
    through each fault's ``install``), in name order. A no-op when only catalogue faults are on.

    A name that is neither in the catalogue nor a user fault of the scope in force (the config
    was built inside a scope, the engine outside it), or an ``install`` that raises, is a
    `ConfigError` naming the fault.
    """
    names = sorted(n for n in engine.cfg.faults if n not in CATALOGUE)
    if not names:
        return
    known = user_faults()
    missing = [n for n in names if n not in known]
    if missing:
        raise ConfigError(
            f"fault(s) {missing} are not registered here: a user fault is known only inside "
            "lorainv.extensions.using(...) / --checkers MODULE / its entry point"
        )
    for n in names:
        try:
            known[n].install(engine)
        except Exception as e:  # the user's code: name it, keep its traceback as the cause
            raise ConfigError(f"user fault {n!r}: install(engine) failed: {type(e).__name__}: {e}") from e
