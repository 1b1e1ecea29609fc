"""Which Hypothesis example database a ``lorainv fuzz`` campaign uses.

A spec is a string, so worker processes and Ray tasks can open the same database from it:

* ``none``: no database (nothing read or written; a seed alone decides the run);
* ``redis://host:port[/db]`` (or ``rediss://``, ``unix://``): Hypothesis's Redis database, as
  the pytest profiles open it (`lorainv.testing.profiles.database_from_env`), so machines share it;
* anything else: a directory (Hypothesis's directory database), created on first write.

Precedence: ``--db`` over ``LORAINV_HYPOTHESIS_DB`` over `DEFAULT_DB`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from hypothesis.database import DirectoryBasedExampleDatabase, ExampleDatabase

from lorainv.errors import ConfigError

DEFAULT_DB = ".lorainv/examples"  # next to the default trace directory, .lorainv/traces
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def db_spec(cli: str | None, env: Mapping[str, str] | None = None) -> str:
    """The database spec a campaign uses: ``cli`` (``--db``) if given, else
    ``LORAINV_HYPOTHESIS_DB``, else `DEFAULT_DB`. Pure."""
    env = os.environ if env is None else env
    if cli:
        return cli
    return env.get("LORAINV_HYPOTHESIS_DB", "") or DEFAULT_DB


def is_shared(spec: str) -> bool:
    """Whether every machine that opens ``spec`` sees the same database (Redis)."""
    return spec.startswith(REDIS_SCHEMES)


def database_from_spec(spec: str) -> ExampleDatabase | None:
    """Open the database ``spec`` names (see the module docstring); None for ``none``.

    A Redis URL without the ``redis`` package installed is a `ConfigError`. Opening a
    directory database creates nothing until the first failure is saved.
    """
    if spec.strip().lower() == "none":
        return None
    if is_shared(spec):
        from lorainv.testing.profiles import database_from_env

        return database_from_env({"LORAINV_HYPOTHESIS_DB": spec})
    if not spec.strip():
        raise ConfigError("the example database path is empty; give a directory, a redis:// URL or 'none'")
    if os.path.exists(spec) and not os.path.isdir(spec):
        raise ConfigError(f"example database {spec!r} exists and is not a directory")
    return DirectoryBasedExampleDatabase(spec)
