"""Issue 15's headline: lorainv used from a separate project, as its user would.

The project lives in a temporary directory: its own ``tests/``, a package ``myproj_lorainv``
with a user checker and a user fault, and the distribution metadata that installs both as
entry points (a ``.dist-info`` on ``PYTHONPATH``: importlib.metadata reads it as it reads any
installed distribution). Everything runs as subprocesses from the project's directory:

* ``pytest`` with lorainv's plugin on the project's tests: Hypothesis's own profiles are
  untouched, the project's ``load_profile`` wins, and the user checker and fault are in force;
* ``lorainv gate --tests tests`` with a tiny fuzz budget: clean;
* ``lorainv fuzz --faults cap_bypass``: the user fault is planted and the saved, shrunk trace
  records it;
* ``lorainv replay`` of that trace (the user checker fails it) exits 1, as does the trace with
  the user checker's violation as its ``expect``; another ``expect``, or the same ops without
  the fault, exit 3 (expect not met).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lorainv.cli import main

pytestmark = pytest.mark.slow  # ordered ahead of the rest (tests/conftest.py)

# The user's extension. The rule is the user's own (their server caps generation at 12 new
# tokens); lorainv knows nothing of it. The fault is the user's historic bug: a frontend that
# added 12 to every request's budget.
EXTENSION = '''
"""myproj's lorainv extension: a deployment rule and the bug that once broke it."""

import dataclasses

from lorainv.checkers import register
from lorainv.errors import Violation
from lorainv.extensions import fault
from lorainv.ops import AddRequest

CAP = 12


@register("generation_cap")
class GenerationCap:
    def check(self, snap):
        return [
            Violation("mine", "U1", f"{r.rid} may generate {r.max_new_tokens} > {CAP} tokens", (r.rid,))
            for r in snap.live()
            if r.max_new_tokens > CAP
        ]


@fault("cap_bypass", "the frontend adds 12 to every request's max_new_tokens")
def cap_bypass(engine):
    apply = engine.apply

    def bypassed(op):
        if isinstance(op, AddRequest):
            op = dataclasses.replace(op, max_new_tokens=op.max_new_tokens + 12)
        return apply(op)

    engine.apply = bypassed
