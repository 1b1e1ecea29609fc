"""LoRA slot pool: exact slots and victims, pins, slot hygiene, the pinned TP pipeline, casts."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from lorainv.config import RuntimeConfig
from lorainv.errors import AdapterError, AdapterNotFoundError, AdapterNotResidentError, PoolError
from lorainv.events import Evicted, LoadStarted
from lorainv.impl.adapters import generate_adapter
from lorainv.impl.device import SimDevice
from lorainv.impl.dims import ModelDims
from lorainv.impl.lora_pool import EMPTY, LoraPool
from lorainv.impl.pinned import PinnedHostCache, cache_key, tp_slice

DIMS = ModelDims(
    num_layers=3, hidden_size=16, num_heads=4, num_kv_heads=2, head_dim=4, intermediate_size=24, vocab_size=32
)
F32 = torch.float32


def gen(name: str, rank: int = 4, seed: int = 0, **kw):
    return generate_adapter(name, DIMS, rank=rank, seed=seed, dtype=F32, **kw)


REG = {n: gen(n, seed=i) for i, n in enumerate("abcdef")}


def make(policy: str = "lru", p: int = 3, dtype=F32, **kw) -> tuple[LoraPool, SimDevice]:
    dev = SimDevice()
    cfg = RuntimeConfig(max_loras_per_batch=p, max_lora_rank=8, lora_eviction_policy=policy, **kw)
    return LoraPool(cfg, DIMS, dev, dtype), dev


def test_empty_sentinel():
    assert repr(EMPTY) == "EMPTY"
    assert copy.deepcopy(EMPTY) is EMPTY and pickle.loads(pickle.dumps(EMPTY)) is EMPTY
    pool, _ = make()
    assert pool.slot_to_uid == [EMPTY, EMPTY, EMPTY] and pool.free_slots() == [0, 1, 2]


@pytest.mark.parametrize(("policy", "victims"), [("lru", ["b", "c"]), ("fifo", ["a", "b"])])
def test_exact_slots_and_eviction_order(policy, victims):
    pool, _ = make(policy)
    for n, slot in zip("abc", range(3)):
        assert pool.prepare_batch({n}, REG) == [LoadStarted(adapter=n, slot=slot, overlap=False)]
    pool.touch(["a"])  # lru: a becomes the most recent; fifo ignores use
    ev = pool.prepare_batch({"d"}, REG)
    v = victims[0]
    assert ev == [Evicted(adapter=v, slot="abc".index(v)), LoadStarted(adapter="d", slot="abc".index(v), overlap=False)]
    ev = pool.prepare_batch({"e"}, REG)
    assert ev[0] == Evicted(adapter=victims[1], slot="abc".index(victims[1]))
    assert pool.uid_to_slot == {u: pool.slot_to_uid.index(u) for u in pool.slot_to_uid}
    st = pool.state()
    assert st["free_slots"] == [] and sorted(st["uid_to_slot"]) == sorted(set("abcde") - set(victims))


def test_lru_ties_break_by_slot():
    pool, _ = make()
    pool.prepare_batch({"a", "b", "c"}, REG)  # one touch for all three: a tie
    assert pool.uid_to_slot == {"a": 0, "b": 1, "c": 2}
    assert pool.choose_slot("d", set()) == (0, "a")


def test_never_evicts_protected_or_pinned():
    pool, _ = make()
    pool.prepare_batch({"a", "b", "c"}, REG)
    pool.pin("a")
    assert pool.choose_slot("d", {"b"}) == (2, "c")
    assert pool.choose_slot("d", {"b", "c"}) is None
    assert pool.can_fit({"d", "b"}) and not pool.can_fit({"d", "e", "b"})
    assert not pool.can_fit({"d"}, protected={"b", "c"})
    with pytest.raises(AdapterError, match="pinned"):
        pool.evict("a")


def test_base_model_only_when_sole_candidate():
    pool, _ = make()
    pool.prepare_batch({None}, REG)
    pool.prepare_batch({"a"}, REG)
    pool.prepare_batch({"b"}, REG)
    assert pool.uid_to_slot == {None: 0, "a": 1, "b": 2}
    assert pool.choose_slot("c", set()) == (1, "a")  # None is the LRU, yet a named adapter goes first
    assert pool.choose_slot("c", {"a"}) == (2, "b")
    assert pool.choose_slot("c", {"a", "b"}) == (0, None)
    assert pool.choose_slot("c", {"a", "b", None}) is None


def test_base_model_slot_is_rank0_and_zero():
    pool, _ = make()
    pool.prepare_batch({"a"}, REG)
    pool.evict("a")
    assert pool.prepare_batch({None}, REG) == [LoadStarted(adapter=None, slot=0, overlap=False)]
    assert pool.state()["ranks"] == [0, 0, 0] and pool.hygiene_violations(None) == []
    assert all(torch.count_nonzero(t[0]) == 0 for lay in pool.buffers.A + pool.buffers.B for t in lay.values())


def test_pin_limit_is_p_minus_1():
    pool, _ = make()
    with pytest.raises(AdapterNotResidentError, match="load it first"):
        pool.pin("a")
    pool.prepare_batch({"a", "b", "c"}, REG)
    pool.pin("a")
    pool.pin("b")
    pool.pin("b")  # idempotent
    with pytest.raises(AdapterError, match=r"max_loras_per_batch - 1 = 2"):
        pool.pin("c")
    assert pool.pinned == {"a", "b"} and pool.state()["pinned"] == ["a", "b"]
    pool.unpin("b")
    pool.pin("c")
    with pytest.raises(AdapterError, match="not pinned"):
        pool.unpin("b")


def test_slot_hygiene_after_reuse_by_lower_rank_and_fewer_modules():
    pool, _ = make(p=1)
    big = gen("big", rank=8, seed=1)
    small = gen("small", rank=2, seed=2, target_modules=["q_proj", "v_proj"])
    pool.prepare_batch({"big"}, {"big": big})
    ev = pool.prepare_batch({"small"}, {"small": small})
    assert ev == [Evicted(adapter="big", slot=0), LoadStarted(adapter="small", slot=0, overlap=False)]
    assert pool.hygiene_violations("small") == []
    assert pool.state()["ranks"] == [2] and pool.state()["scalings"] == [1.0]
    for layer in range(3):
        a = pool.buffers.A[layer]["qkv"][0].view(3, 8, 16)
        assert torch.equal(a[0, :2], small.weights[layer]["qkv"][0][0:2])
        assert torch.count_nonzero(a[:, 2:]) == 0  # rank tail
        assert torch.count_nonzero(a[1]) == 0  # k_proj: absent module
        assert torch.count_nonzero(pool.buffers.B[layer]["qkv"][0][:, 2:]) == 0
        for g in ("o", "gate_up", "down"):  # absent groups
            assert torch.count_nonzero(pool.buffers.A[layer][g][0]) == 0
            assert torch.count_nonzero(pool.buffers.B[layer][g][0]) == 0


def test_fault_stale_slot_tail_keeps_old_tenant():
    pool, _ = make(p=1, faults={"stale_slot_tail"})
    pool.prepare_batch({"big"}, {"big": gen("big", rank=8, seed=1)})
    pool.prepare_batch({"small"}, {"small": gen("small", rank=2, seed=2, target_modules=["q_proj"])})
    bad = pool.hygiene_violations("small")
    assert "slot 0: layer 0 qkv.A differs from 'small'" in bad and "slot 0: layer 2 down.B differs from 'small'" in bad


def test_slot_of_raises_never_slot0():
    pool, _ = make()
    pool.prepare_batch({"a"}, REG)
    assert pool.slot_of("a") == 0
    with pytest.raises(AdapterNotResidentError, match="'zz' is not resident"):
        pool.slot_of("zz")
    faulty, _ = make(faults={"nonresident_falls_back_to_slot0"})
    assert faulty.slot_of("zz") == 0


def test_prepare_batch_failure_leaves_pool_unchanged():
    pool, _ = make()
    pool.prepare_batch({"a", "b", "c"}, REG)
    pool.pin("a")
    before = pool.state()
    bufs = [t.clone() for lay in pool.buffers.A for t in lay.values()]
    with pytest.raises(AdapterNotResidentError, match="cannot make"):
        pool.prepare_batch({"d", "e", "f"}, REG)
    with pytest.raises(AdapterNotResidentError):
        pool.prepare_batch({"d", "e"}, REG, protected={"b"})
    with pytest.raises(AdapterNotFoundError, match="'zz' is not registered"):
        pool.prepare_batch({"d", "zz"}, REG)
    assert pool.state() == before
    assert all(torch.equal(x, t) for x, t in zip(bufs, (t for lay in pool.buffers.A for t in lay.values())))
    # a feasible batch evicts only outside batch ∪ protected ∪ pinned
    ev = pool.prepare_batch({"d", "b"}, REG, protected={"e"})
    assert ev == [Evicted(adapter="c", slot=2), LoadStarted(adapter="d", slot=2, overlap=False)]


def test_choose_slot_and_load_refuse_misuse():
    pool, _ = make()
    pool.prepare_batch({"a"}, REG)
    with pytest.raises(PoolError, match="already resident"):
        pool.choose_slot("a", set())
    with pytest.raises(PoolError, match="out of range"):
        pool.load("b", REG["b"], 3, pool.device.current_stream())
    pool.prepare_batch({"b", "c"}, REG)
    pool.pin("b")
    with pytest.raises(AdapterError, match="pinned"):
        pool.load("d", REG["d"], 1, pool.device.current_stream())


def test_fault_evict_in_batch_adapter_ignores_protected_and_pins():
    pool, _ = make(faults={"evict_in_batch_adapter"})
    pool.prepare_batch({"a", "b", "c"}, REG)
    pool.pin("a")
    assert pool.choose_slot("d", {"a", "b", "c"}) == (0, "a")


def test_load_pipelines_pinning_one_layer_ahead():
    pool, dev = make()
    pool.prepare_batch({"a"}, REG)
    assert pool.pipeline.log == [("pin", 0), ("pin", 1), ("copy", 0), ("pin", 2), ("copy", 1), ("copy", 2)]
    cache = pool.pipeline.cache
    assert "a/L0/qkv/A/tp0/1" in cache.entries and cache.misses == 3 * 4 * 2 and cache.hits == 0
    pinned = dev.pinned_bytes
    pool.evict("a")
    pool.prepare_batch({"a"}, REG)  # second transfer: served from the cache, nothing re-pinned
    assert cache.hits == 24 and dev.pinned_bytes == pinned
    assert cache.drop("a") == 24 and cache.entries == {}


def test_host_cache_only_pins_present_groups():
    pool, _ = make()
    pool.prepare_batch({"q"}, {"q": gen("q", target_modules=["q_proj"])})
    assert sorted({k.split("/")[2] for k in pool.pipeline.cache.entries}) == ["qkv"]


def tp_pools(fault: bool) -> tuple[LoraPool, LoraPool]:
    shared = PinnedHostCache()
    faults = {"pinned_cache_key_collision"} if fault else set()
    pools = []
    for rank in (0, 1):
        cfg = RuntimeConfig(max_loras_per_batch=2, max_lora_rank=8, tp_rank=rank, tp_size=2, faults=faults)
        pools.append(LoraPool(cfg, DIMS, SimDevice(), F32, host_cache=shared))
    return pools[0], pools[1]


def test_tp_slices_and_cache_keys_per_rank():
    p0, p1 = tp_pools(fault=False)
    assert p0.buffers.B[0]["qkv"].shape == (2, 8 + 4 + 4, 8) and p0.buffers.A[0]["o"].shape == (2, 8, 8)
    for p in (p0, p1):
        p.prepare_batch({"a"}, REG)
        assert p.hygiene_violations("a") == []
    keys = set(p0.pipeline.cache.entries)
    assert {cache_key("a", 0, "qkv", "B", 0, 2), cache_key("a", 0, "qkv", "B", 1, 2)} <= keys
    assert "a/L0/qkv/B/tp1/2" in keys and len(keys) == 2 * 24
    a, b = REG["a"].weights[0]["qkv"]
    # column parallel: each of q/k/v keeps its half of the output rows
    want_b1 = torch.cat([b[8:16], b[16 + 4 : 24], b[24 + 4 : 32]])  # q 16 rows, k and v 8 each
    assert torch.equal(tp_slice(b, DIMS, "qkv", "B", 1, 2), want_b1)
    assert torch.equal(p1.buffers.B[0]["qkv"][0][:, :4], want_b1)
    assert torch.equal(tp_slice(a, DIMS, "qkv", "A", 1, 2), a)
    # row parallel: o and down shard A's input columns; B is replicated
    o_a, o_b = REG["a"].weights[0]["o"]
    assert torch.equal(p1.buffers.A[0]["o"][0][:4], o_a[:, 8:16])
    assert torch.equal(p1.buffers.B[0]["o"][0][:, :4], o_b)
    d_a = REG["a"].weights[2]["down"][0]
    assert torch.equal(p0.buffers.A[2]["down"][0][:4], d_a[:, :12])


def test_fault_pinned_cache_key_collision_serves_wrong_slice():
    p0, p1 = tp_pools(fault=True)
    p0.prepare_batch({"a"}, REG)
    p1.prepare_batch({"a"}, REG)
    assert "a/L0/qkv/B" in p0.pipeline.cache.entries and len(p0.pipeline.cache.entries) == 24
    assert p0.hygiene_violations("a") == []
    assert "slot 0: layer 0 qkv.B differs from 'a'" in p1.hygiene_violations("a")


def test_dtype_cast_happens_on_device_side():
    pool, dev = make(dtype=torch.float64)
    calls = []
    real = dev.copy_async

    def spy(dst, src, stream):
        calls.append((src.dtype, dst.dtype, any(src.data_ptr() == t.data_ptr() for t in host)))
        real(dst, src, stream)

    host = [t for lay in REG["a"].weights for ab in lay.values() for t in ab]
    dev.copy_async = spy
    pool.prepare_batch({"a"}, REG)
    assert len(calls) == 3 * 4 * 2 * 2
    # host -> device copies keep the host dtype; the only casting copies read a device staging tensor
    assert all(s == d == F32 for s, d, from_host in calls if from_host)
    casts = [(s, d) for s, d, from_host in calls if not from_host]
    assert casts == [(F32, torch.float64)] * 24 and calls[0][2] and not calls[1][2]
    assert pool.hygiene_violations("a") == []
    got = pool.buffers.B[1]["gate_up"][0][:, :4]
    assert got.dtype == torch.float64 and torch.equal(got, REG["a"].weights[1]["gate_up"][1].double())


def test_same_dtype_copies_once_and_side_stream_is_overlap():
    pool, dev = make()
    side = dev.new_stream("side")
    ev = pool.load("a", REG["a"], 1, side)
    assert ev == [LoadStarted(adapter="a", slot=1, overlap=True)]
    assert dev.pending() == 3 * 4 * 2
    assert torch.isnan(pool.buffers.A[0]["qkv"][1][:4]).all()  # poisoned until complete
    dev.complete_all()
    assert pool.hygiene_violations("a") == []


def test_unmap_failed_and_touch_bookkeeping():
    pool, dev = make()
    side = dev.new_stream("side")
    pool.load("a", REG["a"], 0, side)
    dev.fail_next(1)
    dev.complete_all()
    pool.unmap_failed("a")
    assert pool.slot_to_uid[0] is EMPTY and pool.state()["ranks"][0] == 0
    assert all(torch.count_nonzero(t[0]) == 0 for lay in pool.buffers.A for t in lay.values())
    pool.prepare_batch({"b", "c"}, REG)
    pool.touch("b")
    assert pool.state()["lru_order"] == ["c", "b"] and pool.state()["fifo_order"] == ["b", "c"]
