"""User checkers and faults (`lorainv.extensions`): declared by a module, in force only inside a
scope, discovered through entry points, and every bad input an `ExtensionError` naming it."""

from __future__ import annotations

import io
import sys
import textwrap
from pathlib import Path

import pytest

from lorainv.checkers import checker_names, run_checks
from lorainv.cli.common import list_faults, parse_faults
from lorainv.config import RuntimeConfig
from lorainv.errors import ConfigError, Violation
from lorainv.extensions import ExtensionError, Fault, collect, using
from lorainv.fault_names import CATALOGUE, FAULTS
from lorainv.impl.engine import Engine
from lorainv.snapshot import Snapshot

# A user's module: one checker, one fault. The checker flags any request whose KV reaches 9
# tokens (a deployment limit of the user's, which lorainv's own checkers know nothing of);
# the fault makes every request one token longer than asked (the "off-by-one" of a frontend).
USER_MODULE = """
from lorainv.checkers import register
from lorainv.errors import Violation
from lorainv.extensions import fault


@register("{prefix}_kv_cap")
class KvCap:
    def check(self, snap):
        return [Violation("{prefix}", "U1", f"{{r.rid}} holds {{r.kv_len}} tokens", (r.rid,))
                for r in snap.requests if r.kv_len >= 9]


@fault("{prefix}_marks_engine", "sets engine.planted (a visible, harmless patch)")
def marks(engine):
    engine.planted = "{prefix}"
"""


def write_module(root: Path, name: str, text: str) -> str:
    (root / f"{name}.py").write_text(textwrap.dedent(text))
    return name


@pytest.fixture
def user_mod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """A fresh user module (unique name per test, so no import cache is shared)."""
    prefix = "u" + str(abs(hash(request.node.nodeid)) % 10**8)
    monkeypatch.syspath_prepend(str(tmp_path))
    return write_module(tmp_path, f"{prefix}_ext", USER_MODULE.format(prefix=prefix))


def long_request_snapshot() -> Snapshot:
    eng = Engine(RuntimeConfig(dtype="float64"))
    eng.add_request(list(range(1, 8)), max_new_tokens=8)
    for _ in range(3):  # prefill, then two decodes: 9 tokens of KV, still decoding
        eng.step()
    return eng.snapshot()


def test_a_checker_is_in_force_inside_its_scope_only(user_mod: str) -> None:
    prefix = user_mod.removesuffix("_ext")
    __import__(user_mod)  # importing it declares; nothing changes
    assert f"{prefix}_kv_cap" not in checker_names()
    snap = long_request_snapshot()
    assert run_checks(snap) == []  # lorainv's own checkers: nothing wrong
    with using(user_mod):
        assert f"{prefix}_kv_cap" in checker_names()
        got = run_checks(snap)
        assert [(v.pool, v.invariant) for v in got] == [(prefix, "U1")]
        with using(user_mod):  # nested, the same module: still one checker
            assert checker_names().count(f"{prefix}_kv_cap") == 1
        assert f"{prefix}_kv_cap" in checker_names()
    assert f"{prefix}_kv_cap" not in checker_names()
    assert run_checks(snap) == []


def test_a_user_fault_is_known_and_planted_inside_its_scope_only(user_mod: str) -> None:
    prefix = user_mod.removesuffix("_ext")
    name = f"{prefix}_marks_engine"
    with pytest.raises(ConfigError, match=name):
        RuntimeConfig(faults=frozenset({name}))
    with using(user_mod):
        assert name in FAULTS and FAULTS[name].startswith("sets engine.planted")
        out = io.StringIO()
        list_faults(out)
        assert any(line.startswith(name) for line in out.getvalue().splitlines())
        cfg = RuntimeConfig(faults=frozenset({name}))
        assert getattr(Engine(cfg), "planted", None) == prefix
        assert not hasattr(Engine(RuntimeConfig()), "planted")  # only where enabled
    assert name not in FAULTS and dict(FAULTS) == CATALOGUE
    with pytest.raises(ConfigError, match="not registered here"):
        Engine(cfg)  # the config survived the scope; the fault did not


def test_classes_and_fault_objects_are_scoped_too() -> None:
    class Always:
        name = "always_t1"

        def check(self, snap: object) -> list[Violation]:
            return [Violation("t", "T1", "always")]

    f = Fault("plain_fault", "does nothing", lambda engine: None)
    with using(Always, f):
        assert "always_t1" in checker_names() and "plain_fault" in FAULTS
    assert "always_t1" not in checker_names() and "plain_fault" not in FAULTS


