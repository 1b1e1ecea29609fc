"""The pytest plugin (`lorainv.testing.pytest_plugin`), run on small inner test files with
pytest's ``pytester``: ``--lorainv-strict`` sets the level of the ``lorainv_engine``
fixture, and a test that leaks fails at teardown with the idle leak check's violation."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

pytest_plugins = ["pytester"]

# Inner runs load only the lorainv plugin: pytester restores sys.modules after each in-process
# run, so an auto-loaded plugin such as Hypothesis would be re-imported (and its asserts
# rewritten) every time, which costs more than the inner tests themselves.
ONLY_LORAINV = ("-p", "lorainv.testing.pytest_plugin", "-p", "no:cacheprovider")


@pytest.fixture(autouse=True)
def _no_autoload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")


def test_plugin_is_registered_as_a_pytest11_entry_point() -> None:
    found = {e.name: e.value for e in entry_points(group="pytest11")}
    assert found.get("lorainv") == "lorainv.testing.pytest_plugin"


INNER = """
def test_clean(lorainv_engine):
    assert lorainv_engine.cfg.strict_mem_check == {level}
    assert lorainv_engine.cfg.network == "tiny" and lorainv_engine.cfg.dtype == "float64"
    out = lorainv_engine.generate([[1, 2, 3], [4, 5]], max_new_tokens=2)
    assert [len(o) for o in out] == [2, 2]


def test_left_running_is_drained(lorainv_engine):
    lorainv_engine.add_request([7, 8, 9], max_new_tokens=3)
    lorainv_engine.step()  # still decoding when the test ends: the plugin drains it, cleanly


def test_leaks(lorainv_engine):
    lorainv_engine.generate([[1, 2, 3]], max_new_tokens=2)
    taken = lorainv_engine.allocator.alloc(2)  # tokens nobody owns and nobody frees
    assert taken.tolist() == [5, 6]  # the first free ones: the prefix cache holds 1..4
"""


@pytest.mark.parametrize("level", [0, 1, 2])
def test_leak_fails_at_teardown(pytester: pytest.Pytester, level: int) -> None:
    pytester.makepyfile(test_inner=INNER.format(level=level))
    result = pytester.runpytest(f"--lorainv-strict={level}", *ONLY_LORAINV)
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaks*",
            "*InvariantViolation*",
            "*[[]kv/K1[]] available * != total 2048 offenders=[[]-2[]]*",
            "*[[]kv/K3[]] leaked token indices: owned by nobody offenders=[[]5, 6[]]*",
        ]
    )
    assert "ERROR at teardown of test_clean" not in result.stdout.str()


def test_level_from_the_environment(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAINV_STRICT_MEM_CHECK", "1")
    pytester.makepyfile(test_inner=INNER.format(level=1).split("def test_leaks")[0])
    result = pytester.runpytest(*ONLY_LORAINV)
    result.assert_outcomes(passed=2)
    # the option wins over the environment
    pytester.makepyfile(test_inner=INNER.format(level=2).split("def test_leaks")[0])
    pytester.runpytest("--lorainv-strict=2", *ONLY_LORAINV).assert_outcomes(passed=2)


CONFTEST = """
import pytest
from lorainv.config import RuntimeConfig
from lorainv.testing.pytest_plugin import strict_level


@pytest.fixture
def lorainv_config(request):
    return RuntimeConfig(
        network="dummy",
        page_size=2,
        max_total_tokens=14,
        faults=frozenset({"retract_leaks_tail"}),
        strict_mem_check=strict_level(request.config),
    )
"""

RETRACTING = """
def test_retraction_leak(lorainv_engine):
    lorainv_engine.add_request([1, 2, 3], max_new_tokens=8, rid="r0")
    lorainv_engine.add_request([4, 5, 6, 7], max_new_tokens=8, rid="r1")
    for _ in range(5):
        lorainv_engine.step()
"""


def test_level_2_fails_inside_the_test(pytester: pytest.Pytester) -> None:
    """With a conftest-overridden config (a fault that leaks on retraction), level 2 fails the
    test at the step that leaks; level 0 lets the test body pass and fails at teardown."""
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_inner=RETRACTING)
    result = pytester.runpytest("--lorainv-strict=2", *ONLY_LORAINV)
    # the step fails the test; the teardown's leak check then reports the same leak again
    result.assert_outcomes(failed=1, errors=1)
    result.stdout.fnmatch_lines(
        ["*InvariantViolation*", "*[[]kv/K3[]] leaked token indices*offenders=[[]14, 15[]]*", "*last 5 step(s)*"]
    )
    result.stdout.fnmatch_lines(["*test_inner.py:5: *"])  # the 5th line of the inner file: the step

    result = pytester.runpytest("--lorainv-strict=0", *ONLY_LORAINV)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_retraction_leak*", "*offenders=[[]14, 15[]]*"])
