"""The checker protocol and its composition.

A checker is a small object with a ``name`` and ``check(snapshot) -> list[Violation]``.
It reads the snapshot only, never live runtime objects. Checkers compose: ``all_checkers()``
builds the set in force, ``select("kv", "lora")`` picks by name, and a user's own checker
is anything with the same two members. A user checker declared with ``@register`` is in
force only inside a scope (see `register`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

from lorainv.errors import ConfigError, Violation
from lorainv.snapshot import Snapshot


@runtime_checkable
class Checker(Protocol):
    name: str

    def check(self, snap: Snapshot) -> list[Violation]: ...


Factory = Callable[[], Checker]

# lorainv's own checkers (registered by the modules of this package; always in force)
_BUILTIN: dict[str, Factory] = {}
# user checkers declared with @register, by the module that defined them; declaring one
# changes nothing until a scope (lorainv.extensions.using) puts it in force
_DECLARED: dict[str, dict[str, Factory]] = {}
# the checkers in force: the built-in ones, then the user checkers of the scope in force.
# Replaced, never mutated in place, by set_user_checkers (a scope restores the old one).
_FACTORIES: dict[str, Factory] = {}
_USER: dict[str, Factory] = {}
# bumped whenever the set in force changes (a checker of this package registered, a scope's
# user checkers put in force), so a holder of instances knows when to make new ones
_GENERATION = 0
_LOADED: list[bool] = []


def register(name: str) -> Callable[[type], type]:
    """Class decorator: name a checker class and declare it.

    A class of lorainv's own ``lorainv.checkers`` package is in force everywhere. Any other
    class (a user checker) is only declared: it runs inside a scope that names it, its module
    or a package above it (`lorainv.extensions.using`, ``--checkers MODULE``, an entry point,
    the pytest plugin), and nowhere else, so importing it changes no unrelated test.
    """

    def deco(cls: type) -> type:
        setattr(cls, "name", name)  # noqa: B010 - a class attribute the Checker protocol reads
        global _GENERATION
        if cls.__module__.startswith("lorainv.checkers."):
            _BUILTIN[name] = cls
            if name not in _USER:
                _FACTORIES[name] = cls
                _GENERATION += 1
        else:
            _DECLARED.setdefault(cls.__module__, {})[name] = cls
        return cls

    return deco


def declared_in(module: str) -> dict[str, Factory]:
    """The user checkers declared by ``module`` and its submodules (name -> class)."""
    out: dict[str, Factory] = {}
    for mod, found in _DECLARED.items():
        if mod == module or mod.startswith(module + "."):
            out.update(found)
    return out


def builtin_checker_names() -> list[str]:
    """The names of lorainv's own checkers."""
    _load_all()
    return list(_BUILTIN)


def user_checkers() -> dict[str, Factory]:
    """The user checkers in force (name -> factory; a copy)."""
    return dict(_USER)


def set_user_checkers(factories: dict[str, Factory]) -> dict[str, Factory]:
    """Put exactly ``factories`` in force as the user checkers (replacing the previous set) and
    return the previous set, for the caller to restore. Mutates this module's registry; only
    scopes (`lorainv.extensions`) call it. A name of a built-in checker is refused (ConfigError)."""
    global _FACTORIES, _USER, _GENERATION
    _load_all()
    clash = sorted(set(factories) & set(_BUILTIN))
    if clash:
        raise ConfigError(f"user checker name(s) {clash} are taken by lorainv's own checkers")
    prev = _USER
    _USER = dict(factories)
    _FACTORIES = {**_BUILTIN, **_USER}
    _GENERATION += 1
    return prev


def generation() -> int:
    """A number that changes whenever the set of checkers in force changes: instances made by
    `all_checkers` stay the set in force while it is unchanged."""
    _load_all()
    return _GENERATION


def checker_names() -> list[str]:
    """The names of the checkers in force: lorainv's own, then the scope's user checkers."""
    _load_all()
    return list(_FACTORIES)


def all_checkers(extra: Iterable[Checker] = ()) -> list[Checker]:
    """A fresh instance of every checker in force, plus ``extra``."""
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
    if _LOADED:
        return
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

    _LOADED.append(True)


def shown(items: Iterable[object], limit: int = 16) -> tuple[object, ...]:
    """The first ``limit`` offenders, as plain values."""
    out = []
    for i, x in enumerate(items):
        if i >= limit:
            break
        out.append(x.item() if hasattr(x, "item") else x)
    return tuple(out)
