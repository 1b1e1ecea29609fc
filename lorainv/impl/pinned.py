"""The pinned host pipeline: TP slices of adapter weights, pinned lazily and cached.

* Only the slice this tensor-parallel rank needs is pinned. Column-parallel groups
  (``qkv``, ``gate_up``) shard B's output rows *per slice* (each of q/k/v, gate/up keeps its
  ``rank/size`` share); row-parallel groups (``o``, ``down``) shard A's input columns. The
  other matrix is replicated. With ``tp_size == 1`` nothing is sliced or copied on the host.
* Cache keys carry the adapter, layer, group, matrix and the ``tp{rank}/{size}`` slice
  suffix, so a cache shared by the ranks of one host never serves one rank's slice to
  another (fault ``pinned_cache_key_collision`` drops the suffix).
* ``copy_weight_into_buffer`` never casts on the host: a dtype change happens on the device.

Invariant: ``cache.get(key, adapter, src, ...)`` returns the pinned slice of exactly ``src``: an entry
made from another tensor object under the same key is replaced, never served.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from lorainv.errors import ConfigError
from lorainv.impl import faults
from lorainv.impl.dims import GROUPS, ModelDims

COLUMN_PARALLEL = frozenset({"qkv", "gate_up"})


def shard_dims(dims: ModelDims, tp_size: int) -> ModelDims:
    """The per-rank sizes the slot buffers hold: heads and intermediate split ``tp_size`` ways."""
    if tp_size == 1:
        return dims
    for name in ("num_heads", "num_kv_heads", "intermediate_size"):
        if getattr(dims, name) % tp_size:
            raise ConfigError(f"tp_size={tp_size} does not divide {name}={getattr(dims, name)}")
    return dataclasses.replace(
        dims,
        num_heads=dims.num_heads // tp_size,
        num_kv_heads=dims.num_kv_heads // tp_size,
        intermediate_size=dims.intermediate_size // tp_size,
    )


def cache_key(adapter: str, layer: int, group: str, which: str, tp_rank: int, tp_size: int, suffix: bool = True) -> str:
    """``name/L{layer}/{group}/{A|B}/tp{rank}/{size}``; without ``suffix`` it is the historic colliding key."""
    base = f"{adapter}/L{layer}/{group}/{which}"
    return f"{base}/tp{tp_rank}/{tp_size}" if suffix else base


def tp_slice(t: torch.Tensor, dims: ModelDims, group: str, which: str, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's part of a stacked host tensor ``t`` (``A [S*r, in]`` or ``B [sum(outs), r]``)."""
    if tp_size == 1:
        return t
    if group in COLUMN_PARALLEL and which == "B":
        parts, off = [], 0
        for out in dims.group_out_sizes(group):
            n = out // tp_size
            parts.append(t[off + tp_rank * n : off + (tp_rank + 1) * n])
            off += out
        return torch.cat(parts).contiguous()
    if group not in COLUMN_PARALLEL and which == "A":
        n = dims.group_in(group) // tp_size
        return t[:, tp_rank * n : (tp_rank + 1) * n].contiguous()
    return t


@dataclass
class PinnedHostCache:
    """Pinned host slices by key; may be shared by the pools of several TP ranks on one host.

    An entry lives from the first load that pins it until its adapter is unregistered
    (`drop`); the engine drops only once no slot holds the adapter and no copy of it is in
    flight, so no pending copy loses its source. Mutating: `get` (on a miss), `drop`.
    Pure: `nbytes`, `view`.
    """

    # key -> (adapter name, source tensor, pinned slice)
    entries: dict[str, tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0

    def get(self, key: str, adapter: str, src: torch.Tensor, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The pinned slice of ``src`` under ``key``; made with ``make()`` on a miss (mutates)."""
        hit = self.entries.get(key)
        if hit is not None and hit[1] is src:
            self.hits += 1
            return hit[2]
        self.misses += 1
        pinned = make()
        self.entries[key] = (adapter, src, pinned)
        return pinned

    def drop(self, adapter: str) -> int:
        """Forget every slice of ``adapter`` (on unregister), for every rank; returns how many
        were dropped (mutates)."""
        gone = [k for k, e in self.entries.items() if e[0] == adapter]
        for k in gone:
            del self.entries[k]
        return len(gone)

    def nbytes(self) -> int:
        """Bytes held by every pinned slice (pure)."""
        return sum(e[2].numel() * e[2].element_size() for e in self.entries.values())

    def view(self) -> tuple[tuple[str, str, int, torch.Tensor], ...]:
        """``(key, adapter, pinned bytes, source tensor)`` per entry, in key order (pure)."""
        return tuple((k, e[0], e[2].numel() * e[2].element_size(), e[1]) for k, e in sorted(self.entries.items()))


class PinnedPipeline:
    """Hands out this rank's pinned host slices, one layer at a time; ``log`` records the order."""

    def __init__(self, device: Any, dims: ModelDims, cfg: Any, cache: PinnedHostCache | None = None) -> None:
        self.device = device
        self.dims = dims
        self.cfg = cfg
        self.cache = PinnedHostCache() if cache is None else cache
        self.log: list[tuple[str, int]] = []  # ("pin"|"copy", layer) of the most recent load

    def host_layer(
        self, adapter: Any, layer: int, groups: Iterable[str] = GROUPS
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Pinned ``(A, B)`` slices of ``layer``'s ``groups`` for this rank (cached after the first transfer)."""
        r, n = self.cfg.tp_rank, self.cfg.tp_size
        suffix = not faults.on(self.cfg, "pinned_cache_key_collision")
        out = {}
        for g in groups:
            pair = []
            for which, src in zip("AB", adapter.weights[layer][g]):
                key = cache_key(adapter.name, layer, g, which, r, n, suffix)
                pair.append(self.cache.get(key, adapter.name, src, functools.partial(self._pin, src, g, which)))
            out[g] = (pair[0], pair[1])
        self.log.append(("pin", layer))
        return out

    def _pin(self, src: torch.Tensor, group: str, which: str) -> torch.Tensor:
        return self.device.pin(tp_slice(src, self.dims, group, which, self.cfg.tp_rank, self.cfg.tp_size))


def copy_weight_into_buffer(dst: torch.Tensor, src: torch.Tensor, device: Any, stream: Any) -> torch.Tensor | None:
    """Copy host ``src`` into device ``dst`` on ``stream``.

    Same dtype: one copy. Different dtype: ``src`` travels in its own dtype into a device
    staging tensor, then a device-side copy casts it into ``dst``. Returns the staging tensor,
    which the caller keeps alive until the stream has passed it (None when there is none).
    """
    if dst.dtype == src.dtype:
        device.copy_async(dst, src, stream)
        return None
    staging = torch.empty(src.shape, dtype=src.dtype, device=device.torch_device)
    device.copy_async(staging, src, stream)
    device.copy_async(dst, staging, stream)
    return staging
