"""``lorainv gate``: in lorainv's repository it runs exactly what ci/gate always ran; in another
directory no lint unless asked; bad input is a usage error naming it. (The gate on a real user
project runs in tests/test_user_project.py.)"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from lorainv.cli import gate, main

ROOT = Path(__file__).resolve().parents[2]


def steps(root: Path, *argv: str, strict: int = 2) -> list[tuple[str, list[str]]]:
    p = argparse.ArgumentParser()
    gate.add_parser(p.add_subparsers())
    return gate._steps(p.parse_args(["gate", *argv]), root, strict)


def test_in_lorainv_repo_the_gate_is_ci_gates_old_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORAINV_WORKERS", raising=False)
    monkeypatch.delenv("LORAINV_FUZZ_EXAMPLES", raising=False)
    monkeypatch.delenv("LORAINV_FUZZ_SEED", raising=False)
    got = {name: cmd[1:] for name, cmd in steps(ROOT, "--tests", "tests")}
    assert all(cmd[0] == sys.executable for _, cmd in steps(ROOT))
    assert list(got) == ["ruff check", "ruff format", "mypy", "pytest", "fuzz"]
    assert got["ruff check"] == ["-m", "ruff", "check", "lorainv", "tests", "bench"]
    assert got["ruff format"] == ["-m", "ruff", "format", "--check", "lorainv", "tests", "bench"]
    assert got["mypy"] == ["-m", "mypy", "lorainv"]
    pytest_cmd = got["pytest"]
    assert pytest_cmd[:3] == ["-m", "pytest", "-q"] and pytest_cmd[-1] == "tests"
    assert {"--lorainv-strict=2", "--hypothesis-profile=lorainv-ci"} <= set(pytest_cmd)
    assert pytest_cmd[pytest_cmd.index("-n") + 1] == "2"  # xdist is installed in lorainv's dev env
    fuzz = got["fuzz"]
    assert fuzz[:4] == ["-m", "lorainv.cli", "fuzz", "--fast"]
    for flag, value in (("--max-examples", "400"), ("--seed", "0"), ("--strict", "2")):
        assert fuzz[fuzz.index(flag) + 1] == value


def test_elsewhere_no_lint_unless_asked_and_checkers_reach_pytest_and_fuzz(tmp_path: Path) -> None:
    names = [n for n, _ in steps(tmp_path, "--fuzz-examples", "3", "--checkers", "m.x", strict=1)]
    assert names == ["pytest", "fuzz"]
    by = dict(steps(tmp_path, "--fuzz-examples", "3", "--checkers", "m.x", "--workers", "0", strict=1))
    assert "--lorainv-checkers=m.x" in by["pytest"] and "-n" not in by["pytest"]
    assert by["fuzz"][by["fuzz"].index("--checkers") + 1] == "m.x"
    linted = [n for n, _ in steps(tmp_path, "--lint", "on", "--fuzz-examples", "0")]
    assert linted == ["ruff check", "ruff format", "pytest"]  # no mypy config to assume; 0 skips fuzz


def test_bad_input_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["gate", "--tests", "missing_dir"]) == 2
    assert "--tests path(s) not found: ['missing_dir']" in capsys.readouterr().err
    (tmp_path / "tests").mkdir()
    assert main(["gate", "--checkers", "no_such_gate_mod"]) == 2
    assert "ExtensionError: cannot import checker module 'no_such_gate_mod'" in capsys.readouterr().err
    monkeypatch.setenv("LORAINV_STRICT_MEM_CHECK", "7")
    assert main(["gate"]) == 2
    assert "LORAINV_STRICT_MEM_CHECK" in capsys.readouterr().err
    assert main(["gate", "--workers", "-1", "--strict", "1"]) == 2
    assert not (tmp_path / ".lorainv").exists()  # nothing ran, nothing written
