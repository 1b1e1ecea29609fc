"""pytest plugin (entry point ``pytest11``): ``--lorainv-strict=0|1|2`` and fixtures.

* ``lorainv_engine``: an `Engine` on the embedded tiny model, at the strict level from the
  option (or ``LORAINV_STRICT_MEM_CHECK``). After the body of a test that used it, the plugin
  drives the engine to idle and runs the idle leak check; a violation fails the test itself.
* ``lorainv_model``: a `ReferenceModel` for the same config.
* ``lorainv_config``: the `RuntimeConfig` both are built from (override it in a conftest).
* ``lorainv_target``: the target named by ``--lorainv-target`` (default ``lorainv``, the
  engine behind the `Target` protocol; ``vllm`` needs ``ci/install-vllm.sh``), built from
  ``lorainv_config``; drive it with ``apply(op)`` and check it with its own ``checkers()``.
* ``lorainv_extensions``: ``lorainv_extensions(*items)`` puts user checkers and faults
  (modules, classes, `Fault` objects) in force for this test only.

User extensions for the whole session: every ``--lorainv-checkers MODULE`` and the installed
entry points of the ``lorainv.checkers`` / ``lorainv.faults`` groups are in force from
configure to unconfigure (a module that fails to import is a usage error). Nothing else is:
a test module that merely imports a checker changes no other test.

The strict level is ``--lorainv-strict``, else ``LORAINV_STRICT_MEM_CHECK`` (or SGLang's
``SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY``), else 0; a bad value is a usage error.

The plugin leaves Hypothesis alone: it registers the ``lorainv-ci``, ``lorainv-dev`` and
``lorainv-nightly`` profiles (see `lorainv.testing.profiles`) and loads one only when asked,
with ``--hypothesis-profile`` or ``LORAINV_HYPOTHESIS_PROFILE``. A bad name is a usage error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from lorainv.testing.profiles import register_profiles

# registered at import, before Hypothesis's own plugin loads a --hypothesis-profile
register_profiles()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lorainv")
    group.addoption(
        "--lorainv-strict",
        action="store",
        default=None,
        choices=("0", "1", "2"),
        help="strict memory-check level for lorainv engines (0 off, 1 idle leak check, 2 every step)",
    )
    group.addoption(
        "--lorainv-target",
        action="store",
        default="lorainv",
        help="the target the lorainv_target fixture builds (lorainv, vllm)",
    )
    group.addoption(
        "--lorainv-checkers",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE and put the user checkers and faults it declares in force for the session (repeatable)",
    )


def pytest_configure(config: pytest.Config) -> None:
    from lorainv.errors import ConfigError
    from lorainv.testing.profiles import load_profile_from_env

    if config.getoption("--hypothesis-profile", default=None) is None:
        try:
            load_profile_from_env()
        except ConfigError as e:
            raise pytest.UsageError(str(e)) from None
    from lorainv.targets import target_names

    target = config.getoption("--lorainv-target", default="lorainv")
    if target not in target_names():
        raise pytest.UsageError(f"--lorainv-target={target!r} is not a known target; choose one of {target_names()}")
    try:
        strict_level(config)
    except ConfigError as e:
        raise pytest.UsageError(str(e)) from None
    from lorainv.extensions import using

    stack = contextlib.ExitStack()
    try:
        stack.enter_context(using(*config.getoption("--lorainv-checkers", default=[]) or [], entry_points=True))
    except ConfigError as e:  # ExtensionError: a module or entry point that cannot be loaded
        raise pytest.UsageError(f"lorainv: {e}") from None
    config.stash[_SCOPE] = stack


_SCOPE = pytest.StashKey[contextlib.ExitStack]()


def pytest_unconfigure(config: pytest.Config) -> None:
    stack = config.stash.get(_SCOPE, None)
    if stack is not None:
        stack.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """After a passing test body that used ``lorainv_engine``: drain it to idle and run the
    idle leak check, so a violation fails the test itself (not its teardown)."""
    result = yield
    funcargs = getattr(item, "funcargs", {})
    engine = funcargs.get("lorainv_engine")
    if engine is not None:
        from lorainv.checkers.liveness import drain_to_idle
        from lorainv.errors import InvariantViolation

        violations = drain_to_idle(engine, 10_000)
        violations += engine.check()
        if violations:
            raise InvariantViolation(violations)
    return result


def strict_level(config: pytest.Config) -> int:
    """``--lorainv-strict``, else the strict-level environment variable, else 0."""
    opt = config.getoption("--lorainv-strict", default=None)
    if opt is not None:
        return int(opt)
    from lorainv.config import strict_level_from_env

    return strict_level_from_env(0)


@pytest.fixture
def lorainv_config(request: pytest.FixtureRequest) -> Any:
    """The `RuntimeConfig` of ``lorainv_engine`` and ``lorainv_model``: the embedded tiny
    model in float64 at the strict level of ``--lorainv-strict`` (or
    ``LORAINV_STRICT_MEM_CHECK``). Override this fixture in a conftest.py to test another config."""
    from lorainv.config import RuntimeConfig

    return RuntimeConfig(strict_mem_check=strict_level(request.config), dtype="float64")


@pytest.fixture
def lorainv_engine(lorainv_config: Any) -> Any:
    """A fresh `Engine` built from ``lorainv_config``. When the test body passes, the plugin
    steps it to idle (liveness) and runs every checker; a violation fails the test."""
    from lorainv.impl.engine import Engine

    return Engine(lorainv_config)


@pytest.fixture
def lorainv_model(lorainv_config: Any) -> Any:
    """A `ReferenceModel` for ``lorainv_config``: feed it ``observe(op, events)``."""
    from lorainv.model.reference import ReferenceModel

    return ReferenceModel(lorainv_config)


@pytest.fixture
def lorainv_target(request: pytest.FixtureRequest, lorainv_config: Any) -> Any:
    """The `Target` named by ``--lorainv-target`` (default ``lorainv``) for ``lorainv_config``.
    A target whose engine is not installed skips the test with the install hint."""
    from lorainv.targets import make_target

    name = request.config.getoption("--lorainv-target", default="lorainv")
    try:
        return make_target(name, lorainv_config)
    except ImportError as e:
        pytest.skip(f"target {name!r} is not installed ({e}); see ci/install-vllm.sh")


@pytest.fixture
def lorainv_extensions() -> Iterator[Callable[..., Any]]:
    """A function ``use(*items)``: put the user checkers and faults of ``items`` (module names,
    modules, checker classes, `lorainv.extensions.Fault` objects) in force until this test
    ends. Call it before building a config that enables a user fault (e.g. from your own
    ``lorainv_config`` override, which can request this fixture)."""
    from lorainv.extensions import using

    with contextlib.ExitStack() as stack:

        def use(*items: Any) -> Any:
            return stack.enter_context(using(*items))

        yield use
