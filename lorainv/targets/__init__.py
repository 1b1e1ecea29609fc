"""Targets: engines lorainv can drive and check (see `lorainv.targets.base`)."""

from lorainv.targets.base import TARGETS, Capabilities, Target, make_target, target_names

__all__ = ["TARGETS", "Capabilities", "Target", "make_target", "target_names"]
