"""The fault catalogue: each name re-creates a historic serving-engine bug at its real place.

A fault is enabled through ``RuntimeConfig(faults=...)`` or ``LORAINV_FAULTS``; none is on
by default. Code asks ``faults.on(cfg, NAME)`` at the exact line where the bug lived.
"""

from __future__ import annotations

from typing import Any

from lorainv.fault_names import FAULTS

__all__ = ["FAULTS", "on"]


def on(cfg: Any, name: str) -> bool:
    """True when fault ``name`` is enabled in ``cfg`` (a `RuntimeConfig`)."""
    return name in cfg.faults
