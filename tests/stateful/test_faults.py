"""The suite proves its own power: every fault of the catalogue is found by the machine
within a fixed, derandomized example budget, shrunk to at most 12 ops, and the saved JSON
trace reproduces it through ``replay`` — and replays clean with the fault switched off, so the
violation is the fault's and no false alarm of the checkers.

Each fault's config setup also runs clean without the fault for ``CLEAN_BUDGET`` examples; the
full 400-example clean run over every config is the gate's own fuzz step (``ci/gate``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lorainv.impl.faults import FAULTS
from lorainv.testing.campaign import FAULT_SETUPS, run_campaign
from lorainv.trace import load, replay

BUDGET = 400
CLEAN_BUDGET = 100


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
    without = replay(dataclasses.replace(saved, config=saved.config.replace(faults=frozenset())))
    assert without.ok, f"the shrunk trace fails without {fault}: {without.violations}"


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_fault_setup_is_clean_without_the_fault(fault: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAINV_TRACE_DIR", str(tmp_path))
    res = run_campaign(
        max_examples=CLEAN_BUDGET,
        overrides=FAULT_SETUPS[fault],
        derandomize=True,
        name=f"clean-{fault}",
        shrink=False,
    )
    assert not res.found, f"clean runtime failed under {fault}'s setup: {res.error}"
    assert res.examples >= CLEAN_BUDGET // 2
