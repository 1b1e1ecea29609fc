"""Simulated tensor parallelism for the LoRA memory layer.

With ``tp_size > 1`` the engine keeps one `LoraPool` per rank in this process, all sharing
one pinned host cache — exactly the setting where a cache key without the rank/slice suffix
serves one rank's slice to another. Rank 0 answers every read (maps, pins, buffers for the
forward); every mutation is applied to all ranks in the same order, so their maps stay
identical and each rank's slots can be checked against its own expected slice (L6).

The numeric network is not sharded: ``tp_size > 1`` requires ``network="dummy"``.
"""

from __future__ import annotations

from typing import Any

import torch

from lorainv.config import RuntimeConfig
from lorainv.errors import ConfigError, PoolError
from lorainv.events import Event
from lorainv.impl.dims import ModelDims
from lorainv.impl.lora_pool import LoraPool
from lorainv.impl.pinned import PinnedHostCache


class TensorParallelPools:
    """Rank-0 reads, all-rank writes; see the module docstring."""

    def __init__(self, cfg: RuntimeConfig, dims: ModelDims, device: Any, dtype: torch.dtype) -> None:
        if cfg.network != "dummy":
            raise ConfigError(f"tp_size={cfg.tp_size} simulates LoRA pools only; it needs network='dummy'")
        cache = PinnedHostCache()
        self.pools = [
            LoraPool(cfg.replace(tp_rank=r), dims, device, dtype, host_cache=cache) for r in range(cfg.tp_size)
        ]
        self.primary = self.pools[0]

    @property
    def rank_pools(self) -> tuple[LoraPool, ...]:
        return tuple(self.pools)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.primary, name)

    def load(self, uid: Any, adapter: Any, slot: int, stream: Any) -> list[Event]:
        events = self.primary.load(uid, adapter, slot, stream)
        for p in self.pools[1:]:
            p.load(uid, adapter, slot, stream)
        return events

    def evict(self, uid: Any) -> list[Event]:
        events = self.primary.evict(uid)
        for p in self.pools[1:]:
            p.evict(uid)
        return events

    def unmap_failed(self, uid: Any) -> None:
        for p in self.pools:
            p.unmap_failed(uid)

    def touch(self, uids: Any) -> None:
        for p in self.pools:
            p.touch(uids)

    def pin(self, uid: str) -> None:
        for p in self.pools:
            p.pin(uid)

    def unpin(self, uid: str) -> None:
        for p in self.pools:
            p.unpin(uid)

    def release_host_copies(self, uid: str) -> int:
        """Drop ``uid``'s slices once, for every rank, after every rank has unmapped it."""
        for r, p in enumerate(self.pools):
            if uid in p.uid_to_slot:
                raise PoolError(f"adapter {uid!r} is still resident on tp rank {r}; evict it first")
        return self.primary.host_cache.drop(uid)

    def hygiene_violations(self, uid: Any) -> list[str]:
        return [f"tp rank {r}: {msg}" for r, p in enumerate(self.pools) for msg in p.hygiene_violations(uid)]


def make_lora_pool(cfg: RuntimeConfig, dims: ModelDims, device: Any, dtype: torch.dtype) -> Any:
    """One pool for ``tp_size == 1``; simulated ranks otherwise."""
    if cfg.tp_size == 1:
        return LoraPool(cfg, dims, device, dtype)
    return TensorParallelPools(cfg, dims, device, dtype)
