"""LoRA backends against a float64 reference ``y = x W^T + s (x A^T) B^T``, segment by segment.

Batches follow the adapter-popularity distributions of punica (distinct, identical, uniform, zipf,
skewed), with odd sizes, empty and length-1 requests, mixed ranks, the base slot and GQA widths.
The rank tail of every slot is filled with NaN: a kernel that reads past a slot's own rank fails.
Triton runs under ``TRITON_INTERPRET=1`` (set in tests/conftest.py), so its cases stay small.
"""

from __future__ import annotations

import math

import pytest
import torch

from lorainv.impl.backends import get_backend
from lorainv.impl.batch import LoraBatchInfo, build_lora_batch_info

BACKENDS = ["torch_native", pytest.param("triton", marks=pytest.mark.triton)]
MAX_RANK = 16
RANKS = [0, 1, 4, 16, 8, 3, 0, 2]  # slot 0 is the base model; slot 6 is an empty rank-0 slot
P = len(RANKS)
GROUP_SHAPES = {  # in, out sizes (GQA: q wider than k/v; in not a multiple of BLOCK_K)
    "qkv": (40, (48, 16, 16)),
    "gate_up": (40, (24, 24)),
    "o": (48, (40,)),
    "down": (24, (40,)),
}


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "triton":
        pytest.importorskip("triton")
    return get_backend(request.param)


def make_slots(dist: str, n: int, gen: torch.Generator) -> list[int]:
    """Adapter slot of each of ``n`` requests under a popularity distribution (seeded)."""
    if dist == "distinct":
        order = torch.randperm(P, generator=gen).tolist()
        return [order[i % P] for i in range(n)]
    if dist == "identical":
        return [3] * n
    if dist == "uniform":
        return torch.randint(0, P, (n,), generator=gen).tolist()
    if dist == "zipf":
        w = torch.tensor([1.0 / (k + 1) ** 1.5 for k in range(P)])
        return torch.multinomial(w, n, replacement=True, generator=gen).tolist()
    if dist == "skewed":
        pick = torch.rand(n, generator=gen) < 0.8
        other = torch.randint(0, P, (n,), generator=gen)
        return torch.where(pick, torch.full((n,), 4), other).tolist()
    raise AssertionError(dist)


def make_weights(n_in: int, outs: tuple[int, ...], gen: torch.Generator):
    """Slot buffers at max rank R; rows/cols past each slot's rank hold NaN (must never be read)."""
    n_sl, out = len(outs), sum(outs)
    A = torch.randn(P, n_sl * MAX_RANK, n_in, generator=gen, dtype=torch.float64) / math.sqrt(n_in)
    B = torch.randn(P, out, MAX_RANK, generator=gen, dtype=torch.float64)
    for p, r in enumerate(RANKS):
        A[p].view(n_sl, MAX_RANK, n_in)[:, r:] = float("nan")
        B[p, :, r:] = float("nan")
    ranks = torch.tensor(RANKS)
    scalings = torch.tensor([0.0, 2.0, 0.5, 0.25, 1.0, 1.5, 0.0, 3.0], dtype=torch.float64)
    return A, B, ranks, scalings


def reference(x, W, A, B, slots, lens, scalings, outs):
    """float64 ``x W^T + s (x A_i^T) B_i^T`` per request and slice, by explicit slicing."""
    x, W = x.double(), W.double()
    y = x @ W.T
    start = 0
    for slot, n in zip(slots, lens):
        r = RANKS[slot]
        off = 0
        for i, width in enumerate(outs):
            if r:
                a = A[slot, i * MAX_RANK : i * MAX_RANK + r].double()
                b = B[slot, off : off + width, :r].double()
                y[start : start + n, off : off + width] += scalings[slot] * (x[start : start + n] @ a.T) @ b.T
            off += width
        start += n
    return y


