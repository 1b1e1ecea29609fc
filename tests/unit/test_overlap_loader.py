"""Overlapped adapter loads on SimDevice: status, reaping of cancelled loads, poison, failures."""

from __future__ import annotations

import pytest
import torch

from lorainv.config import RuntimeConfig
from lorainv.errors import PoolError
from lorainv.events import Evicted, LoadCompleted, LoadFailed, LoadStarted
from lorainv.impl.adapters import generate_adapter
from lorainv.impl.device import SimDevice
from lorainv.impl.dims import ModelDims
from lorainv.impl.lora_pool import EMPTY, LoraPool
from lorainv.impl.overlap_loader import LoadStatus, OverlapLoader, TrackedLoad

DIMS = ModelDims(
    num_layers=2, hidden_size=16, num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=24, vocab_size=32
)
REG = {n: generate_adapter(n, DIMS, rank=4, seed=i, dtype=torch.float32) for i, n in enumerate(["a", "x", "y"])}
COPIES = 2 * 4 * 2  # layers x groups x (A, B)


def make(p: int = 2, **faults) -> tuple[LoraPool, OverlapLoader, SimDevice]:
    cfg = RuntimeConfig(max_loras_per_batch=p, max_lora_rank=8, enable_lora_overlap_loading=True, **faults)
    dev = SimDevice()
    pool = LoraPool(cfg, DIMS, dev, torch.float32)
    return pool, OverlapLoader(pool, dev, cfg), dev


def test_status_transitions():
    pool, loader, dev = make()
    assert loader.status("x") is LoadStatus.NOT_LOADED and not loader.is_ready("x")
    assert loader.start_load("x", REG["x"], protected=set()) == [LoadStarted(adapter="x", slot=0, overlap=True)]
    assert loader.status("x") is LoadStatus.LOADING and loader.in_flight() == {"x"}
    assert loader.tracked() == (TrackedLoad("x", 0, False, False),)
    dev.complete(COPIES - 1)
    assert loader.status("x") is LoadStatus.LOADING and loader.reap() == []
    dev.complete(1)
    assert loader.tracked() == (TrackedLoad("x", 0, True, False),)
    # status and is_ready are pure reads: done is not ready until the load is reaped (and waited on)
    assert loader.status("x") is LoadStatus.LOADING and not loader.is_ready("x")
    assert loader.tracked() == (TrackedLoad("x", 0, True, False),) and not dev.current_stream().waited
    loader.reap_completed()
    assert loader.status("x") is LoadStatus.LOADED and loader.is_ready("x")
    assert loader.reap() == [LoadCompleted(adapter="x", slot=0)]  # reaped above, delivered once
    assert loader.reap() == [] and loader.tracked() == ()
    assert dev.current_stream().waited  # the current stream waited on the load event
    pool.evict("x")
    assert loader.status("x") is LoadStatus.NOT_LOADED


def test_start_load_refuses_duplicates():
    _, loader, _ = make()
    loader.start_load("x", REG["x"], protected=set())
    with pytest.raises(PoolError, match="already resident or loading"):
        loader.start_load("x", REG["x"], protected=set())


def test_in_flight_slots_are_never_victims():
    pool, loader, _ = make()
    loader.start_load("x", REG["x"], protected=set())
    loader.start_load("y", REG["y"], protected=set())
    assert loader.start_load("a", REG["a"], protected=set()) is None  # both slots busy loading
    assert pool.slot_to_uid == ["x", "y"]


def cancelled_load_scenario(pool: LoraPool, loader: OverlapLoader, dev: SimDevice):
    """``a`` runs in slot 0; ``x`` starts loading into slot 1, then all of x's requests are
    cancelled: no request of x is ever scheduled. Its transfers complete."""
    pool.prepare_batch({"a"}, REG)
    assert loader.start_load("x", REG["x"], protected={"a"}) == [LoadStarted(adapter="x", slot=1, overlap=True)]
    dev.complete_all()


