"""The suite proves its own power: every fault of the catalogue is found by the machine
within a fixed, derandomized example budget, shrunk to at most 12 ops, and the saved JSON
trace reproduces it through ``replay``. The same budgets run clean without the fault."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorainv.impl.faults import FAULTS
from lorainv.testing.campaign import FAULT_SETUPS, run_campaign
from lorainv.trace import load, replay

BUDGET = 400


def test_every_fault_has_a_setup() -> None:
    assert set(FAULT_SETUPS) == set(FAULTS)


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_fault_is_found_shrunk_and_replayed(fault: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAINV_TRACE_DIR", str(tmp_path))
    res = run_campaign(max_examples=BUDGET, faults=frozenset({fault}), derandomize=True, name=f"fault-{fault}")
    assert res.found, f"{fault} not found in {BUDGET} examples"
    assert res.trace is not None and res.trace_path is not None
    assert len(res.trace.ops) <= 12, [str(o) for o in res.trace.ops]
    saved = load(res.trace_path)
    assert Path(res.trace_path).parent == tmp_path
    assert saved.config.faults == frozenset({fault})
    again = replay(saved)
    assert again.violations, f"replay of {res.trace_path} ran clean"
    assert again.matches(saved.expect)


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_same_budget_is_clean_without_the_fault(fault: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAINV_TRACE_DIR", str(tmp_path))
    res = run_campaign(
        max_examples=BUDGET, overrides=FAULT_SETUPS[fault], derandomize=True, name=f"clean-{fault}", shrink=False
    )
    assert not res.found, f"clean runtime failed under {fault}'s setup: {res.error}"
    assert res.examples >= BUDGET // 2
