"""lorainv's own `Engine` as a `Target`: a thin adapter, no behaviour of its own.

Every call goes to the engine unchanged; attributes the adapter does not define (``requests``,
``sessions``, ``network``, ...) are the engine's, so code written against the engine keeps
working on the adapter.
"""

from __future__ import annotations

from typing import Any

from lorainv.checkers.base import Checker, all_checkers, checker_names
from lorainv.config import RuntimeConfig
from lorainv.events import Event
from lorainv.ops import OPS, Op
from lorainv.targets.base import Capabilities


class LorainvTarget:
    """`lorainv.impl.engine.Engine` behind the `Target` protocol. ``engine`` is the wrapped
    engine (built from ``cfg`` and ``model`` as ``Engine(cfg, model=model)`` does, unless given)."""

    name = "lorainv"

    def __init__(self, cfg: RuntimeConfig, *, model: Any = None, engine: Any = None) -> None:
        if engine is None:
            from lorainv.impl.engine import Engine

            engine = Engine(cfg, model=model)
        self.engine = engine
        self.config = cfg
        from lorainv.impl.fingerprint_net import FingerprintNetwork

        self.capabilities = Capabilities(
            ops=frozenset(OPS),
            pools=frozenset({"kv", "lora", "prefix", "sessions", "requests", "drainer", "overlap", "pinned"}),
            checkers=tuple(checker_names()),
            reference_model=True,
            policy=True,
            token_oracle=isinstance(engine.network, FingerprintNetwork),
        )

    def apply(self, op: Op) -> list[Event]:
        """The engine's `apply` (mutates the engine)."""
        out: list[Event] = self.engine.apply(op)
        return out

    def snapshot(self) -> Any:
        """The engine's `Snapshot` (pure)."""
        return self.engine.snapshot()

    def is_idle(self) -> bool:
        return bool(self.engine.is_idle())

    def checkers(self) -> list[Checker]:
        """Every registered lorainv checker (each reads lorainv's `Snapshot`)."""
        return all_checkers()

    def __getattr__(self, name: str) -> Any:
        # only called for attributes the adapter lacks: the engine's own reads
        if name == "engine":
            raise AttributeError(name)
        return getattr(self.engine, name)
