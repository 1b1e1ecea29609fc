"""Shared machinery for ops and events: frozen dataclasses with a stable ``kind`` name
that round-trip through plain dicts (and so through JSON).

Invariant: ``from_dict(x.to_dict()) == x`` for every record ``x``; ``from_dict`` rejects
unknown kinds, missing or unknown fields and wrongly typed values with ``TraceError``
naming the field.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from typing import Any, ClassVar, TypeVar, Union

if sys.version_info >= (3, 11):
    from typing import dataclass_transform
else:  # Python 3.10: the decorator only informs type checkers, so a no-op stands in at run time
    try:
        from typing_extensions import dataclass_transform
    except ImportError:  # pragma: no cover
        dataclass_transform = lambda **_kw: lambda cls: cls  # noqa: E731

from lorainv.errors import TraceError

R = TypeVar("R", bound="Record")


@dataclass_transform(frozen_default=True)
class Record:
    """Base of ops and events. Subclasses are frozen dataclasses registered by ``kind``
    (`registry`); ``dataclass_transform`` tells type checkers so, which types their
    constructors."""

    kind: ClassVar[str] = ""
    _registry: ClassVar[dict[str, type[Record]]]
    _key: ClassVar[str] = "kind"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {self._key: self.kind}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls: type[R], data: Any) -> R:
        if not isinstance(data, dict):
            raise TraceError(f"{cls.__name__.lower()} must be an object, got {type(data).__name__}")
        kind = data.get(cls._key)
        sub = cls._registry.get(kind) if isinstance(kind, str) else None
        if sub is None:
            raise TraceError(f"unknown {cls._key} {kind!r}; known: {sorted(cls._registry)}")
        hints = typing.get_type_hints(sub)
        fields = {f.name: f for f in dataclasses.fields(sub)}  # type: ignore[arg-type]
        extra = sorted(set(data) - set(fields) - {cls._key})
        if extra:
            raise TraceError(f"{kind}: unknown field(s) {extra}")
        kw: dict[str, Any] = {}
        for name, f in fields.items():
            if name not in data:
                no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                if no_default:
                    raise TraceError(f"{kind}: missing field {name!r}")
                continue
            kw[name] = _coerce(f"{kind}.{name}", data[name], hints[name])
        return sub(**kw)  # type: ignore[return-value]

    def __str__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if isinstance(v, tuple) and len(v) > 8:
                v = f"<{len(v)} items>"
            parts.append(f"{f.name}={v!r}" if not isinstance(v, str) else f"{f.name}={v}")
        return f"{self.kind}({', '.join(parts)})"


def _coerce(where: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` (JSON lists become tuples)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(where, value, a)
            except TraceError as e:
                errors.append(str(e))
        raise TraceError(f"{where}: {value!r} matches none of {tp}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TraceError(f"{where}: expected a list, got {type(value).__name__}")
        (elem, *_rest) = typing.get_args(tp)
        return tuple(_coerce(f"{where}[{i}]", v, elem) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise TraceError(f"{where}: expected a bool, got {type(value).__name__}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TraceError(f"{where}: expected an int, got {type(value).__name__}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TraceError(f"{where}: expected a number, got {type(value).__name__}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise TraceError(f"{where}: expected a string, got {type(value).__name__}")
        return value
    return value


def registry(base: type[Record], key: str = "kind") -> typing.Callable[[type[R]], type[R]]:
    """Class decorator: make ``cls`` a frozen dataclass registered under its ``kind``."""
    base._registry = {}
    base._key = key

    def register(cls: type[R]) -> type[R]:
        dc = dataclasses.dataclass(frozen=True)(cls)
        if not dc.kind:
            dc.kind = dc.__name__
        if dc.kind in base._registry:
            raise RuntimeError(f"duplicate record kind {dc.kind}")
        base._registry[dc.kind] = dc
        return dc

    return register
