"""Hypothesis profiles (`lorainv.testing.profiles`): the documented settings of ``lorainv-ci``,
``lorainv-dev`` and ``lorainv-nightly``, Hypothesis's own profiles left alone, the env-var
errors, and a real Redis example database shared by two separate
Hypothesis runs (the second replays the first one's shrunk failure as its very first example).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.database import ExampleDatabase

from lorainv.errors import ConfigError, LorainvError
from lorainv.testing.profiles import PROFILES, database_from_env, load_profile_from_env, register_profiles

FAIL_AT = 1000  # the property below fails for x >= FAIL_AT, so Hypothesis shrinks to exactly this


@pytest.fixture
def restore_profiles() -> Iterator[None]:
    """Registering or loading a profile is global: put back what the session had."""
    current = settings.get_current_profile_name()
    try:
        yield
    finally:
        register_profiles()
        settings.load_profile(current)


# -- the profiles ---------------------------------------------------------------------------------
def test_profiles_have_the_documented_settings(restore_profiles: None) -> None:
    register_profiles({})
    assert PROFILES == ("lorainv-ci", "lorainv-dev", "lorainv-nightly")
    ci, dev, nightly = (settings.get_profile(n) for n in PROFILES)
    assert ci.derandomize is True and ci.database is None and ci.print_blob is True
    assert ci.max_examples == 60
    assert dev.max_examples == 100 and dev.derandomize is False and dev.database is not None
    assert nightly.max_examples == 5000 and nightly.stateful_step_count == 60 and nightly.database is not None
    for prof in (ci, dev, nightly):
        assert prof.deadline is None


def test_registering_leaves_hypothesis_profiles_alone(restore_profiles: None) -> None:
    """Hypothesis's own ``default`` and ``ci`` keep their settings and the loaded profile stays."""
    before = settings.get_current_profile_name()
    hyp_ci = settings.get_profile("ci")
    default = settings.get_profile("default")
    register_profiles({})
    assert settings.get_current_profile_name() == before
    assert settings.get_profile("ci") is hyp_ci and settings.get_profile("default") is default


def test_profiles_do_not_inherit_the_loaded_profile(restore_profiles: None) -> None:
    """Regression: registering while ``ci`` was loaded made ``dev`` derandomized with no database."""
    register_profiles({})
    settings.load_profile("lorainv-ci")
    register_profiles({})
    dev = settings.get_profile("lorainv-dev")
    assert dev.derandomize is False and dev.database is not None and dev.print_blob is False


def test_redis_url_replaces_the_database_of_dev_and_nightly_only(restore_profiles: None) -> None:
    pytest.importorskip("redis")
    from hypothesis.extra.redis import RedisExampleDatabase

    register_profiles({"LORAINV_HYPOTHESIS_DB": "redis://127.0.0.1:1/0"})  # never connected to here
    assert settings.get_profile("lorainv-ci").database is None
    for name in ("lorainv-dev", "lorainv-nightly"):
        assert isinstance(settings.get_profile(name).database, RedisExampleDatabase)


def test_none_gives_dev_and_nightly_no_database(restore_profiles: None) -> None:
    register_profiles({"LORAINV_HYPOTHESIS_DB": "none"})  # as lorainv fuzz --db none
    for name in ("lorainv-ci", "lorainv-dev", "lorainv-nightly"):
        assert settings.get_profile(name).database is None


def test_load_profile_from_env(restore_profiles: None) -> None:
    before = settings.get_current_profile_name()
    assert load_profile_from_env({}) is None
    assert settings.get_current_profile_name() == before  # unset: nothing is loaded
    assert load_profile_from_env({"LORAINV_HYPOTHESIS_PROFILE": "lorainv-ci"}) == "lorainv-ci"
    assert settings.get_current_profile_name() == "lorainv-ci" and settings().derandomize is True
    settings.register_profile("users-own", max_examples=7)
    assert load_profile_from_env({"LORAINV_HYPOTHESIS_PROFILE": "users-own"}) == "users-own"
    assert settings().max_examples == 7