@pytest.mark.parametrize(
    ("args", "match"),
    [(("bad name", "d", print), "identifier"), (("f", None, print), "description"), (("f", "d", 3), "callable")],
)
def test_a_malformed_fault_is_a_config_error(args: tuple[object, object, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Fault(*args)  # type: ignore[arg-type]


def test_an_install_that_raises_is_a_config_error_naming_the_fault() -> None:
    def install(engine: object) -> None:
        raise AttributeError("engine has no attribute 'old_name'")

    with using(Fault("stale_api", "patches a renamed attribute", install)):
        cfg = RuntimeConfig(faults=frozenset({"stale_api"}))
        with pytest.raises(ConfigError, match=r"user fault 'stale_api': install\(engine\) failed: AttributeError"):
            Engine(cfg)


def test_parse_faults_merges_lorainv_faults(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LORAINV_FAULTS", "stale_slot_tail")
    assert parse_faults("retract_leaks_tail", "fuzz") == {"stale_slot_tail", "retract_leaks_tail"}
    assert parse_faults("", "replay") == {"stale_slot_tail"}
    monkeypatch.setenv("LORAINV_FAULTS", "no_such_fault")
    assert parse_faults("", "replay") is None
    err = capsys.readouterr().err
    assert "LORAINV_FAULTS" in err and "no_such_fault" in err


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (None, "cannot import checker module 'nowhere_mod_xyz'"),
        ("raise RuntimeError('boom')", "failed to import: RuntimeError: boom"),
        ("x = 1", "declares no checker"),
        (
            "from lorainv.checkers import register\n@register('kv')\nclass K:\n    def check(self, s): return []\n",
            "'kv' is taken",
        ),
        (
            "from lorainv.extensions import Fault\nF = Fault('stale_slot_tail', 'd', lambda e: None)\n",
            "'stale_slot_tail' is taken",
        ),
    ],
)
def test_bad_modules_are_extension_errors_and_change_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str | None, match: str
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    name = "nowhere_mod_xyz" if text is None else write_module(tmp_path, f"bad{abs(hash(text)) % 10**8}", text)
    before = (checker_names(), dict(FAULTS))
    with pytest.raises(ExtensionError, match=match), using(name):
        pass  # pragma: no cover - never entered
    assert (checker_names(), dict(FAULTS)) == before


def test_a_module_in_the_current_directory_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # as with the `lorainv` script, whose sys.path does not hold the current directory
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    write_module(tmp_path, "cwd_checks_mod", "from lorainv.extensions import Fault\nF = Fault('cwd_f', 'd', print)\n")
    with using("cwd_checks_mod"):
        assert "cwd_f" in FAULTS
    assert str(tmp_path) not in sys.path


def write_dist(root: Path, dist: str, entry_points: str) -> None:
    """An installed distribution as importlib.metadata sees it: a ``.dist-info`` on sys.path."""
    info = root / f"{dist}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))


def test_entry_points_are_discovered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user_mod: str) -> None:
    prefix = user_mod.removesuffix("_ext")
    write_dist(
        tmp_path,
        "userext",
        f"""
        [lorainv.checkers]
        cap = {user_mod}:KvCap
        [lorainv.faults]
        marks = {user_mod}:marks
        """,
    )
    ext = collect(entry_points=True)
    assert set(ext.checkers) == {f"{prefix}_kv_cap"} and set(ext.faults) == {f"{prefix}_marks_engine"}
    assert collect().checkers == {}  # entry points only when asked


def test_a_failing_entry_point_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    write_dist(tmp_path, "brokenext", "[lorainv.checkers]\nbroken = no_such_module_abc:Checker\n")
    with pytest.raises(ExtensionError, match=r"entry point broken = no_such_module_abc:Checker .* failed to load"):
        collect(entry_points=True)


def test_cli_list_faults_and_a_bad_checker_module(user_mod: str, capsys: pytest.CaptureFixture[str]) -> None:
    from lorainv.cli import main

    prefix = user_mod.removesuffix("_ext")
    assert main(["fuzz", "--list-faults", "--checkers", user_mod]) == 0
    assert f"{prefix}_marks_engine" in capsys.readouterr().out
    assert main(["fuzz", "--list-faults", "--checkers", "nowhere_mod_xyz"]) == 2
    assert "ExtensionError: cannot import checker module 'nowhere_mod_xyz'" in capsys.readouterr().err
    assert f"{prefix}_marks_engine" not in FAULTS and "nowhere_mod_xyz" not in sys.modules
