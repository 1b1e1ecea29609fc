"""lorainv: prove a multi-LoRA serving runtime correct.

``Engine`` and ``RuntimeConfig`` are imported lazily so that pure-Python parts (the
reference model, ops, events, traces) never import torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Engine", "RuntimeConfig", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from lorainv.impl.engine import Engine

        return Engine
    if name == "RuntimeConfig":
        from lorainv.config import RuntimeConfig

        return RuntimeConfig
    raise AttributeError(f"module 'lorainv' has no attribute {name!r}")