def test_cancelled_load_is_reaped_and_its_slot_reusable():
    pool, loader, dev = make()
    cancelled_load_scenario(pool, loader, dev)
    assert loader.reap() == [LoadCompleted(adapter="x", slot=1)]
    assert loader.in_flight() == set() and loader.status("x") is LoadStatus.LOADED
    # x is resident but idle: evictable for another adapter
    assert loader.start_load("y", REG["y"], protected={"a"}) == [
        Evicted(adapter="x", slot=1),
        LoadStarted(adapter="y", slot=1, overlap=True),
    ]


def test_fault_stale_overlap_event_keeps_slot_busy_forever():
    pool, loader, dev = make(faults={"stale_overlap_event"})
    cancelled_load_scenario(pool, loader, dev)
    for _ in range(3):
        assert loader.reap() == []
        assert loader.in_flight() == {"x"}  # the event is done, yet the entry is never removed
        assert loader.start_load("y", REG["y"], protected={"a"}) is None  # stuck: no slot, ever
    assert loader.tracked() == (TrackedLoad("x", 1, True, False),)
    # only scheduling a request of x would have removed the entry (the scheduler reaps just x then)
    loader.reap_completed(only={"x"})
    assert loader.reap() == [LoadCompleted(adapter="x", slot=1)] and loader.in_flight() == set()


def test_reap_completed_only_some_adapters():
    _, loader, dev = make()
    loader.start_load("x", REG["x"], protected=set())
    loader.start_load("y", REG["y"], protected=set())
    loader.reap_completed(only={"x"})
    assert loader.in_flight() == {"x", "y"}  # nothing completed yet
    dev.complete_all()
    loader.reap_completed(only={"y"})
    assert loader.in_flight() == {"x"}
    assert loader.reap() == [LoadCompleted(adapter="y", slot=1), LoadCompleted(adapter="x", slot=0)]


def test_slot_reads_poison_before_the_wait():
    pool, loader, _ = make()
    loader.start_load("x", REG["x"], protected=set())
    a_slot = pool.buffers.A[0]["qkv"][0].view(3, 8, 16)
    assert torch.isnan(a_slot[:, :4]).all() and torch.count_nonzero(a_slot[:, 4:]) == 0
    assert not loader.is_ready("x")
    # the wait (inside reap) orders the current stream after the copies: the data lands
    loader.device.wait_event(loader.device.current_stream(), loader._pending["x"].event)
    assert not torch.isnan(a_slot).any() and not loader.is_ready("x")  # landed, not yet reaped
    loader.reap_completed()
    assert loader.is_ready("x")
    assert pool.hygiene_violations("x") == []


def test_fault_use_before_transfer_reports_ready_on_poison():
    pool, loader, _ = make(faults={"use_before_transfer"})
    loader.start_load("x", REG["x"], protected=set())
    assert loader.is_ready("x")  # the bug: mapped is taken for ready
    assert torch.isnan(pool.buffers.B[1]["down"][0][:, :4]).all()
    assert loader.status("x") is LoadStatus.LOADING


def test_failed_transfer_unmaps_the_slot():
    pool, loader, dev = make()
    pool.prepare_batch({"a"}, REG)
    loader.start_load("x", REG["x"], protected={"a"})
    dev.fail_next(1)
    assert dev.complete_all() == (COPIES - 1, 1)
    assert loader.in_flight() == {"x"}  # pure: still tracked until reaped
    ev = loader.reap()
    assert ev == [LoadFailed(adapter="x", slot=1, detail="host-to-device copy failed")]
    assert loader.in_flight() == set()
    assert pool.slot_to_uid == ["a", EMPTY] and "x" not in pool.uid_to_slot
    assert loader.status("x") is LoadStatus.NOT_LOADED and pool.state()["ranks"] == [4, 0]
    assert all(torch.count_nonzero(t[1]) == 0 for lay in pool.buffers.A + pool.buffers.B for t in lay.values())
    # the slot is usable again
    assert loader.start_load("x", REG["x"], protected={"a"}) == [LoadStarted(adapter="x", slot=1, overlap=True)]


def test_reaping_is_in_start_order():
    _, loader, dev = make()
    loader.start_load("x", REG["x"], protected=set())
    loader.start_load("y", REG["y"], protected=set())
    dev.complete_all()
    assert loader.reap() == [LoadCompleted(adapter="x", slot=0), LoadCompleted(adapter="y", slot=1)]
