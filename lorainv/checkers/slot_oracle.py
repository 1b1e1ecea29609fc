"""The L6 oracle: what a LoRA slot must hold, computed from the adapter's registered tensors.

The snapshotter calls `slot_digests` (what a slot holds) and `expected_digests` (what it
must hold) and puts both in the snapshot; the ``lora`` checker compares them. This code is
written apart from the loader and shares none of its helpers: it works one module at a
time, from the layout documented in `lorainv.impl.lora_buffers`, with plain slicing.

For module ``m`` (slice ``i`` of its group) of an adapter of rank ``r``, on TP rank ``k`` of
``n``, with max rank ``R``:

* the host copy holds ``A_m = A[i*r:(i+1)*r]`` and ``B_m = B[off_m : off_m + out_m]``;
* column-parallel modules (q, k, v, gate, up) keep rows ``k*out_m/n : (k+1)*out_m/n`` of
  ``B_m``; row-parallel ones (o, down) keep columns ``k*in/n : (k+1)*in/n`` of ``A_m``;
* the slot's A holds ``A_m`` at rows ``i*R : i*R + r``; its B holds ``B_m`` at rows
  ``off'_m : off'_m + out_m/n`` (sharded offsets), columns ``0 : r``; everything else,
  the modules the adapter lacks included, is zero.

Digests are blake2b over the raw bytes: two slots are equal iff their bytes are (up to
hash collisions). Expected digests are memoised per adapter object (held, so its id cannot
be reused) and per version of each of its tensors, so an in-place write to a registered
tensor is seen; slot digests are never cached.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

# module -> (group, slice index, parallel style); the group layout of lorainv.impl.lora_buffers
_MODULES: dict[str, tuple[str, int, str]] = {
    "q_proj": ("qkv", 0, "column"),
    "k_proj": ("qkv", 1, "column"),
    "v_proj": ("qkv", 2, "column"),
    "o_proj": ("o", 0, "row"),
    "gate_proj": ("gate_up", 0, "column"),
    "up_proj": ("gate_up", 1, "column"),
    "down_proj": ("down", 0, "row"),
}
_GROUP_MODULES: dict[str, list[str]] = {}
for _m, (_g, _i, _) in _MODULES.items():
    _GROUP_MODULES.setdefault(_g, []).insert(_i, _m)

Digests = tuple[tuple[str, str], ...]  # (region name, hex digest), in a fixed order

# (id(adapter), tp_rank, tp_size, max_rank, dtype) -> (adapter, its tensors' versions, digests)
_MEMO: dict[tuple[Any, ...], tuple[Any, tuple[int, ...], Digests]] = {}
_MEMO_LIMIT = 256


def _digest(t: torch.Tensor) -> str:
    arr = np.ascontiguousarray(t.detach().to("cpu").numpy())
    return hashlib.blake2b(arr.data, digest_size=16).hexdigest()


def _scalar(x: float | torch.Tensor) -> str:
    return hashlib.blake2b(repr(float(x)).encode(), digest_size=8).hexdigest()


def _out_sizes(dims: Any) -> dict[str, int]:
    q = dims.num_heads * dims.head_dim
    kv = dims.num_kv_heads * dims.head_dim
    i = dims.intermediate_size
    h = dims.hidden_size
    return {"q_proj": q, "k_proj": kv, "v_proj": kv, "o_proj": h, "gate_proj": i, "up_proj": i, "down_proj": h}


def _in_sizes(dims: Any) -> dict[str, int]:
    h = dims.hidden_size
    q = dims.num_heads * dims.head_dim
    i = dims.intermediate_size
    return {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": q, "gate_proj": h, "up_proj": h, "down_proj": i}


def slot_digests(buffers: Any, slots: Iterable[int], *, cached: bool = True) -> dict[int, Digests]:
    """What each of ``slots`` holds: a digest per (layer, group, A|B) plus rank and scaling.

    Each buffer is viewed as numpy once; a slot's region is hashed in place (no copy).
    ``cached``: reuse a slot's region digests while every buffer tensor is the same object
    with the same storage and the same ``_version`` (torch bumps the version counter, shared
    by every view, on each in-place write: ``copy_``, ``fill_``, indexed assignment), so any
    write through torch since the digests were taken forces a rehash. Rank and scaling are
    read afresh every time. ``cached=False`` hashes every region (the snapshotter does so when
    the engine is idle)."""
    slots = list(slots)
    if not slots:
        return {}
    ranks = buffers.ranks.tolist()
    scalings = buffers.scalings.tolist()
    tensors = [
        t
        for layer in range(len(buffers.A))
        for g in sorted(buffers.A[layer])
        for t in (buffers.A[layer][g], buffers.B[layer][g])
    ]
    state = tuple((id(t), t.data_ptr(), t._version) for t in tensors)
    hit = _SLOTS.get(id(buffers))
    if cached and hit is not None and hit[0] is buffers and hit[2] == state:
        per_slot = hit[3]
    else:
        per_slot = {}
        if hit is None and len(_SLOTS) >= _SLOTS_LIMIT:
            _SLOTS.pop(next(iter(_SLOTS)))
        _SLOTS[id(buffers)] = (buffers, tensors, state, per_slot)
    names: list[str] | None = None
    arrays: list[np.ndarray] | None = None
    out: dict[int, Digests] = {}
    for s in slots:
        rank, scaling = ranks[s], scalings[s]
        memo = per_slot.get(s)
        if memo is not None and memo[0] == rank and memo[1] == scaling:
            out[s] = memo[2]  # the very tuple of last time: equal inputs, equal digests
            continue
        if arrays is None or names is None:
            names = [
                f"layer {layer} {g}.{which}"
                for layer in range(len(buffers.A))
                for g in sorted(buffers.A[layer])
                for which in ("A", "B")
            ]
            arrays = [t.detach().to("cpu").contiguous().numpy() for t in tensors]
        regions = tuple(
            (name, hashlib.blake2b(np.ascontiguousarray(arr[s]).data, digest_size=16).hexdigest())
            for name, arr in zip(names, arrays)
        )
        out[s] = (("rank", str(int(rank))), ("scaling", _scalar(scaling)), *regions)
        per_slot[s] = (rank, scaling, out[s])
    return out


# id(buffers) -> (the buffers, their tensors, (id, data_ptr, _version) per tensor, slot -> (rank,
# scaling, digests)); holding the objects keeps their ids from being reused while the entry lives
_SLOTS: dict[
    int, tuple[Any, list[torch.Tensor], tuple[tuple[int, int, int], ...], dict[int, tuple[Any, Any, Digests]]]
] = {}
_SLOTS_LIMIT = 64


def expected_digests(
    adapter: Any, dims: Any, *, tp_rank: int, tp_size: int, max_rank: int, dtype: torch.dtype
) -> Digests:
    """What a slot holding ``adapter`` (None: the base model) must contain, as `slot_digests` names it."""
    if adapter is None:
        # a pure function of sizes: memoised by the values it reads, so it cannot go stale
        base_key = (_size_key(dims), tp_rank, tp_size, max_rank, dtype)
        base = _BASE.get(base_key)
        if base is None:
            base = _BASE[base_key] = _build(None, dims, tp_rank, tp_size, max_rank, dtype)
        return base
    versions = tuple(t._version for layer in adapter.weights for ab in layer.values() for t in ab)
    slot_key = (id(adapter), tp_rank, tp_size, max_rank, dtype)
    hit = _MEMO.get(slot_key)
    if hit is not None and hit[0] is adapter and hit[1] == versions:
        return hit[2]
    got = _build(adapter, dims, tp_rank, tp_size, max_rank, dtype)
    if len(_MEMO) >= _MEMO_LIMIT:
        _MEMO.pop(next(iter(_MEMO)))
    _MEMO[slot_key] = (adapter, versions, got)
    return got


_BASE: dict[tuple[Any, ...], Digests] = {}


def _size_key(dims: Any) -> tuple[int, ...]:
    """Every size `_build` reads from ``dims``."""
    return (
        dims.num_layers,
        dims.hidden_size,
        dims.num_heads,
        dims.num_kv_heads,
        dims.head_dim,
        dims.intermediate_size,
    )


def _build(adapter: Any, dims: Any, k: int, n: int, R: int, dtype: torch.dtype) -> Digests:
    outs, ins = _out_sizes(dims), _in_sizes(dims)
    r = 0 if adapter is None else int(adapter.rank)
    scaling = 0.0 if adapter is None else float(adapter.scaling)
    out = [("rank", str(r)), ("scaling", _scalar(scaling))]
    for layer in range(dims.num_layers):
        for g in sorted(_GROUP_MODULES):
            mods = _GROUP_MODULES[g]
            in_local = ins[mods[0]] // n if _MODULES[mods[0]][2] == "row" else ins[mods[0]]
            outs_local = [outs[m] // n if _MODULES[m][2] == "column" else outs[m] for m in mods]
            a_slot = torch.zeros(len(mods) * R, in_local, dtype=dtype)
            b_slot = torch.zeros(sum(outs_local), R, dtype=dtype)
            host = None if adapter is None else adapter.weights[layer].get(g)
            if host is not None and _targets(adapter, mods):
                a_host, b_host = host
                host_off = 0
                slot_off = 0
                for i, m in enumerate(mods):
                    a_m = a_host[i * r : (i + 1) * r]
                    b_m = b_host[host_off : host_off + outs[m]]
                    host_off += outs[m]
                    if _MODULES[m][2] == "row":
                        a_m = a_m[:, k * in_local : (k + 1) * in_local]
                    else:
                        share = outs[m] // n
                        b_m = b_m[k * share : (k + 1) * share]
                    a_slot[i * R : i * R + r] = a_m.to(dtype)
                    b_slot[slot_off : slot_off + outs_local[i], :r] = b_m.to(dtype)
                    slot_off += outs_local[i]
            out.append((f"layer {layer} {g}.A", _digest(a_slot)))
            out.append((f"layer {layer} {g}.B", _digest(b_slot)))
    return tuple(out)


def _targets(adapter: Any, mods: Sequence[str]) -> bool:
    """Does the adapter target any module of the group? (Its host copy of a group it lacks is zero anyway.)"""
    return any(m in adapter.target_modules for m in mods)