def run_case(backend, group, slots, lens, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    n_in, outs = GROUP_SHAPES[group]
    A, B, ranks, scalings = make_weights(n_in, outs, gen)
    T = sum(lens)
    x = torch.randn(T, n_in, generator=gen, dtype=torch.float64)
    W = torch.randn(sum(outs), n_in, generator=gen, dtype=torch.float64) / math.sqrt(n_in)
    info = build_lora_batch_info(slots, lens, ranks, scalings)
    info.check_valid()
    xd, Wd, Ad, Bd = (t.to(dtype) for t in (x, W, A, B))
    base = xd @ Wd.T
    out = backend.apply(xd, base, Ad, Bd, info, outs)
    assert out is base and out.dtype == dtype and out.shape == (T, sum(outs))
    want = reference(xd, Wd, Ad, Bd, slots, lens, scalings, outs)
    return out, want, info


def draw_lens(n: int, gen: torch.Generator, max_len: int) -> list[int]:
    """Lengths with empty and length-1 requests guaranteed when n >= 3."""
    lens = torch.randint(1, max_len + 1, (n,), generator=gen).tolist()
    if n >= 3:
        lens[0], lens[n // 2] = 0, 1
    return lens


@pytest.mark.parametrize("dist", ["distinct", "identical", "uniform", "zipf", "skewed"])
@pytest.mark.parametrize("n", [1, 3, 7])
def test_popularity_distributions(backend, dist, n):
    seed = 1000 * n + len(dist)
    gen = torch.Generator().manual_seed(seed)
    slots = make_slots(dist, n, gen)
    lens = draw_lens(n, gen, 6 if backend.name == "triton" else 19)
    for group in ("qkv", "down"):
        out, want, _ = run_case(backend, group, slots, lens, seed)
        assert torch.isfinite(out).all(), "a kernel read a NaN rank tail"
        torch.testing.assert_close(out, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("group", list(GROUP_SHAPES))
def test_every_group_with_mixed_ranks(backend, group):
    slots = [1, 2, 2, 3, 4, 5, 7, 0, 6]  # every rank, incl. the base slot and an empty slot
    lens = [2, 1, 3, 17, 1, 2, 1, 2, 1]
    out, want, info = run_case(backend, group, slots, lens, seed=7)
    assert info.num_segments == 8
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)


def test_rank_zero_slots_are_exact_noops(backend):
    gen = torch.Generator().manual_seed(3)
    n_in, outs = GROUP_SHAPES["qkv"]
    A, B, ranks, scalings = make_weights(n_in, outs, gen)
    slots, lens = [0, 6, 0, 1, 6], [3, 2, 1, 2, 1]
    x = torch.randn(sum(lens), n_in, generator=gen, dtype=torch.float64)
    base = torch.randn(sum(lens), sum(outs), generator=gen, dtype=torch.float64)
    keep = base.clone()
    out = backend.apply(x, base, A, B, build_lora_batch_info(slots, lens, ranks, scalings), outs)
    rank0 = torch.tensor([True] * 6 + [False] * 2 + [True])
    assert torch.equal(out[rank0], keep[rank0])
    assert not torch.equal(out[~rank0], keep[~rank0])


def test_empty_batch_and_all_empty_segments(backend):
    n_in, outs = GROUP_SHAPES["o"]
    A, B, ranks, scalings = make_weights(n_in, outs, torch.Generator().manual_seed(0))
    for slots, lens in (([], []), ([1, 2], [0, 0])):
        x = torch.zeros(0, n_in, dtype=torch.float64)
        base = torch.zeros(0, sum(outs), dtype=torch.float64)
        out = backend.apply(x, base, A, B, build_lora_batch_info(slots, lens, ranks, scalings), outs)
        assert out.shape == (0, sum(outs))


def test_long_segment_spans_several_token_blocks(backend):
    out, want, info = run_case(backend, "gate_up", [3, 2], [37, 5], seed=11)
    assert info.max_len == 37
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.bfloat16, 0.15)])
def test_low_precision_inputs(backend, dtype, atol):
    out, want, _ = run_case(backend, "qkv", [1, 3, 3, 0, 4], [2, 3, 1, 2, 4], seed=5, dtype=dtype)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), want, rtol=0.02 if dtype == torch.bfloat16 else 0, atol=atol)


def test_backends_agree_with_each_other():
    pytest.importorskip("triton")
    native, triton_be = get_backend("torch_native"), get_backend("triton")
    gen = torch.Generator().manual_seed(21)
    slots = make_slots("zipf", 5, gen)
    lens = draw_lens(5, gen, 5)
    a, _, _ = run_case(native, "qkv", slots, lens, seed=21)
    b, _, _ = run_case(triton_be, "qkv", slots, lens, seed=21)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_shape_errors_are_reported(backend):
    n_in, outs = GROUP_SHAPES["qkv"]
    A, B, ranks, scalings = make_weights(n_in, outs, torch.Generator().manual_seed(0))
    info: LoraBatchInfo = build_lora_batch_info([1], [2], ranks, scalings)
    x = torch.zeros(2, n_in, dtype=torch.float64)
    with pytest.raises(ValueError, match="base_out"):
        backend.apply(x, torch.zeros(2, 5, dtype=torch.float64), A, B, info, outs)
    with pytest.raises(ValueError, match="slices"):
        backend.apply(x, torch.zeros(2, 80, dtype=torch.float64), A, B, info, (40, 20, 10, 10, 0))
