"""Every public error of lorainv, rooted at :class:`LorainvError`.

Invariant: a call that raises one of these leaves every pool of the runtime
exactly as it was before the call (checked by the checkers in tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class LorainvError(Exception):
    """Root of every error lorainv raises on purpose."""


class ConfigError(LorainvError, ValueError):
    """A configuration value is out of range or inconsistent; the message names the field."""


class RequestError(LorainvError, ValueError):
    """A request-level call (add, abort, session, unload) was refused; the state is unchanged."""


class TraceError(LorainvError, ValueError):
    """A trace file is malformed; the message names the offending field."""


class AdapterError(LorainvError, ValueError):
    """A LoRA adapter could not be loaded or used; subclasses name the reason."""


class AdapterNotFoundError(AdapterError):
    """The adapter directory, a required file in it, or a registered name is missing."""


class AdapterFormatError(AdapterError):
    """A file is unreadable, truncated, not valid JSON/safetensors, or would need unpickling."""


class AdapterConfigError(AdapterError):
    """`adapter_config.json` has a missing, mistyped or unsupported field."""


class UnsupportedAdapterError(AdapterConfigError):
    """The adapter uses a feature lorainv does not serve (DoRA, an unknown target module, ...)."""


class AdapterRankError(AdapterConfigError):
    """The adapter rank exceeds `max_lora_rank` or is not positive."""


class AdapterShapeError(AdapterError):
    """A tensor's shape or dtype does not match the base model, or a tensor is missing/unknown."""


class AdapterNumericError(AdapterError):
    """A tensor holds NaN or Inf."""


class DuplicateAdapterError(AdapterError):
    """An adapter with this name is already registered."""


class AdapterNotResidentError(AdapterError):
    """A batch asked for an adapter that is not resident in the LoRA pool (never falls back to slot 0)."""


@dataclass(frozen=True)
class Violation:
    """One broken invariant.

    ``pool`` names the pool (``kv``, ``lora``, ...), ``invariant`` the identity
    (``K1``, ``L8``, ``liveness``, ``refinement`` ...), ``message`` is one line and
    ``offenders`` lists the concrete items (token indices, slot ids, adapter ids,
    request ids) that broke it.
    """

    pool: str
    invariant: str
    message: str
    offenders: tuple[Any, ...] = ()

    def __str__(self) -> str:
        tail = ""
        if self.offenders:
            shown = list(self.offenders[:16])
            more = f" (+{len(self.offenders) - 16} more)" if len(self.offenders) > 16 else ""
            tail = f" offenders={shown}{more}"
        return f"[{self.pool}/{self.invariant}] {self.message}{tail}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "pool": self.pool,
            "invariant": self.invariant,
            "message": self.message,
            "offenders": [o if isinstance(o, (int, float, str, type(None))) else repr(o) for o in self.offenders],
        }


@dataclass
class InvariantViolation(LorainvError):
    """Raised by strict memory checks; carries every violation found and recent events."""

    violations: list[Violation]
    recent_events: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(str(self))

    def __str__(self) -> str:
        lines = [f"{len(self.violations)} invariant violation(s):"]
        lines += [f"  {v}" for v in self.violations]
        if self.recent_events:
            lines.append(f"  last {len(self.recent_events)} step(s) of events:")
            lines += [f"    {e}" for e in self.recent_events]
        return "\n".join(lines)


class PoolError(LorainvError, RuntimeError):
    """An invalid pool operation (double free, foreign index); the pool is left unchanged."""
