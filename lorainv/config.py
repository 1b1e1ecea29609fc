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
# "sim-auto" (the default) lands side-stream copies by itself after ``transfer_latency_steps``
# engine steps; "sim" lands them only when its driver says so (``complete_transfers`` /
# ``CompleteTransfers``): the fuzzer and every stored trace use it to choose interleavings.
DEVICES = ("sim-auto", "sim", "cpu", "cuda")
DTYPES = ("float32", "float64", "bfloat16", "float16")
NETWORKS = ("tiny", "dummy")
# Upper bounds keep an untrusted config (e.g. from a trace file) from allocating without limit.
MAX_TOKENS = 1 << 24
MAX_ROWS = 1 << 16
MAX_LATENCY_STEPS = 10_000

STRICT_ENV = "LORAINV_STRICT_MEM_CHECK"
# SGLang's own name for the same switch (its scheduler self-checks memory while busy)
STRICT_ENV_SGLANG = "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY"
STRICT_LEVELS = (0, 1, 2)

# SGLang server args (``sglang.launch_server --help``) that RuntimeConfig holds under the same name.
SGLANG_SAME_NAME = (
    "max_loras_per_batch",
    "max_lora_rank",
    "lora_eviction_policy",
    "lora_backend",
    "enable_lora_overlap_loading",
    "max_total_tokens",
    "page_size",
    "max_running_requests",
    "chunked_prefill_size",
    "tp_size",
    "dtype",
    "device",
)
# SGLang server args that lorainv does not model, and what to do instead.
SGLANG_UNMODELLED: dict[str, str] = {
    "lora_paths": "adapters are not part of the config; register each with Engine.load_adapter(name, path, pinned=...)",
    "lora_target_modules": "each adapter applies LoRA to the modules its own adapter_config.json names; there is no "
    "server-wide target set to reserve buffers for",
    "max_loaded_loras": "lorainv keeps every registered adapter on the host; there is no host-side adapter limit",
    "max_lora_chunk_size": "it tunes SGLang's csgmv backend, which lorainv does not have (lora_backend is "
    "'torch_native' or 'triton')",
}


# SGLang server args that RuntimeConfig holds under another name (see `RuntimeConfig.from_sglang_args`).
SGLANG_RENAMED: dict[str, str] = {
    "random_seed": "seed",
    "disable_radix_cache": "enable_prefix_cache (negated)",
    "enable_lora": "nothing: LoRA is always enabled; only enable_lora=False is refused",
}


def _unknown_fields_message(unknown: list[str]) -> str:
    """One message for keywords RuntimeConfig has no field for, explaining SGLang's names."""
    parts = []
    for name in unknown:
        if name in SGLANG_UNMODELLED:
            parts.append(f"{name} is an SGLang server arg that lorainv does not model: {SGLANG_UNMODELLED[name]}")
        elif name in SGLANG_RENAMED:
            parts.append(
                f"{name} is an SGLang server arg; RuntimeConfig.from_sglang_args maps it to {SGLANG_RENAMED[name]}"
            )
    rest = [n for n in unknown if n not in SGLANG_UNMODELLED and n not in SGLANG_RENAMED]
    if rest:
        parts.append(f"unknown field(s) {rest}; RuntimeConfig has {sorted(RuntimeConfig.__dataclass_fields__)}")
    return "config: " + "; ".join(parts)


