"""The `Target` protocol: what lorainv needs from an engine to fuzz and check it.

A target turns lorainv ops (`lorainv.ops`) into the engine's own calls and reports what
happened as lorainv events (`lorainv.events`). The harness, the Hypothesis machine,
``lorainv fuzz`` and ``lorainv replay`` talk to a target only through this protocol:

* ``apply(op) -> list[Event]``: the only call that mutates the engine. A refused op is one
  `Rejected` event and leaves every pool unchanged; a ``Step`` is never refused.
* ``snapshot()``: a frozen, tensor-free view of the pools the target has. A pure read: taking
  it twice in a row gives equal snapshots and changes nothing in the engine.
* ``checkers()``: fresh instances of the checkers that read that snapshot type. Each checker
  states in its docstring what it assumes about the engine; a target lists only checkers
  whose assumptions hold for it.
* ``capabilities``: what of lorainv's machinery applies (see `Capabilities`).
* ``is_idle()``: nothing waits or runs (pure). Liveness: with no new ops, stepping a target
  must reach idle within a bound.
* ``config`` (the `RuntimeConfig` the target was sized from) and ``name`` (recorded in traces).

Optional: ``make_model() -> (model, checkers)`` for a target lorainv's reference model does not
fit (``capabilities.reference_model`` false): ``model.observe(op, events) -> list[Violation]``
validates each op's events, and the checkers compare the snapshot with the model's prediction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from lorainv.checkers.base import Checker
from lorainv.config import RuntimeConfig
from lorainv.events import Event
from lorainv.ops import Op


@dataclass(frozen=True)
class Capabilities:
    """What a target supports and which of lorainv's checks apply to it.

    ``ops``: the op kinds (``Op.kind``) the target implements; the fuzzer generates only
    these, and an op outside the set is a `Rejected` event. ``pools``: the names of the
    pools its snapshot exposes (the ``pool`` of the violations its checkers raise).
    ``checkers``: the names of the checkers `Target.checkers` returns.
    ``reference_model``: lorainv's reference model (`lorainv.model.reference`) can validate
    its events and its memory refinement applies (the target's pools are lorainv's).
    ``policy``: lorainv's documented scheduling choices (`lorainv.model.policy`) apply.
    ``token_oracle``: every `Decoded` token must equal `lorainv.model.token_oracle`'s
    prediction from the request's logical history (the target samples with that function).
    """

    ops: frozenset[str]
    pools: frozenset[str]
    checkers: tuple[str, ...]
    reference_model: bool
    policy: bool
    token_oracle: bool


@runtime_checkable
class Target(Protocol):
    """An engine under test; see the module docstring for each member's contract."""

    name: str
    config: RuntimeConfig
    capabilities: Capabilities

    def apply(self, op: Op) -> list[Event]: ...

    def snapshot(self) -> Any: ...

    def is_idle(self) -> bool: ...

    def checkers(self) -> list[Checker]: ...


def _lorainv(cfg: RuntimeConfig, **kw: Any) -> Target:
    from lorainv.targets.lorainv import LorainvTarget

    return LorainvTarget(cfg, **kw)


def _vllm(cfg: RuntimeConfig, **kw: Any) -> Target:
    from lorainv.targets.vllm import VllmTarget  # imports vllm: only when asked for

    return VllmTarget(cfg, **kw)


TARGETS: dict[str, Callable[..., Target]] = {"lorainv": _lorainv, "vllm": _vllm}


def target_names() -> list[str]:
    return list(TARGETS)


def make_target(name: str, cfg: RuntimeConfig, **kw: Any) -> Target:
    """Build the target registered as ``name`` for ``cfg`` (keyword arguments go to its
    constructor). An unknown name or option is a `ConfigError` (the known names listed)."""
    from lorainv.errors import ConfigError

    factory = TARGETS.get(name) if isinstance(name, str) else None
    if factory is None:
        raise ConfigError(f"unknown target {name!r}; known: {target_names()}")
    try:
        return factory(cfg, **kw)
    except TypeError as e:  # an option the target's constructor does not take
        if kw and "argument" in str(e):
            raise ConfigError(f"target {name!r}: bad option(s) {sorted(kw)}: {e}") from None
        raise
