"""`RuntimeConfig`: one frozen, validated dataclass; never mutated after construction."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lorainv.errors import ConfigError
from lorainv.fault_names import FAULTS

EVICTION_POLICIES = ("lru", "fifo")
DRAIN_POLICIES = ("preempt", "admission")
LORA_BACKENDS = ("torch_native", "triton")
DEVICES = ("cpu", "sim", "cuda")
DTYPES = ("float32", "float64", "bfloat16", "float16")
NETWORKS = ("tiny", "dummy")
# Upper bounds keep an untrusted config (e.g. from a trace file) from allocating without limit.
MAX_TOKENS = 1 << 24
MAX_ROWS = 1 << 16


def _int_field(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ConfigError(f"{name}={value} is out of range; allowed: {rng}")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}")


@dataclass(frozen=True)
class RuntimeConfig:
    """Every knob of the runtime, with SGLang-style names.

    Invariants (enforced in ``__post_init__``): every integer is in range,
    ``max_total_tokens`` is a multiple of ``page_size`` and holds at least two pages,
    at most ``max_loras_per_batch - 1`` adapters can be pinned (checked by the pool),
    and ``faults`` only names faults of the catalogue.
    """

    max_loras_per_batch: int = 4
    max_lora_rank: int = 16
    max_total_tokens: int = 2048
    page_size: int = 1
    max_running_requests: int = 32
    chunked_prefill_size: int = 256
    enable_lora_overlap_loading: bool = False
    lora_eviction_policy: str = "lru"
    lora_drain_wait_threshold: float = 0.0
    lora_drain_tolerance: float = 1.2
    lora_drain_policy: str = "preempt"
    lora_drain_quantum: float = 0.0  # 0: the wait threshold
    lora_drain_max_preemptions: int = 8
    strict_mem_check: int = 0
    lora_backend: str = "torch_native"
    device: str = "sim"
    dtype: str = "float32"
    faults: frozenset[str] = field(default_factory=frozenset)
    seed: int = 0
    tp_rank: int = 0
    tp_size: int = 1
    max_sessions: int = 8
    enable_prefix_cache: bool = True
    max_load_retries: int = 1
    network: str = "tiny"
    history_steps: int = 8
    # N keeps the N most recently ended requests (bounded by default, so a long run's per-op cost
    # stays flat); 0 keeps every ended request
    max_finished_requests: int = 1024

    def __post_init__(self) -> None:
        _int_field("max_loras_per_batch", self.max_loras_per_batch, 1, 256)
        _int_field("max_lora_rank", self.max_lora_rank, 1, 1024)
        _int_field("page_size", self.page_size, 1, 256)
        _int_field("max_total_tokens", self.max_total_tokens, 2 * self.page_size, MAX_TOKENS)
        if self.max_total_tokens % self.page_size:
            raise ConfigError(
                f"max_total_tokens={self.max_total_tokens} must be a multiple of page_size={self.page_size}"
            )
        _int_field("max_running_requests", self.max_running_requests, 1, MAX_ROWS)
        _int_field("chunked_prefill_size", self.chunked_prefill_size, 1, MAX_TOKENS)
        _int_field("strict_mem_check", self.strict_mem_check, 0, 2)
        _int_field("seed", self.seed, 0)
        _int_field("tp_size", self.tp_size, 1)
        _int_field("tp_rank", self.tp_rank, 0, self.tp_size - 1)
        _int_field("max_sessions", self.max_sessions, 0, MAX_ROWS)
        _int_field("max_load_retries", self.max_load_retries, 0, 100)
        _int_field("history_steps", self.history_steps, 1, 10_000)
        _int_field("max_finished_requests", self.max_finished_requests, 0, MAX_ROWS)
        if not isinstance(self.enable_lora_overlap_loading, bool):
            raise ConfigError("enable_lora_overlap_loading must be a bool")
        if not isinstance(self.enable_prefix_cache, bool):
            raise ConfigError("enable_prefix_cache must be a bool")
        _choice("lora_eviction_policy", self.lora_eviction_policy, EVICTION_POLICIES)
        _choice("lora_backend", self.lora_backend, LORA_BACKENDS)
        _choice("device", self.device, DEVICES)
        _choice("dtype", self.dtype, DTYPES)
        _choice("network", self.network, NETWORKS)
        _choice("lora_drain_policy", self.lora_drain_policy, DRAIN_POLICIES)
        _int_field("lora_drain_max_preemptions", self.lora_drain_max_preemptions, 0, 1_000)
        for name in ("lora_drain_wait_threshold", "lora_drain_tolerance", "lora_drain_quantum"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"{name}={v!r} must be a finite number >= 0")
        if self.lora_drain_tolerance < 1.0:
            raise ConfigError(f"lora_drain_tolerance={self.lora_drain_tolerance} must be >= 1.0")
        if not isinstance(self.faults, frozenset):
            if isinstance(self.faults, (set, list, tuple)):
                object.__setattr__(self, "faults", frozenset(self.faults))
            else:
                raise ConfigError(f"faults must be a set of fault names, got {self.faults!r}")
        unknown = sorted(f for f in self.faults if f not in FAULTS)
        if unknown:
            raise ConfigError(f"faults: unknown fault(s) {unknown}; known: {sorted(FAULTS)}")

    @property
    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)

    def replace(self, **changes: Any) -> RuntimeConfig:
        """A new validated config with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["faults"] = sorted(self.faults)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RuntimeConfig:
        """Build from a dict (as written by :meth:`to_dict`); unknown keys are a `ConfigError`."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"config must be an object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"config: unknown field(s) {unknown}")
        kw = dict(data)
        if "faults" in kw:
            if not isinstance(kw["faults"], (list, tuple, set, frozenset)) or not all(
                isinstance(f, str) for f in kw["faults"]
            ):
                raise ConfigError("config.faults must be a list of fault names (strings)")
            kw["faults"] = frozenset(kw["faults"])
        try:
            return cls(**kw)
        except TypeError as e:  # pragma: no cover - defensive, fields are checked above
            raise ConfigError(f"config: {e}") from e

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> RuntimeConfig:
        """``overrides`` then ``LORAINV_STRICT_MEM_CHECK`` and ``LORAINV_FAULTS`` (env wins)."""
        env = os.environ if env is None else env
        kw = dict(overrides)
        raw = env.get("LORAINV_STRICT_MEM_CHECK")
        if raw not in (None, ""):
            try:
                kw["strict_mem_check"] = int(raw)
            except ValueError:
                raise ConfigError(f"LORAINV_STRICT_MEM_CHECK={raw!r} must be 0, 1 or 2") from None
        faults = env.get("LORAINV_FAULTS")
        if faults:
            kw["faults"] = frozenset(f.strip() for f in faults.split(",") if f.strip())
        return cls(**kw)
