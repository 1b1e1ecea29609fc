"""``lorainv fuzz --ray local`` (issue 17 §3): the same shards as Ray tasks on a local Ray
instance (2 CPUs); progress and failures reach the driver, the trace comes back as JSON text
into the driver's trace directory, and the next run replays the failure from the database."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from test_fuzz_workers import check_planted_fault_then_replay

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install 'lorainv[ray]')"
    ),
    pytest.mark.slow,
]


def test_ray_finds_a_planted_fault_and_the_next_run_replays_it_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a throwaway local instance needs no token
    check_planted_fault_then_replay(["--ray", "local"], tmp_path, monkeypatch, shrink=False)
