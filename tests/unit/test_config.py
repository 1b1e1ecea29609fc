"""`RuntimeConfig`: validation of every field, env overrides, dict round trip, immutability."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from lorainv.config import RuntimeConfig
from lorainv.errors import (
    AdapterError,
    AdapterNotResidentError,
    ConfigError,
    InvariantViolation,
    LorainvError,
    PoolError,
    RequestError,
    TraceError,
)

NAN = float("nan")
INF = float("inf")

# (overrides, field named in the message, allowed range/choices named in the message)
INVALID: list[tuple[dict[str, Any], str, str]] = [
    ({"max_loras_per_batch": 0}, "max_loras_per_batch", "[1, 256]"),
    ({"max_loras_per_batch": 257}, "max_loras_per_batch", "[1, 256]"),
    ({"max_loras_per_batch": "4"}, "max_loras_per_batch", "must be an int"),
    ({"max_loras_per_batch": True}, "max_loras_per_batch", "must be an int"),
    ({"max_loras_per_batch": 2.0}, "max_loras_per_batch", "must be an int"),
    ({"max_lora_rank": 0}, "max_lora_rank", "[1, 1024]"),
    ({"max_lora_rank": 1025}, "max_lora_rank", "[1, 1024]"),
    ({"max_lora_rank": None}, "max_lora_rank", "must be an int"),
    ({"page_size": 0}, "page_size", "[1, 256]"),
    ({"page_size": 257}, "page_size", "[1, 256]"),
    ({"max_total_tokens": 1}, "max_total_tokens", "[2, 16777216]"),
    ({"max_total_tokens": 7, "page_size": 4}, "max_total_tokens", "[8, 16777216]"),
    ({"max_total_tokens": 10, "page_size": 4}, "max_total_tokens=10", "multiple of page_size=4"),
    ({"max_total_tokens": 64.0}, "max_total_tokens", "must be an int"),
    ({"max_running_requests": 0}, "max_running_requests", "[1, 65536]"),
    ({"chunked_prefill_size": 0}, "chunked_prefill_size", "[1, 16777216]"),
    ({"chunked_prefill_size": -5}, "chunked_prefill_size", "[1, 16777216]"),
    ({"strict_mem_check": -1}, "strict_mem_check", "[0, 2]"),
    ({"strict_mem_check": 3}, "strict_mem_check", "[0, 2]"),
    ({"strict_mem_check": "1"}, "strict_mem_check", "must be an int"),
    ({"seed": -1}, "seed", ">= 0"),
    ({"tp_size": 0}, "tp_size", ">= 1"),
    ({"tp_rank": -1}, "tp_rank", "[0, 0]"),
    ({"tp_rank": 1}, "tp_rank", "[0, 0]"),
    ({"tp_size": 2, "tp_rank": 2}, "tp_rank", "[0, 1]"),
    ({"max_sessions": -1}, "max_sessions", "[0, 65536]"),
    ({"max_load_retries": -1}, "max_load_retries", "[0, 100]"),
    ({"max_load_retries": 101}, "max_load_retries", "[0, 100]"),
    ({"history_steps": 0}, "history_steps", "[1, 10000]"),
    ({"history_steps": 10_001}, "history_steps", "[1, 10000]"),
    ({"enable_lora_overlap_loading": 1}, "enable_lora_overlap_loading", "must be a bool"),
    ({"enable_lora_overlap_loading": "true"}, "enable_lora_overlap_loading", "must be a bool"),
    ({"enable_prefix_cache": 0}, "enable_prefix_cache", "must be a bool"),
    ({"lora_eviction_policy": "lfu"}, "lora_eviction_policy", "['lru', 'fifo']"),
    ({"lora_eviction_policy": "LRU"}, "lora_eviction_policy", "['lru', 'fifo']"),
    ({"lora_backend": "cutlass"}, "lora_backend", "['torch_native', 'triton']"),
    ({"device": "tpu"}, "device", "['sim-auto', 'sim', 'cpu', 'cuda']"),
    ({"transfer_latency_steps": 0}, "transfer_latency_steps", "[1, 10000]"),
    ({"transfer_latency_steps": 10_001}, "transfer_latency_steps", "[1, 10000]"),
    ({"transfer_latency_steps": 2.0}, "transfer_latency_steps", "must be an int"),
    ({"dtype": "int8"}, "dtype", "['float32', 'float64', 'bfloat16', 'float16']"),
    ({"network": "llama"}, "network", "['tiny', 'dummy']"),
    ({"lora_drain_wait_threshold": -0.5}, "lora_drain_wait_threshold", "finite number >= 0"),
    ({"lora_drain_wait_threshold": NAN}, "lora_drain_wait_threshold", "finite number >= 0"),
    ({"lora_drain_wait_threshold": INF}, "lora_drain_wait_threshold", "finite number >= 0"),
    ({"lora_drain_wait_threshold": True}, "lora_drain_wait_threshold", "finite number >= 0"),
    ({"lora_drain_wait_threshold": "1"}, "lora_drain_wait_threshold", "finite number >= 0"),
    ({"lora_drain_tolerance": 0.99}, "lora_drain_tolerance", ">= 1.0"),
    ({"lora_drain_policy": "fair"}, "lora_drain_policy", "preempt"),
    ({"max_finished_requests": -1}, "max_finished_requests", "max_finished_requests"),
    ({"max_finished_requests": 1.0}, "max_finished_requests", "max_finished_requests"),
    ({"lora_drain_quantum": -1.0}, "lora_drain_quantum", "finite number >= 0"),
    ({"lora_drain_quantum": NAN}, "lora_drain_quantum", "finite number >= 0"),
    ({"lora_drain_max_preemptions": -1}, "lora_drain_max_preemptions", "lora_drain_max_preemptions"),
    ({"lora_drain_max_preemptions": 1.5}, "lora_drain_max_preemptions", "lora_drain_max_preemptions"),
    ({"lora_drain_tolerance": -1.0}, "lora_drain_tolerance", "finite number >= 0"),
    ({"lora_drain_tolerance": NAN}, "lora_drain_tolerance", "finite number >= 0"),
    ({"lora_drain_tolerance": INF}, "lora_drain_tolerance", "finite number >= 0"),
    ({"faults": "session_double_count"}, "faults", "must be a set of fault names"),
    ({"faults": frozenset({"no_such_fault"})}, "faults", "unknown fault(s) ['no_such_fault']"),
    ({"faults": ["retract_leaks_tail", "zzz", "aaa"]}, "faults", "unknown fault(s) ['aaa', 'zzz']"),
]


def _id(case: tuple[dict[str, Any], str, str]) -> str:
    return ",".join(f"{k}={v!r}" for k, v in case[0].items())


@pytest.mark.parametrize("case", INVALID, ids=[_id(c) for c in INVALID])
def test_invalid_value_names_field_and_allowed_range(case: tuple[dict[str, Any], str, str]) -> None:
    overrides, field_name, allowed = case
    with pytest.raises(ConfigError) as info:
        RuntimeConfig(**overrides)
    msg = str(info.value)
    assert field_name in msg
    assert allowed in msg


def test_every_field_has_an_invalid_case() -> None:
    fields = {f.name for f in dataclasses.fields(RuntimeConfig)}
    covered = {name for overrides, _, _ in INVALID for name in overrides}
    assert sorted(fields - covered) == []


VALID_EDGES: list[dict[str, Any]] = [
    {"max_loras_per_batch": 1},
    {"max_loras_per_batch": 256},
    {"max_lora_rank": 1024},
    {"page_size": 256, "max_total_tokens": 512},
    {"page_size": 4, "max_total_tokens": 8},
    {"max_total_tokens": 2},
    {"strict_mem_check": 2},
    {"tp_size": 4, "tp_rank": 3},
    {"max_sessions": 0},
    {"max_load_retries": 0},
    {"max_load_retries": 100},
    {"history_steps": 10_000},
    {"lora_drain_wait_threshold": 0},
    {"lora_drain_tolerance": 1.0},
    {"lora_drain_tolerance": 3},
    {"device": "cuda", "dtype": "bfloat16", "lora_backend": "triton", "network": "dummy"},
]


@pytest.mark.parametrize("overrides", VALID_EDGES, ids=[",".join(d) for d in VALID_EDGES])
def test_boundary_values_are_accepted(overrides: dict[str, Any]) -> None:
    cfg = RuntimeConfig(**overrides)
    for name, value in overrides.items():
        assert getattr(cfg, name) == value


def test_defaults() -> None:
    cfg = RuntimeConfig()
    assert cfg.max_loras_per_batch == 4
    assert cfg.page_size == 1
    assert cfg.max_total_tokens == 2048
    assert cfg.strict_mem_check == 0
    assert cfg.device == "sim-auto"  # lands copies by itself: the public API alone makes progress
    assert cfg.transfer_latency_steps == 2
    assert cfg.faults == frozenset()
    assert cfg.enable_prefix_cache is True
    assert cfg.max_finished_requests == 1024  # bounded: a long run does not keep every ended request


def test_old_trace_config_without_max_finished_requests_gets_the_bounded_default() -> None:
    """Traces written before the field existed omit it; they load with the default, which
    retires nothing in a trace of fewer than 1024 requests (so they replay as before)."""
    old = {k: v for k, v in RuntimeConfig(network="dummy").to_dict().items() if k != "max_finished_requests"}
    assert RuntimeConfig.from_dict(old).max_finished_requests == 1024


def test_faults_given_as_list_become_frozenset() -> None:
    cfg = RuntimeConfig(faults=["session_double_count", "retract_leaks_tail", "session_double_count"])
    assert cfg.faults == frozenset({"session_double_count", "retract_leaks_tail"})
    assert isinstance(cfg.faults, frozenset)


def test_frozen_assignment_raises() -> None:
    cfg = RuntimeConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.page_size = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.faults = frozenset({"retract_leaks_tail"})  # type: ignore[misc]
    assert cfg.page_size == 1
    assert cfg.faults == frozenset()


def test_replace_validates_and_leaves_original() -> None:
    cfg = RuntimeConfig()
    new = cfg.replace(page_size=2, max_total_tokens=64)
    assert (new.page_size, new.max_total_tokens) == (2, 64)
    assert (cfg.page_size, cfg.max_total_tokens) == (1, 2048)
    with pytest.raises(ConfigError, match="page_size"):
        cfg.replace(page_size=0)


def test_torch_dtype() -> None:
    import torch

    assert RuntimeConfig(dtype="float64").torch_dtype is torch.float64
    assert RuntimeConfig().torch_dtype is torch.float32


# -- to_dict / from_dict -------------------------------------------------------------------


def test_to_dict_sorts_faults_and_is_json() -> None:
    cfg = RuntimeConfig(faults=frozenset({"stale_slot_tail", "abort_chunked_leaks_kv"}), seed=7)
    d = cfg.to_dict()
    assert d["faults"] == ["abort_chunked_leaks_kv", "stale_slot_tail"]
    assert d["seed"] == 7
    assert d["page_size"] == 1
    assert set(d) == {f.name for f in dataclasses.fields(RuntimeConfig)}


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"faults": frozenset({"stale_slot_tail", "session_double_count"}), "page_size": 4, "max_total_tokens": 64},
        {"lora_drain_wait_threshold": 0.25, "lora_drain_tolerance": 1.5, "strict_mem_check": 2, "device": "cpu"},
    ],
)
def test_dict_round_trip_through_json(overrides: dict[str, Any]) -> None:
    cfg = RuntimeConfig(**overrides)
    back = RuntimeConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    assert isinstance(back.faults, frozenset)


def test_from_dict_partial_uses_defaults() -> None:
    cfg = RuntimeConfig.from_dict({"seed": 3, "device": "sim-auto"})
    assert cfg == RuntimeConfig(seed=3)


def test_from_dict_without_device_keeps_the_old_default_sim() -> None:
    """to_dict always writes ``device``; a dict without it predates the ``sim-auto`` default and
    meant ``sim`` (copies land only when the trace completes them), so it replays as before."""
    assert RuntimeConfig.from_dict({"seed": 3}).device == "sim"
    old = {
        k: v for k, v in RuntimeConfig(device="sim").to_dict().items() if k not in ("device", "transfer_latency_steps")
    }
    assert RuntimeConfig.from_dict(old) == RuntimeConfig(device="sim")
    assert RuntimeConfig.from_dict(RuntimeConfig().to_dict()).device == "sim-auto"  # a new dict names its device


def test_from_dict_unknown_field() -> None:
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['bogus', 'zeta'\]"):
        RuntimeConfig.from_dict({"zeta": 1, "bogus": 2, "seed": 1})


def test_from_dict_not_a_mapping() -> None:
    with pytest.raises(ConfigError, match="config must be an object, got list"):
        RuntimeConfig.from_dict([("seed", 1)])  # type: ignore[arg-type]


def test_from_dict_faults_must_be_a_list() -> None:
    with pytest.raises(ConfigError, match=r"config\.faults must be a list"):
        RuntimeConfig.from_dict({"faults": "stale_slot_tail"})


def test_from_dict_invalid_value() -> None:
    with pytest.raises(ConfigError, match=r"strict_mem_check=5 is out of range; allowed: \[0, 2\]"):
        RuntimeConfig.from_dict({"strict_mem_check": 5})


# -- from_env ------------------------------------------------------------------------------


def test_from_env_empty_env_gives_defaults_and_overrides() -> None:
    assert RuntimeConfig.from_env({}) == RuntimeConfig()
    assert RuntimeConfig.from_env({}, seed=5, page_size=2) == RuntimeConfig(seed=5, page_size=2)


@pytest.mark.parametrize("raw, level", [("0", 0), ("1", 1), ("2", 2), (" 2 ", 2)])
def test_from_env_strict_mem_check(raw: str, level: int) -> None:
    assert RuntimeConfig.from_env({"LORAINV_STRICT_MEM_CHECK": raw}).strict_mem_check == level


def test_from_env_wins_over_overrides() -> None:
    cfg = RuntimeConfig.from_env({"LORAINV_STRICT_MEM_CHECK": "1"}, strict_mem_check=2, seed=4)
    assert cfg.strict_mem_check == 1
    assert cfg.seed == 4
    cfg = RuntimeConfig.from_env(
        {"LORAINV_FAULTS": "stale_slot_tail"}, faults=frozenset({"retract_leaks_tail"}), strict_mem_check=2
    )
    assert cfg.faults == frozenset({"stale_slot_tail"})
    assert cfg.strict_mem_check == 2


def test_from_env_empty_values_are_ignored() -> None:
    cfg = RuntimeConfig.from_env({"LORAINV_STRICT_MEM_CHECK": "", "LORAINV_FAULTS": ""}, strict_mem_check=2)
    assert cfg.strict_mem_check == 2
    assert cfg.faults == frozenset()


def test_from_env_ignores_unrelated_variables() -> None:
    assert RuntimeConfig.from_env({"LORAINV_SEED": "9", "PATH": "/bin"}) == RuntimeConfig()


@pytest.mark.parametrize("raw", ["x", "1.5", "two"])
def test_from_env_strict_not_an_int(raw: str) -> None:
    with pytest.raises(ConfigError, match=f"LORAINV_STRICT_MEM_CHECK={raw!r} must be 0, 1 or 2"):
        RuntimeConfig.from_env({"LORAINV_STRICT_MEM_CHECK": raw})


@pytest.mark.parametrize("raw", ["3", "-1"])
def test_from_env_strict_out_of_range(raw: str) -> None:
    with pytest.raises(ConfigError, match=r"strict_mem_check=-?\d is out of range; allowed: \[0, 2\]"):
        RuntimeConfig.from_env({"LORAINV_STRICT_MEM_CHECK": raw})


def test_from_env_faults_are_split_and_stripped() -> None:
    cfg = RuntimeConfig.from_env({"LORAINV_FAULTS": " session_double_count, stale_slot_tail ,,"})
    assert cfg.faults == frozenset({"session_double_count", "stale_slot_tail"})


def test_from_env_unknown_fault_rejected() -> None:
    with pytest.raises(ConfigError, match=r"unknown fault\(s\) \['not_a_fault'\]"):
        RuntimeConfig.from_env({"LORAINV_FAULTS": "stale_slot_tail,not_a_fault"})


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, bases",
    [
        (ConfigError, (LorainvError, ValueError)),
        (RequestError, (LorainvError, ValueError)),
        (TraceError, (LorainvError, ValueError)),
        (PoolError, (LorainvError, RuntimeError)),
        (AdapterNotResidentError, (AdapterError, LorainvError, ValueError)),
        (InvariantViolation, (LorainvError,)),
    ],
)
def test_error_hierarchy(cls: type, bases: tuple[type, ...]) -> None:
    for base in bases:
        assert issubclass(cls, base)


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_total_tokens", (1 << 24) + 1),
        ("chunked_prefill_size", (1 << 24) + 1),
        ("max_running_requests", (1 << 16) + 1),
        ("max_sessions", (1 << 16) + 1),
    ],
)
def test_sizes_have_upper_bounds(field: str, value: int) -> None:
    """An untrusted config (a trace file) cannot ask for unbounded memory."""
    with pytest.raises(ConfigError, match=field):
        RuntimeConfig(**{field: value})
