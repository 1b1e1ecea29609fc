"""The names of the injectable faults (docs/design.md §6), each with the historic bug it re-creates.

A leaf of the vocabulary: it imports only `lorainv.errors`, so `lorainv.config` can validate
``faults=...`` without reaching into the runtime. Where each catalogue fault lives in the
runtime is `lorainv.impl.faults`' concern.

Two kinds of fault:

* the catalogue (``CATALOGUE``): branches in lorainv's own runtime, always known;
* user faults (`Fault`): a user's own historic bug, planted by ``Fault.install(engine)`` into
  each engine whose config enables it. They are known only inside a scope
  (`lorainv.extensions.using`, ``lorainv --checkers``, the pytest plugin), which sets and
  restores ``_active``.

``FAULTS`` is a read-only view of both: the catalogue plus the user faults of the scope in
force. Outside every scope it equals the catalogue.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from lorainv.errors import ConfigError


@dataclass(frozen=True)
class Fault:
    """A user fault: ``install(engine)`` plants the bug into one engine (it patches that
    engine's objects; the patch lives as long as the engine). lorainv calls it at the end of
    ``Engine.__init__`` when ``engine.cfg.faults`` names the fault, and never otherwise."""

    name: str
    description: str
    install: Callable[[Any], None]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ConfigError(f"a fault name must be an identifier, got {self.name!r}")
        if not isinstance(self.description, str):
            raise ConfigError(f"fault {self.name!r}: description must be a string, got {self.description!r}")
        if not callable(self.install):
            raise ConfigError(f"fault {self.name!r}: install must be callable, got {self.install!r}")


CATALOGUE: dict[str, str] = {
    "stale_overlap_event": "loaded-state read from the event dict; a load whose requests were all "
    "cancelled is never reaped, so its slot stays busy forever",
    "session_double_count": "memory accounting counts a lent (active) session slot as session-held too",
    "retract_leaks_tail": "retraction does not free the request's last partial page / over-allocated tail",
    "segments_from_batch_size": "LoRA segment count taken from the batch size instead of unique_consecutive",
    "drainer_never_clears": "a drain mark is not cleared when its adapter has no running requests",
    "evict_in_batch_adapter": "LRU eviction may pick an adapter that the current batch uses, or a pinned one",
    "admission_ignores_staged_chunk": "LoRA admission ignores the staged chunked request and loads in flight",
    "abort_chunked_leaks_kv": "aborting a request mid chunked-prefill does not free its KV and row",
    "use_before_transfer": "the forward reads an adapter slot before its async copy is waited on",
    "pinned_cache_key_collision": "pinned host copies cached per weight name, without the rank/slice suffix",
    "stale_slot_tail": "a reused slot keeps the previous tenant's rank tail and absent modules",
    "nonresident_falls_back_to_slot0": "a non-resident adapter silently reads slot 0's weights",
}


# the user faults of the scope in force (name -> Fault); replaced, never mutated, by
# lorainv.extensions (which restores the previous value when its scope ends)
_active: dict[str, Fault] = {}


def user_faults() -> dict[str, Fault]:
    """The user faults known in the scope in force (a copy)."""
    return dict(_active)


class _Faults(Mapping[str, str]):
    """Read-only view: name -> description of the catalogue and then the scope's user faults."""

    def __getitem__(self, name: str) -> str:
        if name in CATALOGUE:
            return CATALOGUE[name]
        return _active[name].description

    def __iter__(self) -> Iterator[str]:
        yield from CATALOGUE
        yield from (n for n in _active if n not in CATALOGUE)

    def __len__(self) -> int:
        return len(CATALOGUE) + sum(1 for n in _active if n not in CATALOGUE)

    def __repr__(self) -> str:
        return f"FAULTS({dict(self)!r})"


FAULTS: Mapping[str, str] = _Faults()
