"""Stateful fuzzing of LoraPool + OverlapLoader on SimDevice, with the L1/L4/L5/L6/L8 invariants
checked after every rule, and a proof of power: each LoRA-pool fault is caught."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from lorainv.config import RuntimeConfig
from lorainv.errors import AdapterError, AdapterNotResidentError
from lorainv.events import Event, Evicted, LoadCompleted, LoadFailed, LoadStarted
from lorainv.impl.adapters import generate_adapter
from lorainv.impl.device import SimDevice
from lorainv.impl.dims import TARGET_MODULES, ModelDims
from lorainv.impl.lora_pool import EMPTY, LoraPool
from lorainv.impl.overlap_loader import OverlapLoader

DIMS = ModelDims(
    num_layers=2, hidden_size=8, num_heads=2, num_kv_heads=1, head_dim=4, intermediate_size=12, vocab_size=16
)
NAMES = ("a", "b", "c", "d", "e")
UIDS: tuple[Any, ...] = (None, *NAMES)
# varied ranks and module sets so that slot reuse exercises rank tails and absent modules
REG = {
    n: generate_adapter(n, DIMS, rank=r, seed=i, dtype=torch.float32, target_modules=mods)
    for i, (n, r, mods) in enumerate(
        zip(NAMES, (8, 1, 4, 2, 6), (TARGET_MODULES, ["q_proj"], ["v_proj", "down_proj"], TARGET_MODULES, ["o_proj"]))
    )
}
BASE_CFG = RuntimeConfig(max_loras_per_batch=3, max_lora_rank=8, enable_lora_overlap_loading=True)
SETTINGS = settings(max_examples=50, stateful_step_count=30, derandomize=True, deadline=None, database=None)


def by_name(uids) -> list[Any]:
    return sorted(uids, key=lambda u: (u is not None, u or ""))


class LoraPoolMachine(RuleBasedStateMachine):
    """Drives the pool and the loader the way the engine does: reap before every decision,
    protect loads in flight, never schedule a cancelled adapter."""

    cfg: ClassVar[RuntimeConfig] = BASE_CFG

    def __init__(self) -> None:
        super().__init__()
        self.dev = SimDevice()
        self.pool = LoraPool(self.cfg, DIMS, self.dev, torch.float32)
        self.loader = OverlapLoader(self.pool, self.dev, self.cfg)
        self.loading: set[Any] = set()  # shadow: overlap loads started, not yet completed or failed
        self.evictions: list[tuple[Any, frozenset, frozenset]] = []  # (victim, protected, pinned)

    # ---- helpers -----------------------------------------------------------------------

    def mapped(self) -> set[Any]:
        return set(self.pool.uid_to_slot)

    def note(self, events: list[Event], protected=frozenset()) -> None:
        for e in events:
            if isinstance(e, Evicted):
                self.evictions.append((e.adapter, frozenset(protected), frozenset(self.pool.pinned)))
            elif isinstance(e, LoadStarted) and e.overlap:
                self.loading.add(e.adapter)
            elif isinstance(e, (LoadCompleted, LoadFailed)):
                assert e.adapter in self.loading, f"{e} for a load never started"
                self.loading.discard(e.adapter)

    def reap(self) -> None:
        self.note(self.loader.reap())

    def teardown(self) -> None:
        self.reap()

    # ---- rules -------------------------------------------------------------------------

    @rule(batch=st.sets(st.sampled_from(UIDS), min_size=1, max_size=3), extra=st.sets(st.sampled_from(UIDS)))
    def prepare_batch(self, batch, extra):
        self.reap()
        protected = (set(extra) & self.mapped()) | self.loader.in_flight()
        before = self.pool.state()
        try:
            events = self.pool.prepare_batch(batch, REG, protected)
        except AdapterError:
            assert not self.pool.can_fit(batch, protected)
            assert self.pool.state() == before, "a refused prepare_batch changed the pool"
        else:
            self.note(events, set(batch) | protected)
        self.reap()

    @precondition(lambda self: set(UIDS) - self.mapped())
    @rule(data=st.data())
    def start_overlap_load(self, data):
        self.reap()
        uid = data.draw(st.sampled_from(by_name(set(UIDS) - self.mapped())), label="uid")
        protected = data.draw(st.sets(st.sampled_from(by_name(self.mapped()) or [None])), label="protected")
        events = self.loader.start_load(uid, None if uid is None else REG[uid], protected)
        if events is not None:
            self.note(events, set(protected) | self.loader.in_flight() - {uid})
        self.reap()

    @rule(n=st.one_of(st.none(), st.integers(1, 16)))  # a whole load is at most 16 copies
    def complete_transfers(self, n):
        self.dev.complete(n)
        self.reap()

    @precondition(lambda self: self.dev.pending() > 0)
    @rule()
    def fail_transfer(self):
        self.dev.fail_next(1)

    @precondition(lambda self: self.loading)
    @rule(data=st.data())
    def cancel(self, data):
        """Every request of a loading adapter is cancelled: nobody will schedule it."""
        data.draw(st.sampled_from(by_name(self.loading)), label="cancelled")
        self.reap()

    @precondition(lambda self: self.pool.uid_to_slot)
    @rule(data=st.data())
    def schedule(self, data):
        """A request of a ready adapter is scheduled."""
        self.reap()
        uid = data.draw(st.sampled_from(by_name(self.mapped())), label="uid")
        if self.loader.is_ready(uid):
            self.pool.touch([uid])
        self.reap()

    @precondition(lambda self: self.pool.uid_to_slot)
    @rule(data=st.data())
    def evict(self, data):
        self.reap()
        cands = self.mapped() - self.pool.pinned - self.loader.in_flight()
        if cands:
            uid = data.draw(st.sampled_from(by_name(cands)), label="uid")
            self.note(self.pool.evict(uid))

    @precondition(lambda self: {u for u in NAMES if u in self.pool.uid_to_slot} - self.pool.pinned)
    @rule(data=st.data())
    def pin(self, data):
        uid = data.draw(st.sampled_from(sorted({u for u in NAMES if u in self.pool.uid_to_slot} - self.pool.pinned)))
        if len(self.pool.pinned) >= self.pool.num_slots - 1:
            try:
                self.pool.pin(uid)
            except AdapterError as e:
                assert "max_loras_per_batch - 1" in str(e)
            else:
                raise AssertionError("pin beyond P - 1 was accepted")
        else:
            self.pool.pin(uid)

    @precondition(lambda self: self.pool.pinned)
    @rule(data=st.data())
    def unpin(self, data):
        self.pool.unpin(data.draw(st.sampled_from(sorted(self.pool.pinned)), label="uid"))

    # ---- invariants --------------------------------------------------------------------

    @invariant()
    def l1_inverse_maps(self):
        pool = self.pool
        for u, s in pool.uid_to_slot.items():
            assert pool.slot_to_uid[s] == u, f"L1: uid {u!r} -> slot {s} -> {pool.slot_to_uid[s]!r}"
        for s, o in enumerate(pool.slot_to_uid):
            assert o is EMPTY or pool.uid_to_slot.get(o) == s, f"L1: slot {s} -> {o!r} not mapped back"
            if o is EMPTY:
                assert int(pool.buffers.ranks[s]) == 0, f"L1: free slot {s} has a nonzero rank"
        assert len(pool.uid_to_slot) + len(pool.free_slots()) == pool.num_slots

    @invariant()
    def l4_pins(self):
        assert self.pool.pinned <= self.mapped(), f"L4: pinned but not resident: {self.pool.pinned - self.mapped()}"
        assert len(self.pool.pinned) <= self.pool.num_slots - 1

    @invariant()
    def l5_victims_outside_batch(self):
        for victim, protected, pinned in self.evictions:
            assert victim not in protected, f"L5: evicted {victim!r} although the batch protects {set(protected)}"
            assert victim not in pinned, f"L4: evicted pinned {victim!r}"
        self.evictions.clear()

    @invariant()
    def l6_slot_hygiene(self):
        tracked = {t.uid for t in self.loader.tracked()}
        for uid in self.mapped() - tracked:
            assert self.pool.hygiene_violations(uid) == [], f"L6: {uid!r}"

    @invariant()
    def l8_loads(self):
        tracked = self.loader.tracked()
        uids = {t.uid for t in tracked}
        assert uids <= self.mapped(), f"L8: loads in flight on unmapped uids {uids - self.mapped()}"
        done = [t.uid for t in tracked if t.done]
        assert not done, f"L8: completed loads never reaped: {done}"
        assert uids == self.loading, f"L8: tracked {uids} != started-not-finished {self.loading}"
        for u in UIDS:
            want = u in self.pool.uid_to_slot and u not in uids
            assert self.loader.is_ready(u) == want, f"L8: ready({u!r}) != mapped and not in flight"

    @invariant()
    def no_slot0_fallback(self):
        for u in set(UIDS) - self.mapped():
            try:
                self.pool.slot_of(u)
            except AdapterNotResidentError:
                continue
            raise AssertionError(f"slot_of({u!r}) answered for a non-resident adapter")


def machine_with(cfg: RuntimeConfig) -> type[LoraPoolMachine]:
    return type("LoraPoolMachineWith", (LoraPoolMachine,), {"cfg": cfg})


@pytest.mark.parametrize("policy", ["lru", "fifo"])
def test_lora_pool_machine(policy):
    run_state_machine_as_test(machine_with(BASE_CFG.replace(lora_eviction_policy=policy)), settings=SETTINGS)


@pytest.mark.parametrize(
    "fault",
    [
        "evict_in_batch_adapter",
        "stale_overlap_event",
        "stale_slot_tail",
        "use_before_transfer",
        "nonresident_falls_back_to_slot0",
    ],
)
def test_machine_catches_fault(fault):
    machine = machine_with(BASE_CFG.replace(faults=frozenset({fault})))
    with pytest.raises(AssertionError):
        # detection only (bench/detect.py measures shrinking): no shrink phase keeps this fast
        fast = settings(SETTINGS, report_multiple_bugs=False, phases=[Phase.explicit, Phase.generate])
        run_state_machine_as_test(machine, settings=fast)
