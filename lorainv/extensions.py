"""User checkers and user faults, in force only inside a scope.

A user extends lorainv with

* a **checker**: a class with ``check(snapshot) -> list[Violation]``, named with
  ``@lorainv.checkers.register("name")``;
* a **fault**: a `Fault` (or a function decorated with ``@fault("name", "description")``)
  whose ``install(engine)`` plants the user's own historic bug into an engine built with
  ``RuntimeConfig(faults={"name"})``. lorainv calls it at the end of ``Engine.__init__``; the
  trace of a fuzz run records the name, and ``lorainv replay`` with the same module plants it
  again.

Declaring either changes nothing by itself. They are in force inside ``using(...)``:

    with using("myproj.lorainv_ext"):   # a module (and its submodules), a class, a Fault
        engine = Engine(RuntimeConfig(faults={"my_bug"}))
        assert engine.check() == [...]

and through the entry-point groups ``lorainv.checkers`` and ``lorainv.faults`` (each entry
point names a module, a checker class or a `Fault`), which ``using(entry_points=True)``,
every ``lorainv`` command and the pytest plugin load. On exit the registries are exactly as
before, so a checker in force in one scope is absent outside it.

Scopes nest and are process-wide while open (not thread-local). Every bad input is an
`ExtensionError` naming the module, entry point or name at fault, and leaves the registries
unchanged.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points as _entry_points
from types import ModuleType
from typing import Any

from lorainv import fault_names
from lorainv.checkers import base as _checkers
from lorainv.errors import ConfigError
from lorainv.fault_names import CATALOGUE, Fault

__all__ = ["ENTRY_POINT_GROUPS", "ExtensionError", "Extensions", "Fault", "collect", "fault", "using"]

ENTRY_POINT_GROUPS = ("lorainv.checkers", "lorainv.faults")

# faults declared with @fault, by the module that defined them (in force only in a scope)
_DECLARED_FAULTS: dict[str, dict[str, Fault]] = {}


class ExtensionError(ConfigError):
    """A user checker or fault that cannot be loaded: an unknown module, an entry point that
    fails to import, an object that is neither, or a name already taken."""


def fault(name: str, description: str) -> Callable[[Callable[[Any], None]], Fault]:
    """Decorator: turn ``install(engine)`` into a declared `Fault` named ``name``.

    The fault is in force only inside a scope that names it or its module (see `using`)."""

    def deco(install: Callable[[Any], None]) -> Fault:
        f = Fault(name, description, install)
        _DECLARED_FAULTS.setdefault(getattr(install, "__module__", "") or "", {})[name] = f
        return f

    return deco


@dataclass
class Extensions:
    """What a scope puts in force: user checkers (name -> factory) and user faults (name -> Fault).

    ``add`` mutates it; a clash (two different objects under one name, or a name of lorainv's
    own) is an `ExtensionError` naming both."""

    checkers: dict[str, Callable[[], Any]] = field(default_factory=dict)
    faults: dict[str, Fault] = field(default_factory=dict)

    def add_checker(self, name: str, factory: Callable[[], Any], where: str) -> None:
        if name in _checkers.builtin_checker_names():
            raise ExtensionError(f"{where}: checker name {name!r} is taken by one of lorainv's own checkers")
        old = self.checkers.get(name)
        if old is not None and old is not factory:
            raise ExtensionError(f"{where}: two different checkers are named {name!r} ({old!r} and {factory!r})")
        self.checkers[name] = factory

    def add_fault(self, f: Fault, where: str) -> None:
        if f.name in CATALOGUE:
            raise ExtensionError(f"{where}: fault name {f.name!r} is taken by lorainv's fault catalogue")
        old = self.faults.get(f.name)
        if old is not None and old != f:
            raise ExtensionError(f"{where}: two different faults are named {f.name!r}")
        self.faults[f.name] = f

    def add(self, obj: Any, where: str) -> None:
        """Add what ``obj`` provides: a module (every checker and fault it or its submodules
        declared, and any `Fault` among its attributes), a checker class or instance, or a `Fault`."""
        if isinstance(obj, Fault):
            self.add_fault(obj, where)
        elif isinstance(obj, ModuleType):
            found = 0
            for name, cls in _checkers.declared_in(obj.__name__).items():
                self.add_checker(name, cls, where)
                found += 1
            for mod, faults in _DECLARED_FAULTS.items():
                if mod == obj.__name__ or mod.startswith(obj.__name__ + "."):
                    for f in faults.values():
                        self.add_fault(f, where)
                        found += 1
            for value in vars(obj).values():
                if isinstance(value, Fault):
                    self.add_fault(value, where)
                    found += 1
            if not found:
                raise ExtensionError(
                    f"{where}: module {obj.__name__!r} declares no checker (@lorainv.checkers.register) "
                    "and no fault (lorainv.extensions.Fault / @fault)"
                )
        elif _is_checker(obj):
            cname = getattr(obj, "name", None)
            if not isinstance(cname, str) or not cname:
                raise ExtensionError(f"{where}: checker {obj!r} has no name; decorate it with @register('name')")
            factory = obj if inspect.isclass(obj) else (lambda inst=obj: inst)
            self.add_checker(cname, factory, where)
        else:
            raise ExtensionError(
                f"{where}: {obj!r} is not a module, a checker (a class with name and check) or a lorainv Fault"
            )


def _is_checker(obj: Any) -> bool:
    return callable(getattr(obj, "check", None)) and (inspect.isclass(obj) or hasattr(obj, "name"))


def _import(module: str) -> ModuleType:
    """Import ``module`` as ``python -m`` would find it: from sys.path, else from the current
    directory (the ``lorainv`` script, unlike ``python -m``, does not put it on sys.path)."""
    if not isinstance(module, str) or not module.strip():
        raise ExtensionError(f"checker module must be a module name such as 'myproj.checks', got {module!r}")
    name = module.strip()
    try:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as e:
            cwd = os.getcwd()
            if e.name != name.split(".")[0] or cwd in sys.path or "" in sys.path:
                raise
            sys.path.insert(0, cwd)  # for this import only
            try:
                return importlib.import_module(name)
            finally:
                sys.path.remove(cwd)
    except ModuleNotFoundError as e:
        raise ExtensionError(f"cannot import checker module {module!r}: {e}") from None
    except Exception as e:  # the user's module raised while importing
        raise ExtensionError(f"checker module {module!r} failed to import: {type(e).__name__}: {e}") from e


def collect(items: Iterable[Any] = (), *, entry_points: bool = False) -> Extensions:
    """The user checkers and faults of ``items`` (module names, modules, checker classes or
    instances, `Fault` objects) and, with ``entry_points``, of every installed entry point of
    the ``lorainv.checkers`` and ``lorainv.faults`` groups. Imports modules; registers nothing."""
    ext = Extensions()
    if entry_points:
        for group in ENTRY_POINT_GROUPS:
            for ep in _entry_points(group=group):
                where = f"entry point {ep.name} = {ep.value} (group {group})"
                try:
                    obj = ep.load()
                except Exception as e:
                    raise ExtensionError(f"{where} failed to load: {type(e).__name__}: {e}") from e
                ext.add(obj, where)
    for item in items:
        if isinstance(item, str):
            ext.add(_import(item), f"checker module {item!r}")
        else:
            ext.add(item, repr(item))
    return ext


@contextlib.contextmanager
def using(*items: Any, entry_points: bool = False) -> Iterator[Extensions]:
    """Put the user checkers and faults of ``items`` (see `collect`) in force, on top of those
    already in force, for the duration of the block; restore the registries on exit.

    Mutates the checker registry and the fault catalogue view while open (process-wide). All
    loading happens before anything is put in force, so a bad item changes nothing."""
    ext = collect(items, entry_points=entry_points)
    merged = Extensions(dict(_checkers.user_checkers()), fault_names.user_faults())
    for name, factory in ext.checkers.items():
        merged.add_checker(name, factory, "scope")
    for f in ext.faults.values():
        merged.add_fault(f, "scope")
    prev_faults = fault_names._active
    prev_checkers = _checkers.set_user_checkers(merged.checkers)
    fault_names._active = dict(merged.faults)
    try:
        yield ext
    finally:
        fault_names._active = prev_faults
        _checkers.set_user_checkers(prev_checkers)
