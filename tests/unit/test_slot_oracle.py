"""Issue 14 §3: an independent L6. The slot oracle computes a slot's contents from the
adapter's registered tensors with its own code; the snapshot digests every readable slot on
every op, so a corruption in a later op is seen."""

from __future__ import annotations

import pytest
import torch

from lorainv.checkers import run_checks, select
from lorainv.checkers.slot_oracle import expected_digests, slot_digests
from lorainv.config import RuntimeConfig
from lorainv.errors import InvariantViolation
from lorainv.impl.adapters import generate_adapter
from lorainv.impl.device import SimDevice
from lorainv.impl.dims import ModelDims
from lorainv.impl.engine import Engine
from lorainv.impl.lora_pool import LoraPool
from lorainv.impl.pinned import PinnedHostCache
from lorainv.ops import AddRequest, LoadAdapter, Step

DIMS = ModelDims(
    num_layers=2, hidden_size=16, num_heads=4, num_kv_heads=2, head_dim=4, intermediate_size=24, vocab_size=32
)


def _pools(tp_size: int, dtype: torch.dtype) -> list[LoraPool]:
    shared = PinnedHostCache()
    return [
        LoraPool(
            RuntimeConfig(max_loras_per_batch=3, max_lora_rank=8, tp_rank=k, tp_size=tp_size),
            DIMS,
            SimDevice(),
            dtype,
            host_cache=shared,
        )
        for k in range(tp_size)
    ]


