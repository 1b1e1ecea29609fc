"""The checker protocol and its composition.

A checker is a small object with a ``name`` and ``check(snapshot) -> list[Violation]``.
It reads the snapshot only, never live runtime objects. Checkers compose: ``all_checkers()``
builds the default set, ``select("kv", "lora")`` picks by name, and a user's own checker
is anything with the same two members.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

from lorainv.errors import Violation
from lorainv.snapshot import Snapshot


@runtime_checkable
class Checker(Protocol):
    name: str

    def check(self, snap: Snapshot) -> list[Violation]: ...


_FACTORIES: dict[str, Callable[[], Checker]] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make a checker class available to ``all_checkers``/``select``."""

    def deco(cls: type) -> type:
        setattr(cls, "name", name)  # noqa: B010 - a class attribute the Checker protocol reads
        _FACTORIES[name] = cls
        return cls

    return deco


def checker_names() -> list[str]:
    _load_all()
    return list(_FACTORIES)


def all_checkers(extra: Iterable[Checker] = ()) -> list[Checker]:
    """A fresh instance of every registered checker, plus ``extra``."""
    _load_all()
    return [f() for f in _FACTORIES.values()] + list(extra)


def select(*names: str) -> list[Checker]:
    """Fresh instances of the named checkers; an unknown name raises ``KeyError`` listing the known ones."""
    _load_all()
    unknown = [n for n in names if n not in _FACTORIES]
    if unknown:
        raise KeyError(f"unknown checker(s) {unknown}; known: {list(_FACTORIES)}")
    return [_FACTORIES[n]() for n in names]


def run_checks(snap: Snapshot, checkers: Iterable[Checker] | None = None) -> list[Violation]:
    out: list[Violation] = []
    for c in all_checkers() if checkers is None else checkers:
        out.extend(c.check(snap))
    return out


def _load_all() -> None:
    # importing the modules registers their checkers
    from lorainv.checkers import (  # noqa: F401
        drainer,
        kv,
        lora,
        overlap,
        pinned,
        prefix,
        req_to_token,
        requests,
        sessions,
    )


def shown(items: Iterable[object], limit: int = 16) -> tuple[object, ...]:
    """The first ``limit`` offenders, as plain values."""
    out = []
    for i, x in enumerate(items):
        if i >= limit:
            break
        out.append(x.item() if hasattr(x, "item") else x)
    return tuple(out)
