"""The target campaign (``lorainv fuzz --target vllm``): clean on vLLM with one path per
adapter load, and it finds, shrinks and saves a planted cross-adapter prefix hit."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("vllm")

from lorainv.targets.fuzz import COUNTERS, coverage, run_target_campaign
from lorainv.trace import load


def test_campaign_runs_clean_and_counts_coverage(tmp_path: Path) -> None:
    res = run_target_campaign(
        "vllm", max_examples=12, seed=1, target_kw={"reload_paths": "versioned"}, save_dir=tmp_path
    )
    assert not res.found, res.message
    assert res.stats.examples >= 12 and res.stats.ops > 100
    cov = coverage(res.stats)
    assert set(cov["counters"]) == set(COUNTERS)
    assert cov["counters"]["chunked_prefill"] > 0 and cov["events"].get("Decoded", 0) > 0


@pytest.mark.slow
def test_campaign_finds_a_planted_cross_adapter_hit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vllm.v1.core.kv_cache_utils as kcu

    monkeypatch.setattr(kcu, "_gen_lora_extra_hash_keys", lambda request: [])
    res = run_target_campaign(
        "vllm", max_examples=200, seed=0, target_kw={"reload_paths": "versioned"}, save_dir=tmp_path
    )
    assert res.found and res.trace is not None and res.trace_path is not None
    assert res.trace.expect == {"pool": "vllm_blocks", "invariant": "VB4"}
    saved = load(res.trace_path)
    assert saved.meta["target"] == "vllm" and saved.ops == res.trace.ops
    assert len(saved.ops) <= 12  # shrunk


def test_fuzz_report_for_a_target(tmp_path: Path) -> None:
    import argparse
    import io
    import json

    from lorainv.targets.fuzz import cmd_fuzz_target

    a = argparse.Namespace(
        target="vllm",
        target_option=["reload_paths=versioned"],
        minutes=None,
        max_examples=5,
        seed=3,
        json=str(tmp_path / "r.json"),
    )
    out = io.StringIO()
    assert cmd_fuzz_target(a, out) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["target"] == "vllm" and report["target_options"] == {"reload_paths": "versioned"}
    assert report["violations"] == 0 and report["examples"] >= 5
    assert set(report["coverage"]["counters"]) == set(COUNTERS)
    assert "clean: no violation found" in out.getvalue()


def test_bad_target_options_are_config_errors() -> None:
    from lorainv.errors import ConfigError
    from lorainv.targets.fuzz import parse_target_options

    assert parse_target_options(["reload_paths=same", "x=3", "y=true"]) == {"reload_paths": "same", "x": 3, "y": True}
    with pytest.raises(ConfigError):
        parse_target_options(["novalue"])


def _machine_case() -> type:
    from hypothesis import HealthCheck, settings

    from lorainv.targets.fuzz import target_machine

    case = target_machine("vllm", reload_paths="versioned").TestCase
    case.settings = settings(
        max_examples=5, stateful_step_count=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    return case


TestVllmMachine = _machine_case()
