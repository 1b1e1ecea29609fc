"""A Ctrl-C that lands inside an engine op leaves that op half-applied. The example is being
abandoned, not finished: its teardown must not drain and check that engine (it would report a
violation the engine never made, and the run would exit 1 instead of 130)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lorainv.impl.engine import Engine
from lorainv.testing.campaign import run_campaign


def test_an_interrupt_inside_an_op_is_not_reported_as_a_violation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAINV_TRACE_DIR", str(tmp_path))
    step = Engine._op_Step
    calls = [0]

    def half_step(self: Engine, op: Any) -> list[Any]:
        calls[0] += 1
        if calls[0] == 40 and self.allocator.available_size() >= self.allocator.page_size:
            self.allocator.alloc(self.allocator.page_size)  # half-applied: tokens taken, nobody owns them
            raise KeyboardInterrupt
        return step(self, op)

    monkeypatch.setattr(Engine, "_op_Step", half_step)
    with pytest.raises(KeyboardInterrupt):
        run_campaign(max_examples=50, seed=0, shrink=False, name="interrupted")
    assert calls[0] >= 40
    assert not list(tmp_path.glob("*.json")), "an interrupted example was saved as a failing trace"
