"""``lorainv replay`` judges a trace against its ``expect``: exit 1 when the expected violation
reproduces, 3 when another one (or none) shows, 0 for a clean trace expecting none, 1 for a
violation in a trace without ``expect``; ``--faults`` and ``LORAINV_FAULTS`` add faults."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lorainv.cli import main

# a planted-bug regression trace: retract_leaks_tail leaks the retracted request's tail (kv/K1)
SOURCE = Path(__file__).resolve().parents[1] / "regressions" / "fault-retract_leaks_tail.json"


def variant(tmp_path: Path, name: str, faults: list[str] | None = None, expect: Any = "same") -> str:
    data = json.loads(SOURCE.read_text())
    if faults is not None:
        data["config"] = {**data["config"], "faults": faults}
    if expect != "same":
        data["expect"] = expect
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_the_source_trace_is_what_these_tests_assume() -> None:
    data = json.loads(SOURCE.read_text())
    assert data["config"]["faults"] == ["retract_leaks_tail"]
    assert data["expect"] == {"pool": "kv", "invariant": "K1"}


def test_expected_violation_reproduces_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", variant(tmp_path, "same")]) == 1
    assert "expected violation reproduced (kv/K1)" in capsys.readouterr().out


def test_a_different_violation_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = variant(tmp_path, "other", expect={"pool": "lora", "invariant": "L1"})
    assert main(["replay", path]) == 3
    err = capsys.readouterr().err
    assert "expect not met: the trace expects lora/L1, the replay showed" in err and "kv/K1" in err


def test_no_violation_where_one_is_expected_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", variant(tmp_path, "fixed", faults=[])]) == 3
    assert "expects kv/K1, the replay showed no violation" in capsys.readouterr().err


def test_without_expect_clean_is_0_and_a_violation_is_1(tmp_path: Path) -> None:
    assert main(["replay", variant(tmp_path, "clean", faults=[], expect=None)]) == 0
    assert main(["replay", variant(tmp_path, "bad", expect=None)]) == 1


def test_faults_option_and_env_add_to_the_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = variant(tmp_path, "fixed", faults=[])
    assert main(["replay", path, "--faults", "retract_leaks_tail"]) == 1
    monkeypatch.setenv("LORAINV_FAULTS", "retract_leaks_tail")
    assert main(["replay", path]) == 1
    assert "faults ['retract_leaks_tail']" in capsys.readouterr().out
    monkeypatch.setenv("LORAINV_FAULTS", "not_a_fault")
    assert main(["replay", path]) == 2
    assert "LORAINV_FAULTS: unknown fault(s) ['not_a_fault']" in capsys.readouterr().err
    monkeypatch.delenv("LORAINV_FAULTS")
    assert main(["replay", path, "--faults", "nope"]) == 2
    assert "--faults: unknown fault(s) ['nope']" in capsys.readouterr().err


def test_a_user_fault_without_its_module_is_a_trace_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", variant(tmp_path, "user", faults=["someone_elses_bug"])]) == 2
    err = capsys.readouterr().err
    assert "TraceError" in err and "someone_elses_bug" in err and "--checkers" in err