def strict_level_from_env(default: int, env: Mapping[str, str] | None = None) -> int:
    """The strict checking level from the environment, else ``default``.

    Reads ``LORAINV_STRICT_MEM_CHECK`` and SGLang's ``SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY``
    (an alias); an unset or empty variable does not count. A value other than 0, 1 or 2, or the
    two set to different levels, is a `ConfigError` naming the variable(s). Pure: reads ``env``
    (default ``os.environ``) only.
    """
    env = os.environ if env is None else env
    found: dict[str, int] = {}
    for name in (STRICT_ENV, STRICT_ENV_SGLANG):
        raw = env.get(name)
        if raw is None or not raw.strip():
            continue
        try:
            level = int(raw.strip())
        except ValueError:
            raise ConfigError(f"{name}={raw!r} must be 0, 1 or 2 (off, when idle, every op)") from None
        if level not in STRICT_LEVELS:
            raise ConfigError(f"{name}={raw!r}: strict_mem_check={level} is out of range; allowed: [0, 2]")
        found[name] = level
    if len(set(found.values())) > 1:
        shown = ", ".join(f"{k}={v}" for k, v in found.items())
        raise ConfigError(f"{shown} disagree; {STRICT_ENV_SGLANG} is an alias of {STRICT_ENV}: set one, or both alike")
    if found:
        return next(iter(found.values()))
    if isinstance(default, bool) or not isinstance(default, int) or default not in STRICT_LEVELS:
        raise ConfigError(f"strict level default={default!r} must be 0, 1 or 2")
    return default


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
    device: str = "sim-auto"
    # device "sim-auto": a side-stream copy lands at the Nth engine step after it was issued
    transfer_latency_steps: int = 2
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

    def __new__(cls, *args: Any, **kwargs: Any) -> RuntimeConfig:
        # runs before the dataclass __init__, so a wrong keyword is a ConfigError, not a TypeError
        unknown = sorted(set(kwargs) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(_unknown_fields_message(unknown))
        return super().__new__(cls)

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
        _int_field("transfer_latency_steps", self.transfer_latency_steps, 1, MAX_LATENCY_STEPS)
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
        """Build from a dict (as written by :meth:`to_dict`); unknown keys are a `ConfigError`.

        A missing key takes the field's default, except ``device``: `to_dict` always writes it,
        so a dict without one predates ``sim-auto`` and meant the old default ``sim`` (copies
        land only when the trace says so); it keeps that meaning and replays as it did."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"config must be an object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"config: unknown field(s) {unknown}")
        kw = dict(data)
        kw.setdefault("device", "sim")
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
        """``overrides``, then the environment (env wins): the strict level from
        ``LORAINV_STRICT_MEM_CHECK`` or its SGLang alias ``SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY``
        (see `strict_level_from_env`), and ``LORAINV_FAULTS`` (comma-separated fault names)."""
        env = os.environ if env is None else env
        kw = dict(overrides)
        if any((env.get(n) or "").strip() for n in (STRICT_ENV, STRICT_ENV_SGLANG)):
            kw["strict_mem_check"] = strict_level_from_env(0, env)
        faults = env.get("LORAINV_FAULTS")
        if faults:
            kw["faults"] = frozenset(f.strip() for f in faults.split(",") if f.strip())
        return cls(**kw)

    @classmethod
    def from_sglang_args(cls, **args: Any) -> RuntimeConfig:
        """A config from SGLang server-arg names (e.g. ``vars(server_args)`` or a subset).

        Args RuntimeConfig holds under the same name pass through (as do lorainv's own field
        names); ``random_seed`` becomes ``seed`` and ``disable_radix_cache`` becomes
        ``enable_prefix_cache=not value``; ``enable_lora=True`` is accepted (LoRA is always on).
        A value of None means "not set" (SGLang's default for most of these) and is skipped, as is
        ``dtype="auto"`` (lorainv's default dtype then applies).
        Args lorainv does not model (``lora_paths``, ``lora_target_modules``, ``max_loaded_loras``,
        ``max_lora_chunk_size``) and any other name are a `ConfigError` saying why.
        """
        kw: dict[str, Any] = {}
        unknown: list[str] = []
        for name, value in args.items():
            if value is None or (name == "dtype" and value == "auto"):  # SGLang's "auto": the model's dtype
                continue
            if name == "random_seed":
                kw["seed"] = value
            elif name == "disable_radix_cache":
                if not isinstance(value, bool):
                    raise ConfigError(f"disable_radix_cache must be a bool, got {value!r}")
                kw["enable_prefix_cache"] = not value
            elif name == "enable_lora":
                if value is not True:
                    raise ConfigError(f"enable_lora={value!r}: lorainv always serves LoRA; omit it or pass True")
            elif name in cls.__dataclass_fields__:
                kw[name] = value
            else:
                unknown.append(name)
        if unknown:
            raise ConfigError(_unknown_fields_message(sorted(unknown)))
        return cls(**kw)
