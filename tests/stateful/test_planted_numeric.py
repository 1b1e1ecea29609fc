"""Issue 13: a LoRA delta scaled x2 passed ``--numeric`` while the numeric check re-ran the same
engine alone. It is planted here (monkeypatch, in the test only) into the LoRA backend, the
one place every adapter's delta is applied, and must be found by the campaign that
``lorainv fuzz --numeric --seed 0`` runs (`run_campaign` with ``network="tiny", numeric=True``);
the same budget runs clean without it, and the saved trace replays to the same violation.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from lorainv.impl.backends.base import LoraBackend
from lorainv.testing.campaign import run_campaign
from lorainv.trace import load, replay

# Measured: seed 0 finds the plant at its 4th-6th example (seeds 0-9 all within 6). 20 keeps a
# margin for generator changes; without shrinking, the clean run of 20 costs a few seconds.
BUDGET = 20


def plant_doubled_delta(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every backend adds ``2 * s * (x A^T) B^T`` instead of ``s * (x A^T) B^T``."""
    real = LoraBackend.apply

    def doubled(self: LoraBackend, x: Any, base_out: Any, A: Any, B: Any, info: Any, out_sizes: Any) -> Any:
        return real(self, x, base_out, A, B, dataclasses.replace(info, scalings=info.scalings * 2), out_sizes)

    monkeypatch.setattr(LoraBackend, "apply", doubled)


def test_doubled_lora_delta_is_found_by_the_numeric_campaign(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAINV_TRACE_DIR", str(tmp_path))
    plant_doubled_delta(monkeypatch)
    res = run_campaign(network="tiny", numeric=True, max_examples=BUDGET, seed=0, shrink=False, name="planted-x2")
    assert res.found, f"a LoRA delta scaled x2 ran clean for {BUDGET} numeric examples"
    assert res.trace is not None and res.trace_path is not None
    assert res.trace.expect is not None and res.trace.expect["pool"] == "numerics", res.trace.meta
    again = replay(load(res.trace_path))
    assert again.matches(res.trace.expect), again.violations
    monkeypatch.undo()  # the same trace on the clean engine: nothing to report
    assert replay(load(res.trace_path)).violations == []


def test_same_budget_is_clean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAINV_TRACE_DIR", str(tmp_path))
    res = run_campaign(network="tiny", numeric=True, max_examples=BUDGET, seed=0, shrink=False, name="clean-x2")
    assert not res.found, res.error
    assert res.examples >= BUDGET // 2
