"""Every trace under tests/regressions/ is a test, replayed forever; its ``expect`` field is
honoured: null means the replay must run clean, otherwise a violation with those fields
must occur (fault traces prove the suite still detects each historic bug)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorainv.trace import load, replay

TRACES = sorted((Path(__file__).parent / "regressions").glob("*.json"))


def test_regression_traces_exist() -> None:
    assert len(TRACES) >= 12


@pytest.mark.parametrize("path", TRACES, ids=[p.stem for p in TRACES])
def test_regression_trace(path: Path) -> None:
    trace = load(path)
    res = replay(trace)
    if trace.expect is None:
        assert res.ok, [str(v) for v in res.violations]
    else:
        assert res.matches(trace.expect), f"expected {trace.expect}, got {[str(v) for v in res.violations]}"
