"""The Target protocol and lorainv's engine as the first target (no vLLM needed)."""

from __future__ import annotations

import pytest

from lorainv.config import RuntimeConfig
from lorainv.errors import ConfigError
from lorainv.impl.engine import Engine
from lorainv.ops import OPS, Abort, AddRequest, LoadAdapter, Op, Step
from lorainv.targets import Target, make_target, target_names
from lorainv.targets.drive import TargetRun

CFG = RuntimeConfig(network="dummy", page_size=2, max_total_tokens=64, chunked_prefill_size=8)
OPS_SCRIPT: list[Op] = [
    LoadAdapter("a", "gen:4:1"),
    AddRequest("r0", (1, 2, 3, 4, 5), "a", 3),
    AddRequest("r1", (1, 2, 3, 4, 5, 6, 7, 8, 9, 10), None, 2),
    Step(),
    Abort("r1"),
    Step(),
    Step(),
    Step(),
]


def test_registry_names_both_targets_and_refuses_others() -> None:
    assert target_names() == ["lorainv", "vllm"]
    with pytest.raises(ConfigError, match="unknown target"):
        make_target("tgi", CFG)


def test_lorainv_target_satisfies_the_protocol() -> None:
    t = make_target("lorainv", CFG)
    assert isinstance(t, Target)
    assert t.name == "lorainv" and t.config is CFG
    assert t.capabilities.ops == frozenset(OPS)
    assert t.capabilities.reference_model and t.capabilities.policy and t.capabilities.token_oracle
    assert {c.name for c in t.checkers()} == set(t.capabilities.checkers)


def test_lorainv_target_reports_exactly_the_engines_events() -> None:
    t = make_target("lorainv", CFG)
    e = Engine(CFG)
    for op in OPS_SCRIPT:
        assert t.apply(op) == e.apply(op)
    assert [(r.rid, r.state, r.fill) for r in t.snapshot().requests] == [
        (r.rid, r.state, r.fill) for r in e.snapshot().requests
    ]
    assert t.is_idle() == e.is_idle()
    assert t.requests.keys() == e.requests.keys()  # the engine's reads pass through


def test_target_run_drives_the_lorainv_target_clean() -> None:
    r = TargetRun(make_target("lorainv", CFG))
    found = [v for op in OPS_SCRIPT for v in r.apply(op).violations]
    assert not found and not r.finish()


def test_an_unknown_target_option_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="bad option"):
        make_target("lorainv", CFG, colour="blue")