'''

ENTRY_POINTS = """
[lorainv.checkers]
generation_cap = myproj_lorainv:GenerationCap

[lorainv.faults]
cap_bypass = myproj_lorainv:cap_bypass
"""

CONFTEST = """
from hypothesis import settings

settings.register_profile("mine", max_examples=7)
settings.load_profile("mine")
"""

USER_TESTS = """
import os
from datetime import timedelta

from hypothesis import given, settings, strategies as st

from lorainv.config import RuntimeConfig
from lorainv.impl.engine import Engine
from lorainv.ops import AddRequest


def test_hypothesis_profiles_are_untouched():
    assert settings._current_profile == os.environ["EXPECT_PROFILE"]
    if os.environ["EXPECT_PROFILE"] == "mine":
        assert settings.default.max_examples == 7
    assert settings.get_profile("default").deadline == timedelta(milliseconds=200)  # Hypothesis's own
    assert settings.get_profile("ci").derandomize is True  # Hypothesis's own ci profile, not replaced


@given(st.integers(0, 3))
def test_a_property(n):
    assert n < 4


def test_the_user_checker_is_in_force(lorainv_engine):
    lorainv_engine.add_request([1, 2, 3], max_new_tokens=13)
    assert [(v.pool, v.invariant) for v in lorainv_engine.check()] == [("mine", "U1")]
    lorainv_engine.abort("r0")  # leave it clean for the plugin's idle leak check


def test_the_user_fault_is_planted_where_enabled():
    planted = Engine(RuntimeConfig(faults={"cap_bypass"}, dtype="float64"))
    plain = Engine(RuntimeConfig(dtype="float64"))
    planted.apply(AddRequest("x", (4, 5), None, 2))
    plain.apply(AddRequest("x", (4, 5), None, 2))
    assert [(v.pool, v.invariant) for v in planted.check()] == [("mine", "U1")]
    assert plain.check() == []
"""


def _env(project: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "LORAINV_", "HYPOTHESIS"))}
    env.pop("CI", None)
    env.pop("SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY", None)
    env["PYTHONPATH"] = str(project / "src")
    env["LORAINV_TRACE_DIR"] = str(project / "traces")
    env.update(extra)
    return env


def _run(project: Path, args: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=project, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("userproj")
    src = root / "src"
    (src / "myproj_lorainv").mkdir(parents=True)
    (src / "myproj_lorainv" / "__init__.py").write_text(textwrap.dedent(EXTENSION))
    info = src / "myproj_lorainv-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: myproj-lorainv\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    (root / "tests").mkdir()
    (root / "tests" / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (root / "tests" / "test_user.py").write_text(textwrap.dedent(USER_TESTS))
    return root


def test_pytest_with_the_plugin_on_the_users_tests(project: Path) -> None:
    # CI=true: Hypothesis would auto-load its own ci profile; the project's load_profile wins, and
    # the plugin changes neither (it loads no profile and registers only lorainv-* names)
    env = _env(project, EXPECT_PROFILE="mine", CI="true")
    r = _run(project, ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "tests"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 passed" in r.stdout


def test_gate_on_the_users_project(project: Path) -> None:
    env = _env(project, EXPECT_PROFILE="lorainv-ci")
    args = ["-m", "lorainv.cli", "gate", "--tests", "tests", "--workers", "0", "--fuzz-examples", "2", "--strict", "1"]
    r = _run(project, args, env)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "gate: ruff" not in out and "gate: mypy" not in out  # a user project keeps its own lint
    assert "lorainv gate: pytest:" in out and "--lorainv-strict=1" in out
    assert "lorainv gate: fuzz:" in out and out.rstrip().endswith("lorainv gate: clean")


def test_fuzz_then_replay_enforces_expect(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env = _env(project)
    fuzz = ["-m", "lorainv.cli", "fuzz", "--fast", "--max-examples", "5", "--seed", "0", "--quiet"]
    r = _run(project, [*fuzz, "--faults", "cap_bypass", "--json", "report.json"], env)
    assert r.returncode == 1, r.stdout + r.stderr
    report = json.loads((project / "report.json").read_text())
    trace_path = Path(report["trace"])
    trace = json.loads(trace_path.read_text())
    assert trace["config"]["faults"] == ["cap_bypass"] and trace["expect"]

    r = _run(project, ["-m", "lorainv.cli", "replay", str(trace_path)], env)
    assert r.returncode == 1, r.stdout + r.stderr  # the violation the trace was saved for
    assert re.search(r"\[mine/U1\] r\d+ may generate \d+ > 12 tokens", r.stdout)  # the user checker fails it

    def variant(name: str, **changes: object) -> str:
        path = project / f"{name}.json"
        path.write_text(json.dumps({**trace, **changes}))
        return str(path)

    # the exit codes, in this process (the entry points seen as above: the project's src on sys.path)
    monkeypatch.syspath_prepend(str(project / "src"))
    mine = variant("mine", expect={"pool": "mine", "invariant": "U1"})
    assert main(["replay", mine]) == 1
    assert "expected violation reproduced (mine/U1)" in capsys.readouterr().out
    other = variant("other", expect={"pool": "kv", "invariant": "K1"})
    unfaulted = variant(
        "unfaulted", expect={"pool": "mine", "invariant": "U1"}, config={**trace["config"], "faults": []}
    )
    for path, shown in ((other, "showed mine/U1"), (unfaulted, "showed no violation")):
        assert main(["replay", path]) == 3
        err = capsys.readouterr().err
        assert "expect not met: the trace expects" in err and shown in err
