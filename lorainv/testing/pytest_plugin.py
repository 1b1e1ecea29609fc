"""pytest plugin (entry point ``pytest11``): ``--lorainv-strict=0|1|2`` and fixtures.

* ``lorainv_engine``: an `Engine` on the embedded tiny model, at the strict level from the
  option (or ``LORAINV_STRICT_MEM_CHECK``). After a test that used it, the plugin drives the
  engine to idle and runs the idle leak check; any violation fails the test.
* ``lorainv_model``: a `ReferenceModel` for the same config.
* ``lorainv_config``: the `RuntimeConfig` both are built from (override it in a conftest).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
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


def pytest_configure(config: pytest.Config) -> None:
    from lorainv.testing.profiles import load_profile_from_env

    if config.getoption("--hypothesis-profile", default=None) is None:
        load_profile_from_env()


def strict_level(config: pytest.Config) -> int:
    opt = config.getoption("--lorainv-strict", default=None)
    if opt is not None:
        return int(opt)
    return int(os.environ.get("LORAINV_STRICT_MEM_CHECK", "0") or 0)


@pytest.fixture
def lorainv_config(request: pytest.FixtureRequest) -> Any:
    from lorainv.config import RuntimeConfig

    return RuntimeConfig(strict_mem_check=strict_level(request.config), dtype="float64")


@pytest.fixture
def lorainv_engine(lorainv_config: Any) -> Iterator[Any]:
    from lorainv.checkers.liveness import drain_to_idle
    from lorainv.errors import InvariantViolation
    from lorainv.impl.engine import Engine

    engine = Engine(lorainv_config)
    yield engine
    violations = drain_to_idle(engine, 10_000)
    violations += engine.check()
    if violations:
        raise InvariantViolation(violations)


@pytest.fixture
def lorainv_model(lorainv_config: Any) -> Any:
    from lorainv.model.reference import ReferenceModel

    return ReferenceModel(lorainv_config)
