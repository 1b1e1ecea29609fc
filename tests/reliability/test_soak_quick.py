"""A short soak (``bench/soak.py``): random traffic at strict level 2 ends with no violation
and nothing leaked, after exercising what the soak claims to exercise; and the same soak
fails (exit 1) when a historic leak is injected, so its "clean" means something."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def soak(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(ROOT))  # bench/ is a folder of the repository, not installed
    return importlib.import_module("bench.soak")


def test_quick_soak_is_clean_and_leak_free(soak: ModuleType, tmp_path: Path) -> None:
    rc = soak.main(["--quick", "--ops", "2000", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "soak.json").read_text())
    assert rc == 0, data["first_violation"]
    assert data["violations"] == 0 and data["first_violation"] is None
    assert data["leaked_tokens"] == 0 and data["leaked_slots"] == 0 and data["leaked_rows"] == 0
    assert set(data["leaks"]) >= {"tokens", "slots", "rows", "loads_in_flight", "session_tokens", "pinned_entries"}
    assert data["peak"]["pinned_bytes"] > 0  # the pinned host cache was used, and emptied by the teardown
    assert all(v == 0 for v in data["leaks"].values()), data["leaks"]
    assert data["ops"] == 2000 and data["ops_applied"] >= 2000
    # the traffic reached what the soak is for
    c = data["counts"]
    for kind in ("Retracted", "Aborted", "LoadFailed", "LoadCompleted", "Evicted", "SessionRestored", "PrefixHit"):
        assert c.get(kind, 0) > 0, (kind, c)
    assert c["op:FailTransfers"] > 0 and c["op:OpenSession"] > 0 and c["op:CloseSession"] > 0
    assert 0.1 <= data["abort_fraction"] <= 0.35, data["abort_fraction"]
    assert data["peak"]["slots"] == data["capacity"]["slots"] == 4
    assert data["peak"]["kv_in_use"] == data["capacity"]["kv_tokens"]  # the pool ran full
    assert data["config"]["strict_mem_check"] == 2 and data["config"]["network"] == "dummy"
    assert data["config"]["enable_lora_overlap_loading"] is True and data["adapters"] == 64


def test_soak_fails_on_an_injected_leak(soak: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "leaky.json"
    rc = soak.main(["--ops", "1500", "--faults", "retract_leaks_tail", "--out", str(out)])
    data = json.loads(out.read_text())
    assert rc == 1
    assert data["violations"] > 0 and data["leaked_tokens"] is None
    assert any("[kv/" in v for v in data["first_violation"]), data["first_violation"]
    assert "FIRST VIOLATION" in capsys.readouterr().out