@pytest.mark.parametrize("tp_size", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_oracle_agrees_with_a_clean_load(tp_size: int, dtype: torch.dtype) -> None:
    """A big adapter, then a smaller one lacking modules in the same slot: both exact."""
    big = generate_adapter("big", DIMS, rank=8, seed=1, dtype=torch.float32)
    small = generate_adapter("small", DIMS, rank=2, seed=2, dtype=torch.float32, target_modules=["q_proj", "down_proj"])
    for k, pool in enumerate(_pools(tp_size, dtype)):
        pool.prepare_batch({"big"}, {"big": big})
        want = expected_digests(big, DIMS, tp_rank=k, tp_size=tp_size, max_rank=8, dtype=dtype)
        assert slot_digests(pool.buffers, [0])[0] == want
        pool.evict("big")
        pool.prepare_batch({"small"}, {"small": small})
        want = expected_digests(small, DIMS, tp_rank=k, tp_size=tp_size, max_rank=8, dtype=dtype)
        assert slot_digests(pool.buffers, [0])[0] == want
        # the base model's slot is all zero with rank 0
        pool.prepare_batch({None}, {})
        base = expected_digests(None, DIMS, tp_rank=k, tp_size=tp_size, max_rank=8, dtype=dtype)
        slot = pool.uid_to_slot[None]
        assert slot_digests(pool.buffers, [slot])[slot] == base


def test_oracle_sees_a_rank_tail_and_another_ranks_slice() -> None:
    a = generate_adapter("a", DIMS, rank=4, seed=3, dtype=torch.float32)
    p0, p1 = _pools(2, torch.float32)
    p0.prepare_batch({"a"}, {"a": a})
    p1.prepare_batch({"a"}, {"a": a})
    want0 = dict(expected_digests(a, DIMS, tp_rank=0, tp_size=2, max_rank=8, dtype=torch.float32))
    want1 = dict(expected_digests(a, DIMS, tp_rank=1, tp_size=2, max_rank=8, dtype=torch.float32))
    held = dict(slot_digests(p0.buffers, [0])[0])
    assert held == want0 and dict(slot_digests(p1.buffers, [0])[0]) == want1
    # rank 1 wants the other half of q/k/v/gate/up outputs and o/down inputs
    assert {r for r in want0 if want0[r] != want1[r]} == {
        f"layer {i} {g}" for i in range(2) for g in ("qkv.B", "gate_up.B", "o.A", "down.A")
    }
    p0.buffers.A[1]["o"][0][5, 0] = 1.0  # row 5: inside slice 0's rank tail (rank 4 of R=8)
    held = dict(slot_digests(p0.buffers, [0])[0])
    assert {r for r in held if held[r] != want0[r]} == {"layer 1 o.A"}


def test_oracle_memo_sees_an_in_place_write_to_a_registered_tensor() -> None:
    a = generate_adapter("a", DIMS, rank=4, seed=3, dtype=torch.float32)
    before = expected_digests(a, DIMS, tp_rank=0, tp_size=1, max_rank=8, dtype=torch.float32)
    a.weights[0]["qkv"][0][0, 0] += 1.0
    after = expected_digests(a, DIMS, tp_rank=0, tp_size=1, max_rank=8, dtype=torch.float32)
    assert dict(before)["layer 0 qkv.A"] != dict(after)["layer 0 qkv.A"]


def _overwrite_neighbour(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planted bug: every load also writes its weights into the slot below it."""
    real = LoraPool._write_slot

    def write_twice(self: LoraPool, slot: int, adapter: object, stream: object) -> None:
        real(self, slot, adapter, stream)  # type: ignore[arg-type]
        if slot > 0:
            for layer in range(len(self.buffers.A)):
                for g in self.buffers.A[layer]:
                    self.buffers.A[layer][g][slot - 1].copy_(self.buffers.A[layer][g][slot])
                    self.buffers.B[layer][g][slot - 1].copy_(self.buffers.B[layer][g][slot])

    monkeypatch.setattr(LoraPool, "_write_slot", write_twice)


OPS = [
    LoadAdapter("a", "gen:4:1"),
    LoadAdapter("b", "gen:8:2"),
    AddRequest("ra", (1, 2, 3), "a", 4),
    Step(),  # a loads into slot 0
    AddRequest("rb", (4, 5, 6), "b", 4),
    Step(),  # b loads into slot 1 (and, planted, over slot 0)
]


def test_clean_loads_keep_every_slot_exact() -> None:
    eng = Engine(RuntimeConfig(network="dummy", max_total_tokens=128, strict_mem_check=2))
    for op in OPS:
        eng.apply(op)
    snap = eng.snapshot()
    assert {(c.uid, c.slot) for c in snap.lora.contents} == {("a", 0), ("b", 1)}
    assert run_checks(snap, select("lora")) == []


def test_planted_neighbour_overwrite_in_a_later_op_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    _overwrite_neighbour(monkeypatch)
    eng = Engine(RuntimeConfig(network="dummy", max_total_tokens=128))
    for op in OPS[:4]:
        eng.apply(op)
    assert run_checks(eng.snapshot(), select("lora")) == []  # slot 1 was empty: nothing readable broke
    for op in OPS[4:]:
        eng.apply(op)
    found = run_checks(eng.snapshot(), select("lora"))
    assert [(v.invariant, v.offenders) for v in found] == [("L6", ("a", 0))]
    assert found[0].message.startswith("slot 0 of 'a' differs from its registered weights")
    # at strict level 2 the step that overwrote a's slot raises
    strict = Engine(RuntimeConfig(network="dummy", max_total_tokens=128, strict_mem_check=2))
    for op in OPS[:4]:
        strict.apply(op)
    strict.apply(OPS[4])
    with pytest.raises(InvariantViolation, match="L6"):
        strict.apply(OPS[5])


def test_lora_snap_hygiene_is_derived_from_the_digests(monkeypatch: pytest.MonkeyPatch) -> None:
    _overwrite_neighbour(monkeypatch)
    eng = Engine(RuntimeConfig(network="dummy", max_total_tokens=128))
    for op in OPS:
        eng.apply(op)
    hyg = eng.snapshot().lora.hygiene
    assert [uid for uid, _ in hyg] == ["a"] and hyg[0][1].startswith("slot 0: ")


@pytest.mark.parametrize("write", ["indexed", "copy_", "fill_", "view mul_", "scaling"])
def test_cached_digests_see_every_torch_write(write: str) -> None:
    """The digest cache is keyed on the buffers' torch version counters: any in-place write
    through torch, to any view, makes the next (cached) read rehash, and the cached answer
    always equals a from-scratch one."""
    (pool,) = _pools(1, torch.float32)
    a = generate_adapter("a", DIMS, rank=4, seed=3, dtype=torch.float32)
    pool.prepare_batch({"a"}, {"a": a})
    slot = pool.uid_to_slot["a"]
    before = slot_digests(pool.buffers, [slot])[slot]
    assert slot_digests(pool.buffers, [slot])[slot] is before  # unchanged: reused as is
    buf = pool.buffers.B[1]["gate_up"]
    if write == "indexed":
        buf[slot, 3, 0] = 7.0
    elif write == "copy_":
        buf[slot, :2].copy_(torch.ones(2, buf.shape[2]))
    elif write == "fill_":
        pool.buffers.A[0]["o"][slot].fill_(0.5)
    elif write == "view mul_":
        buf.view(-1).narrow(0, slot * buf[0].numel(), buf[0].numel()).mul_(0)  # a view of a view
    else:
        pool.buffers.scalings[slot] = 3.0
    after = slot_digests(pool.buffers, [slot])[slot]
    assert after != before
    assert after == slot_digests(pool.buffers, [slot], cached=False)[slot]
    assert after != expected_digests(a, DIMS, tp_rank=0, tp_size=1, max_rank=8, dtype=torch.float32)
