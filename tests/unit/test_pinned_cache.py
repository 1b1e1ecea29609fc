"""Issue 14 §1: unloading an adapter drops its pinned host copies; the ``pinned`` checker
bounds the cache by what the registered adapters need."""

from __future__ import annotations

import pytest

from lorainv.checkers import run_checks, select
from lorainv.config import RuntimeConfig
from lorainv.errors import InvariantViolation, PoolError
from lorainv.impl.engine import Engine
from lorainv.impl.pinned import PinnedHostCache
from lorainv.ops import Abort, UnloadAdapter


def _engine(**kw: object) -> Engine:
    base: dict[str, object] = {"network": "dummy", "max_total_tokens": 256, "device": "sim"}
    base.update(kw)
    return Engine(RuntimeConfig(**base))  # type: ignore[arg-type]


def _rounds(eng: Engine, n: int = 5) -> None:
    """The issue's scenario: load, generate, unload, each round under a new name."""
    for i in range(n):
        name = f"round{i}"
        eng.load_adapter(name, f"gen:4:{i + 1}")
        eng.complete_transfers()
        eng.generate([[1, 2, 3, 4]], [name], max_new_tokens=3)
        eng.complete_transfers()
        eng.unload_adapter(name)


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("tp_size", [1, 2])
def test_rounds_of_new_names_leave_the_cache_empty(tp_size: int, overlap: bool) -> None:
    eng = _engine(tp_size=tp_size, enable_lora_overlap_loading=overlap, strict_mem_check=2)
    _rounds(eng)
    snap = eng.snapshot()
    assert snap.lora.registered == ()
    assert snap.pinned.entries == () and snap.pinned.bytes == 0


def test_unload_keeps_the_other_adapters_slices_for_every_rank() -> None:
    eng = _engine(tp_size=2)
    eng.load_adapter("keep", "gen:4:1")
    eng.load_adapter("gone", "gen:2:2")
    eng.generate([[1, 2, 3], [4, 5, 6]], ["keep", "gone"], max_new_tokens=2)
    eng.unload_adapter("gone")
    entries = eng.snapshot().pinned.entries
    assert entries and {e.adapter for e in entries} == {"keep"}
    # both ranks still hold their own slice of every tensor of "keep"
    rank0 = {e.key.replace("/tp0/2", "") for e in entries if e.key.endswith("/tp0/2")}
    rank1 = {e.key.replace("/tp1/2", "") for e in entries if e.key.endswith("/tp1/2")}
    assert rank0 == rank1 and len(rank0) * 2 == len(entries)
    assert run_checks(eng.snapshot(), select("pinned")) == []


def test_a_load_in_flight_keeps_its_source() -> None:
    eng = _engine(enable_lora_overlap_loading=True)
    eng.load_adapter("a", "gen:4:1")
    eng.add_request([1, 2, 3], "a", 2)
    eng.step()  # starts the load on the side stream; the copies stay pending
    assert eng.loader is not None and eng.loader.tracked()
    before = eng.snapshot().pinned.entries
    assert before
    ev = eng.apply(Abort("r0"))
    assert ev[0].kind == "Aborted"
    refused = eng.apply(UnloadAdapter("a"))
    assert [e.kind for e in refused] == ["Rejected"]
    assert eng.snapshot().pinned.entries == before
    with pytest.raises(PoolError):
        eng.pool.release_host_copies("a")  # still mapped: its copies may be in flight
    assert eng.snapshot().pinned.entries == before


def test_planted_leak_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PinnedHostCache, "drop", lambda self, adapter: 0)
    eng = _engine()
    eng.load_adapter("a", "gen:4:1")
    eng.generate([[1, 2, 3]], ["a"], max_new_tokens=2)
    eng.unload_adapter("a")
    found = run_checks(eng.snapshot(), select("pinned"))
    assert [(v.pool, v.invariant) for v in found] == [("pinned", "PN1")]
    assert "'a'" in found[0].message
    # at strict level 2 the unload itself raises
    strict = _engine(strict_mem_check=2)
    strict.load_adapter("a", "gen:4:1")
    strict.generate([[1, 2, 3]], ["a"], max_new_tokens=2)
    with pytest.raises(InvariantViolation, match="PN1"):
        strict.unload_adapter("a")


def test_planted_leak_under_a_reused_name_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-registering a name with new tensors: the old slices are stale, not needed."""
    monkeypatch.setattr(PinnedHostCache, "drop", lambda self, adapter: 0)
    eng = _engine()
    eng.load_adapter("a", "gen:4:1")
    eng.generate([[1, 2, 3]], ["a"], max_new_tokens=2)
    eng.unload_adapter("a")
    eng.load_adapter("a", "gen:8:2")
    found = run_checks(eng.snapshot(), select("pinned"))
    assert found and {v.invariant for v in found} == {"PN1"}
    assert "no longer registered" in found[0].message
