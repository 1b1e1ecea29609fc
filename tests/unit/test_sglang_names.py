"""SGLang compatibility (issue 15 §5): the strict-check variable and its SGLang alias, and
SGLang's LoRA server-arg names mapped onto `RuntimeConfig` or refused with a `ConfigError`
that says why. The SGLang names and meanings used here are SGLang's documented server args
(``enable_lora``, ``lora_paths``, ``max_loras_per_batch``, ``max_loaded_loras``,
``lora_eviction_policy``, ``lora_backend``, ``max_lora_rank``, ``lora_target_modules``,
``max_lora_chunk_size``, ``enable_lora_overlap_loading``, ``random_seed``, ``disable_radix_cache``)."""

from __future__ import annotations

from typing import Any

import pytest

from lorainv.config import RuntimeConfig, strict_level_from_env
from lorainv.errors import ConfigError

LORAINV = "LORAINV_STRICT_MEM_CHECK"
SGLANG = "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY"


# -- the strict level ------------------------------------------------------------------------


@pytest.mark.parametrize("default", [0, 1, 2])
def test_unset_or_empty_gives_the_default(default: int) -> None:
    assert strict_level_from_env(default, {}) == default
    assert strict_level_from_env(default, {LORAINV: "", SGLANG: "  "}) == default


@pytest.mark.parametrize("name", [LORAINV, SGLANG])
@pytest.mark.parametrize("level", [0, 1, 2])
def test_either_name_sets_the_level(name: str, level: int) -> None:
    assert strict_level_from_env(2 - level, {name: str(level)}) == level
    assert strict_level_from_env(0, {name: f" {level}\n"}) == level


def test_both_names_agreeing_is_fine() -> None:
    assert strict_level_from_env(0, {LORAINV: "2", SGLANG: "2"}) == 2


def test_both_names_disagreeing_is_a_config_error_naming_both() -> None:
    with pytest.raises(ConfigError) as info:
        strict_level_from_env(0, {LORAINV: "1", SGLANG: "2"})
    assert f"{LORAINV}=1" in str(info.value) and f"{SGLANG}=2" in str(info.value)


@pytest.mark.parametrize("name", [LORAINV, SGLANG])
@pytest.mark.parametrize("raw", ["x", "1.5", "3", "-1", "true"])
def test_a_bad_value_is_a_config_error_naming_the_variable(name: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=f"^{name}={raw!r}"):
        strict_level_from_env(0, {name: raw})


def test_a_bad_default_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="default=3"):
        strict_level_from_env(3, {})


def test_strict_level_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LORAINV, raising=False)
    monkeypatch.setenv(SGLANG, "1")
    assert strict_level_from_env(0) == 1


def test_from_env_takes_the_sglang_alias_and_refuses_disagreement() -> None:
    assert RuntimeConfig.from_env({SGLANG: "2"}).strict_mem_check == 2
    assert RuntimeConfig.from_env({SGLANG: "0"}, strict_mem_check=2).strict_mem_check == 0  # env wins
    assert RuntimeConfig.from_env({}, strict_mem_check=1).strict_mem_check == 1
    with pytest.raises(ConfigError, match=SGLANG):
        RuntimeConfig.from_env({LORAINV: "0", SGLANG: "1"})


# -- SGLang server args ----------------------------------------------------------------------


def test_sglang_lora_args_with_lorainv_names_map_through() -> None:
    cfg = RuntimeConfig.from_sglang_args(
        enable_lora=True,
        max_loras_per_batch=3,
        max_lora_rank=8,
        lora_eviction_policy="fifo",
        lora_backend="triton",
        enable_lora_overlap_loading=True,
        max_total_tokens=512,
        chunked_prefill_size=64,
        max_running_requests=4,
        page_size=2,
        random_seed=7,
        disable_radix_cache=True,
    )
    assert (cfg.max_loras_per_batch, cfg.max_lora_rank, cfg.lora_eviction_policy) == (3, 8, "fifo")
    assert (cfg.lora_backend, cfg.enable_lora_overlap_loading) == ("triton", True)
    assert (cfg.max_total_tokens, cfg.chunked_prefill_size, cfg.max_running_requests, cfg.page_size) == (512, 64, 4, 2)
    assert cfg.seed == 7 and cfg.enable_prefix_cache is False


def test_sglang_unset_values_are_skipped() -> None:
    """SGLang leaves most LoRA args None (inferred from the adapters): None means "not set"."""
    cfg = RuntimeConfig.from_sglang_args(
        lora_paths=None, lora_target_modules=None, max_loaded_loras=None, max_lora_rank=None, dtype="auto"
    )
    assert cfg == RuntimeConfig()


def test_sglang_and_lorainv_names_mix() -> None:
    cfg = RuntimeConfig.from_sglang_args(max_loras_per_batch=2, network="dummy", strict_mem_check=1)
    assert (cfg.max_loras_per_batch, cfg.network, cfg.strict_mem_check) == (2, "dummy", 1)


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("lora_target_modules", ["q_proj", "v_proj"], "adapter_config.json"),
        ("lora_target_modules", "all", "adapter_config.json"),
        ("lora_paths", ["a=/tmp/a"], "Engine.load_adapter"),
        ("max_loaded_loras", 8, "host-side adapter limit"),
        ("max_lora_chunk_size", 16, "csgmv"),
    ],
)
def test_unmodelled_sglang_args_are_a_config_error_saying_why(name: str, value: Any, why: str) -> None:
    for build in (RuntimeConfig.from_sglang_args, RuntimeConfig, RuntimeConfig().replace):
        with pytest.raises(ConfigError) as info:
            build(**{name: value})
        msg = str(info.value)
        assert f"{name} is an SGLang server arg that lorainv does not model" in msg and why in msg


def test_lora_target_modules_in_from_env_is_a_config_error_not_a_type_error() -> None:
    with pytest.raises(ConfigError, match="lora_target_modules is an SGLang server arg"):
        RuntimeConfig.from_env({}, lora_target_modules=["q_proj"])


@pytest.mark.parametrize(("name", "target"), [("random_seed", "seed"), ("disable_radix_cache", "enable_prefix_cache")])
def test_renamed_sglang_args_given_to_the_constructor_point_to_from_sglang_args(name: str, target: str) -> None:
    with pytest.raises(
        ConfigError, match=f"{name} is an SGLang server arg; RuntimeConfig.from_sglang_args maps it to {target}"
    ):
        RuntimeConfig(**{name: 1})


def test_enable_lora_false_is_refused() -> None:
    with pytest.raises(ConfigError, match="enable_lora=False"):
        RuntimeConfig.from_sglang_args(enable_lora=False)


def test_disable_radix_cache_must_be_a_bool() -> None:
    with pytest.raises(ConfigError, match="disable_radix_cache must be a bool"):
        RuntimeConfig.from_sglang_args(disable_radix_cache="yes")


def test_sglang_values_lorainv_lacks_are_refused_by_validation() -> None:
    with pytest.raises(ConfigError, match=r"lora_backend='csgmv' is not allowed"):
        RuntimeConfig.from_sglang_args(lora_backend="csgmv")


def test_an_unknown_name_is_a_config_error_listing_the_fields() -> None:
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['model_path'\]; RuntimeConfig has \["):
        RuntimeConfig.from_sglang_args(model_path="/m", max_loras_per_batch=2)
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['max_lora'\]"):
        RuntimeConfig(max_lora=2)  # type: ignore[call-arg]