@pytest.mark.parametrize("name", ["nope", "lorainv-CI", " lorainv-dev"])
def test_unknown_profile_name_is_a_config_error(restore_profiles: None, name: str) -> None:
    before = settings.get_current_profile_name()
    with pytest.raises(ConfigError, match=r"LORAINV_HYPOTHESIS_PROFILE=.*not a registered Hypothesis profile"):
        load_profile_from_env({"LORAINV_HYPOTHESIS_PROFILE": name})
    assert settings.get_current_profile_name() == before  # refused before anything was loaded


def test_database_from_env_unset_is_none() -> None:
    assert database_from_env({}) is None
    assert database_from_env({"LORAINV_HYPOTHESIS_DB": ""}) is None


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379", "/tmp/hypothesis-db", "localhost:6379", "REDIS://h:1"])
def test_database_from_env_refuses_a_non_redis_url(url: str) -> None:
    with pytest.raises(ConfigError, match="must be a redis:// URL") as info:
        database_from_env({"LORAINV_HYPOTHESIS_DB": url})
    assert isinstance(info.value, LorainvError) and repr(url) in str(info.value)


# -- a real Redis server ----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int) -> bool:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.exceptions.RedisError:
        return False
    finally:
        client.close()


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A throwaway ``redis-server`` on a free loopback port (no persistence), stopped afterwards."""
    pytest.importorskip("redis")
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server binary absent (Debian: apt-get install redis-server)")
    log = tmp_path / "redis.log"
    for _attempt in range(3):  # another process may grab the port between probe and bind
        port = _free_port()
        cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        cmd += ["--dir", str(tmp_path), "--logfile", str(log)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 15.0
            while time.monotonic() < deadline and proc.poll() is None and not _ping(port):
                time.sleep(0.05)
            if proc.poll() is None and _ping(port):
                yield f"redis://127.0.0.1:{port}/0"
                return
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
    tail = log.read_text()[-2000:] if log.exists() else "(no log)"
    pytest.fail(f"redis-server did not answer PING on a free loopback port after 3 attempts; log:\n{tail}")


def make_property(db: ExampleDatabase, seen: list[int]) -> Callable[[], None]:
    """A fresh test function object each call, with the same name and source — so the same
    Hypothesis database key — failing for every ``x >= FAIL_AT``."""

    @settings(database=db, derandomize=False, max_examples=500, deadline=None, print_blob=False)
    @given(st.integers(min_value=0, max_value=10**9))
    def prop(x: int) -> None:
        seen.append(x)
        assert x < FAIL_AT

    return prop


def _run(prop: Callable[[], None]) -> None:
    with pytest.raises(AssertionError):
        prop()


def _redis_keys(url: str) -> list[bytes]:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return list(client.scan_iter(match=b"lorainv:*"))
    finally:
        client.close()


def _db(url: str) -> ExampleDatabase:
    """A new Redis client and database object, built the way the profiles build theirs."""
    db = database_from_env({"LORAINV_HYPOTHESIS_DB": url})
    assert db is not None
    return db


def test_two_runs_share_a_failure_through_redis(redis_url: str) -> None:
    assert _redis_keys(redis_url) == []

    # run 1: its own client; finds the failure, shrinks it and saves it in Redis
    seen1: list[int] = []
    run1 = make_property(_db(redis_url), seen1)
    _run(run1)
    shrunk = seen1[-1]  # the final call replays the shrunk example
    assert shrunk == FAIL_AT
    assert seen1[0] != shrunk, "run 1 must have found the failure itself, not replayed it"
    assert _redis_keys(redis_url), "nothing was written under the lorainv: key prefix"

    # run 2: a separate client and a separate test function object; the saved failure comes first
    seen2: list[int] = []
    run2 = make_property(_db(redis_url), seen2)
    assert run2 is not run1
    _run(run2)
    assert seen2[0] == shrunk

    # control: the same property with an empty database (another Redis db number) starts elsewhere
    seen3: list[int] = []
    _run(make_property(_db(redis_url.rsplit("/", 1)[0] + "/1"), seen3))
    assert seen3[0] != shrunk


def test_database_from_env_round_trips_through_redis(redis_url: str) -> None:
    db = _db(redis_url)
    db.save(b"key", b"value-1")
    db.save(b"key", b"value-2")
    other = _db(redis_url)
    assert sorted(other.fetch(b"key")) == [b"value-1", b"value-2"]
    other.delete(b"key", b"value-1")
    assert list(db.fetch(b"key")) == [b"value-2"]
