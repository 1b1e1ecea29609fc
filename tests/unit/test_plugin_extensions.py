"""The pytest plugin and user extensions: ``--lorainv-checkers MODULE`` puts a module's checkers
in force for the session, the ``lorainv_extensions`` fixture for one test only, importing a
checker module changes nothing, and bad input (a module that cannot be imported, a bad
strict level) is a usage error naming it."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

ONLY_LORAINV = ("-p", "lorainv.testing.pytest_plugin", "-p", "no:cacheprovider")

CHECKS = """
from lorainv.checkers import register
from lorainv.errors import Violation


@register("no_long_prompts")
class NoLongPrompts:
    def check(self, snap):
        return [Violation("mine", "P1", f"{r.rid} is long", (r.rid,)) for r in snap.live() if r.kv_len > 5]
"""

INNER = """
from lorainv.checkers import checker_names


def test_a(lorainv_engine{extra}):
    {use}
    lorainv_engine.add_request([1, 2, 3, 4, 5, 6, 7], max_new_tokens=3)
    lorainv_engine.step()
    found = [(v.pool, v.invariant) for v in lorainv_engine.check()]
    assert found == {expect_a}
    lorainv_engine.abort("r0")


def test_b():
    assert ("no_long_prompts" in checker_names()) == {expect_b}
"""


@pytest.fixture(autouse=True)
def _no_autoload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    # the inner runs read the strict level from the environment (the gate sets it to 2, where a
    # user checker's violation raises at the step instead of showing in check())
    for name in ("LORAINV_STRICT_MEM_CHECK", "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def checks_module(pytester: pytest.Pytester) -> str:
    name = f"userchecks_{abs(hash(pytester.path)) % 10**8}"
    pytester.makepyfile(**{name: CHECKS})
    pytester.syspathinsert()
    return name


def test_option_puts_checkers_in_force_for_the_session(pytester: pytest.Pytester, checks_module: str) -> None:
    pytester.makepyfile(test_inner=INNER.format(extra="", use="", expect_a="[('mine', 'P1')]", expect_b=True))
    pytester.runpytest(f"--lorainv-checkers={checks_module}", *ONLY_LORAINV).assert_outcomes(passed=2)


def test_importing_changes_nothing_and_the_fixture_scopes_to_one_test(
    pytester: pytest.Pytester, checks_module: str
) -> None:
    imported = f"import {checks_module}\n" + INNER.format(extra="", use="", expect_a="[]", expect_b=False)
    pytester.makepyfile(test_imported=imported)
    scoped = INNER.format(
        extra=", lorainv_extensions",
        use=f"lorainv_extensions({checks_module!r})",
        expect_a="[('mine', 'P1')]",
        expect_b=False,  # test_b runs after test_a: the scope ended with test_a
    )
    pytester.makepyfile(test_scoped=scoped)
    pytester.runpytest(*ONLY_LORAINV).assert_outcomes(passed=4)


def test_bad_module_and_bad_strict_level_are_usage_errors(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_inner="def test_x():\n    pass\n")
    result = pytester.runpytest("--lorainv-checkers=no_such_checks_mod", *ONLY_LORAINV)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*cannot import checker module 'no_such_checks_mod'*"])
    monkeypatch.setenv("LORAINV_STRICT_MEM_CHECK", "3")
    result = pytester.runpytest(*ONLY_LORAINV)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*LORAINV_STRICT_MEM_CHECK*"])
