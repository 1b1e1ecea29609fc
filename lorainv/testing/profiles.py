"""Hypothesis settings profiles for lorainv suites.

* ``ci``: derandomized, bounded, no example database written (nothing outside the repo);
* ``dev``: the default — Hypothesis's local database under ``.hypothesis/``;
* ``nightly``: long runs.

``LORAINV_HYPOTHESIS_DB=redis://host:port[/db]`` replaces the database of ``dev`` and
``nightly`` with Hypothesis's Redis example database, so several machines or xdist
workers share the failures they find. Select a profile with pytest's
``--hypothesis-profile NAME`` or ``LORAINV_HYPOTHESIS_PROFILE``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis.database import ExampleDatabase

from lorainv.errors import ConfigError

PROFILES = ("ci", "dev", "nightly")


def database_from_env(env: Mapping[str, str] | None = None) -> ExampleDatabase | None:
    """The Redis example database named by ``LORAINV_HYPOTHESIS_DB``, or None if unset."""
    env = os.environ if env is None else env
    url = env.get("LORAINV_HYPOTHESIS_DB", "")
    if not url:
        return None
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"LORAINV_HYPOTHESIS_DB={url!r} must be a redis:// URL")
    try:
        import redis
        from hypothesis.extra.redis import RedisExampleDatabase
    except ImportError as e:  # pragma: no cover - depends on the [redis] extra
        raise ConfigError("LORAINV_HYPOTHESIS_DB needs the 'redis' package: pip install 'lorainv[redis]'") from e
    return RedisExampleDatabase(redis.Redis.from_url(url), key_prefix=b"lorainv:")


def register_profiles(env: Mapping[str, str] | None = None) -> None:
    # parent: Hypothesis's defaults, not the profile loaded now (a bare settings() inherits that,
    # so re-registering while ``ci`` is active would give ``dev`` derandomize=True and no database)
    shared: dict[str, Any] = {
        "parent": settings.get_profile("default"),
        "deadline": None,
        "suppress_health_check": [HealthCheck.too_slow],
    }
    db = database_from_env(env)
    local: dict[str, Any] = {} if db is None else {"database": db}
    settings.register_profile("ci", derandomize=True, database=None, max_examples=60, print_blob=True, **shared)
    settings.register_profile("dev", max_examples=100, **shared, **local)
    settings.register_profile("nightly", max_examples=5000, stateful_step_count=60, **shared, **local)


def load_profile_from_env(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    name = env.get("LORAINV_HYPOTHESIS_PROFILE", "dev")
    if name not in PROFILES:
        raise ConfigError(f"LORAINV_HYPOTHESIS_PROFILE={name!r}; choose one of {list(PROFILES)}")
    settings.load_profile(name)
    return name
