"""The pytest plugin (`lorainv.testing.pytest_plugin`), run on small inner test files with
pytest's ``pytester``: ``--lorainv-strict`` sets the level of the ``lorainv_engine``
fixture, a test that leaks fails (the test itself, not its teardown) with the idle leak check's
violation, and the plugin leaves Hypothesis's profiles alone unless asked."""

from __future__ import annotations

import re
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
def test_leak_fails_the_test(pytester: pytest.Pytester, level: int) -> None:
    pytester.makepyfile(test_inner=INNER.format(level=level))
    result = pytester.runpytest(f"--lorainv-strict={level}", *ONLY_LORAINV)
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*_ test_leaks _*",
            "*InvariantViolation*",
            "*[[]kv/K1[]] available * != total 2048 offenders=[[]-2[]]*",
            # at level 2 the engine's checker also names the last owners: "... last owned by free"
            "*[[]kv/K3[]] leaked token indices: owned by nobody*offenders=[[]5, 6[]]*",
        ]
    )
    assert "ERROR at teardown" not in result.stdout.str()


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
    test at the step that leaks; level 0 lets the body run and fails the test after it."""
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_inner=RETRACTING)
    result = pytester.runpytest("--lorainv-strict=2", *ONLY_LORAINV)
    # the step fails the test; no second report from a teardown
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*InvariantViolation*", "*[[]kv/K3[]] leaked token indices*offenders=[[]14, 15[]]*", "*last 5 step(s)*"]
    )
    result.stdout.fnmatch_lines(["*test_inner.py:5: *"])  # the 5th line of the inner file: the step

    result = pytester.runpytest("--lorainv-strict=0", *ONLY_LORAINV)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*_ test_retraction_leak _*", "*offenders=[[]14, 15[]]*"])
    assert "ERROR at teardown" not in result.stdout.str()


# -- Hypothesis is left alone -----------------------------------------------------------------------
# Profiles are process-global, so these run pytest in a subprocess with the real plugin set
# (Hypothesis's own plugin included), as a user's project would.
PROFILE_PROBE = """
from hypothesis import settings


def test_probe():
    print("PROFILE=" + settings.get_current_profile_name())
    print("DERANDOMIZE=" + str(settings().derandomize))
    print("DEADLINE=" + str(settings().deadline))
"""


def _probe(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, *args: str, **env: str) -> dict[str, str]:
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    for name in ("CI", "LORAINV_HYPOTHESIS_PROFILE", "LORAINV_HYPOTHESIS_DB"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    pytester.makepyfile(test_probe=PROFILE_PROBE)
    result = pytester.runpytest_subprocess("-s", "-p", "no:cacheprovider", *args)
    result.assert_outcomes(passed=1)
    found = re.findall(r"\b(PROFILE|DERANDOMIZE|DEADLINE)=(\S+)", "\n".join(result.outlines))
    return dict(found)


def test_plain_test_sees_hypothesis_defaults(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _probe(pytester, monkeypatch)
    assert seen["PROFILE"] == "default" and seen["DEADLINE"] == "0:00:00.200000"


def test_hypothesis_ci_profile_survives_under_ci(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _probe(pytester, monkeypatch, CI="true")
    assert seen["PROFILE"] == "ci" and seen["DERANDOMIZE"] == "True"


def test_users_conftest_profile_wins(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makeconftest(
        "from hypothesis import settings\n"
        "settings.register_profile('mine', derandomize=True, deadline=None)\n"
        "settings.load_profile('mine')\n"
    )
    seen = _probe(pytester, monkeypatch)
    assert seen == {"PROFILE": "mine", "DERANDOMIZE": "True", "DEADLINE": "None"}
    # a user's profile can also be chosen through the lorainv variable
    pytester.makeconftest("from hypothesis import settings\nsettings.register_profile('mine', max_examples=3)\n")
    assert _probe(pytester, monkeypatch, LORAINV_HYPOTHESIS_PROFILE="mine")["PROFILE"] == "mine"


def test_lorainv_profiles_on_request(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _probe(pytester, monkeypatch, "--hypothesis-profile=lorainv-ci")["DERANDOMIZE"] == "True"
    assert _probe(pytester, monkeypatch, LORAINV_HYPOTHESIS_PROFILE="lorainv-dev")["PROFILE"] == "lorainv-dev"


def test_bad_profile_name_is_a_usage_error(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.setenv("LORAINV_HYPOTHESIS_PROFILE", "no-such-profile")
    pytester.makepyfile(test_probe=PROFILE_PROBE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*LORAINV_HYPOTHESIS_PROFILE='no-such-profile' is not a registered Hypothesis profile*"]
    )
    assert "INTERNALERROR" not in result.stderr.str() + result.stdout.str()


TARGET_INNER = """
from lorainv.events import Queued
from lorainv.ops import AddRequest, Step


def test_target(lorainv_target):
    assert lorainv_target.name == "lorainv"
    events = lorainv_target.apply(AddRequest("r1", (1, 2, 3), None, 2))
    assert isinstance(events[0], Queued)
    while not lorainv_target.is_idle():
        lorainv_target.apply(Step())
    snap = lorainv_target.snapshot()
    assert [v for c in lorainv_target.checkers() for v in c.check(snap)] == []
"""


def test_target_fixture_builds_the_named_target(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=TARGET_INNER)
    pytester.runpytest(*ONLY_LORAINV).assert_outcomes(passed=1)
    result = pytester.runpytest("--lorainv-target=nosuch", *ONLY_LORAINV)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--lorainv-target='nosuch' is not a known target*"])
