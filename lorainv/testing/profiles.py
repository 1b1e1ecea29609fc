"""Hypothesis settings profiles for lorainv suites, registered under lorainv's own names.

* ``lorainv-ci``: derandomized, bounded, no example database written (nothing outside the repo);
* ``lorainv-dev``: Hypothesis's local database under ``.hypothesis/``;
* ``lorainv-nightly``: long runs.

Registering them changes nothing: Hypothesis's own profiles (``default``, ``ci``) and the
loaded profile are left alone. A profile is loaded only when asked for, with pytest's
``--hypothesis-profile NAME`` or ``LORAINV_HYPOTHESIS_PROFILE=NAME`` (any registered profile,
a user's own included).

``LORAINV_HYPOTHESIS_DB=redis://host:port[/db]`` replaces the database of ``lorainv-dev`` and
``lorainv-nightly`` with Hypothesis's Redis example database, so several machines or xdist
workers share the failures they find; ``LORAINV_HYPOTHESIS_DB=none`` gives them no database (as
``lorainv fuzz --db none``). Anything else is refused: a mistyped URL must not silently become a
local directory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis.database import ExampleDatabase

from lorainv.errors import ConfigError

PROFILES = ("lorainv-ci", "lorainv-dev", "lorainv-nightly")


def database_from_env(env: Mapping[str, str] | None = None) -> ExampleDatabase | None:
    """The Redis example database named by ``LORAINV_HYPOTHESIS_DB``; None if unset or ``none``."""
    env = os.environ if env is None else env
    url = env.get("LORAINV_HYPOTHESIS_DB", "")
    if not url or url.strip().lower() == "none":
        return None
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"LORAINV_HYPOTHESIS_DB={url!r} must be a redis:// URL or 'none'")
    try:
        import redis
        from hypothesis.extra.redis import RedisExampleDatabase
    except ImportError as e:  # pragma: no cover - depends on the [redis] extra
        raise ConfigError("LORAINV_HYPOTHESIS_DB needs the 'redis' package: pip install 'lorainv[redis]'") from e
    return RedisExampleDatabase(redis.Redis.from_url(url), key_prefix=b"lorainv:")


def register_profiles(env: Mapping[str, str] | None = None) -> None:
    """Register the three ``lorainv-*`` profiles (mutates Hypothesis's profile registry only;
    the loaded profile stays what it was)."""
    # parent: Hypothesis's defaults, not the profile loaded now (a bare settings() inherits that)
    shared: dict[str, Any] = {
        "parent": settings.get_profile("default"),
        "deadline": None,
        "suppress_health_check": [HealthCheck.too_slow],
    }
    given = (os.environ if env is None else env).get("LORAINV_HYPOTHESIS_DB", "")
    # unset: Hypothesis's local database; set (``none`` included): exactly the one it names
    local: dict[str, Any] = {"database": database_from_env(env)} if given else {}
    settings.register_profile("lorainv-ci", derandomize=True, database=None, max_examples=60, print_blob=True, **shared)
    settings.register_profile("lorainv-dev", max_examples=100, **shared, **local)
    settings.register_profile("lorainv-nightly", max_examples=5000, stateful_step_count=60, **shared, **local)


def profile_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """The profile ``LORAINV_HYPOTHESIS_PROFILE`` asks for, or None when it is unset.

    Pure: loads nothing. A name that is not a registered profile is a `ConfigError`.
    """
    env = os.environ if env is None else env
    name = env.get("LORAINV_HYPOTHESIS_PROFILE", "")
    if not name:
        return None
    try:
        settings.get_profile(name)
    except Exception:  # Hypothesis raises InvalidArgument for an unknown name
        raise ConfigError(
            f"LORAINV_HYPOTHESIS_PROFILE={name!r} is not a registered Hypothesis profile; "
            f"lorainv registers {list(PROFILES)} (or register your own in a conftest.py)"
        ) from None
    return name


def load_profile_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """Load the profile ``LORAINV_HYPOTHESIS_PROFILE`` names (mutates Hypothesis's loaded
    profile); with the variable unset, load nothing and return None."""
    name = profile_from_env(env)
    if name is not None:
        settings.load_profile(name)
    return name
