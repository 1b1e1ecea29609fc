"""``lorainv gate``: the CI gate, for lorainv itself and for a project that uses it.

Steps, in order, stopping at the first that fails:

1. lint (``--lint``; ``auto``, the default, means on inside lorainv's own repository only,
   since a user project has its own lint setup): ``ruff check``, ``ruff format --check`` and,
   in lorainv's repository, ``mypy lorainv``;
2. ``pytest`` on ``--tests`` at ``--strict`` with the ``lorainv-ci`` Hypothesis profile (or
   ``--profile``), the user checkers of ``--checkers``, and ``-n WORKERS`` when pytest-xdist
   is installed;
3. a fixed, seeded fuzz budget: ``lorainv fuzz --fast --max-examples N --seed S --strict L``
   with the same ``--checkers``.

Exit 0 when every step is clean, 1 when one fails (the traces saved since the gate started
are printed, with the replay command), 2 on a usage error. Every step is a subprocess run
with this Python, so the gate needs no ``lorainv`` script on PATH.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from lorainv.cli.common import add_checkers_arg
from lorainv.config import strict_level_from_env


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        from lorainv.errors import ConfigError

        raise ConfigError(f"{name}={raw!r} must be an integer") from None


def add_parser(sub: Any) -> None:
    """Add this command's subparser to ``sub``."""
    g = sub.add_parser(
        "gate",
        help="CI gate: lint (in lorainv's repo), pytest at a strict level, a fixed fuzz budget",
        description="Run the CI gate. Exit 0 clean, 1 a step failed (saved traces are listed), 2 usage error.",
    )
    g.add_argument(
        "--tests", action="append", default=None, metavar="PATH", help="test path (repeatable; default tests)"
    )
    g.add_argument(
        "--workers",
        type=int,
        default=None,
        help="pytest-xdist workers (default LORAINV_WORKERS or 2; 0 or xdist not installed: no -n)",
    )
    g.add_argument(
        "--strict",
        type=int,
        choices=[0, 1, 2],
        default=None,
        help="strict memory-check level for tests and fuzz (default LORAINV_STRICT_MEM_CHECK or 2)",
    )
    g.add_argument(
        "--lint",
        choices=["auto", "on", "off"],
        default="auto",
        help="ruff (+ mypy in lorainv's repo); auto: only inside lorainv's own repository",
    )
    g.add_argument("--profile", default="lorainv-ci", help="Hypothesis profile for the tests ('' loads none)")
    g.add_argument(
        "--fuzz-examples",
        type=int,
        default=None,
        help="fuzz budget (default LORAINV_FUZZ_EXAMPLES or 400; 0 skips the fuzz step)",
    )
    g.add_argument("--fuzz-seed", type=int, default=None, help="fuzz seed (default LORAINV_FUZZ_SEED or 0)")
    add_checkers_arg(g)


def _in_lorainv_repo(root: Path) -> bool:
    """Whether ``root`` is lorainv's own source tree (its pyproject names the project lorainv)."""
    py = root / "pyproject.toml"
    if not (py.is_file() and (root / "lorainv" / "__init__.py").is_file()):
        return False
    return any(line.replace(" ", "") == 'name="lorainv"' for line in py.read_text().splitlines())


def _steps(a: argparse.Namespace, root: Path, strict: int) -> list[tuple[str, list[str]]]:
    py = sys.executable
    steps: list[tuple[str, list[str]]] = []
    own = _in_lorainv_repo(root)
    if a.lint == "on" or (a.lint == "auto" and own):
        paths = [p for p in ("lorainv", "tests", "bench") if (root / p).exists()] if own else ["."]
        steps += [
            ("ruff check", [py, "-m", "ruff", "check", *paths]),
            ("ruff format", [py, "-m", "ruff", "format", "--check", *paths]),
        ]
        if own:
            steps.append(("mypy", [py, "-m", "mypy", "lorainv"]))
    workers = a.workers if a.workers is not None else _env_int("LORAINV_WORKERS", 2)
    cmd = [py, "-m", "pytest", "-q", f"--lorainv-strict={strict}"]
    if a.profile:  # (run() also exports LORAINV_HYPOTHESIS_PROFILE, for pytest runs the tests start)
        cmd.append(f"--hypothesis-profile={a.profile}")
    if workers > 0 and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(workers), "--dist", "worksteal"]  # an idle worker takes queued tests from a busy one
    for m in a.checkers:
        cmd.append(f"--lorainv-checkers={m}")
    steps.append(("pytest", cmd + list(a.tests or ["tests"])))
    n = a.fuzz_examples if a.fuzz_examples is not None else _env_int("LORAINV_FUZZ_EXAMPLES", 400)
    seed = a.fuzz_seed if a.fuzz_seed is not None else _env_int("LORAINV_FUZZ_SEED", 0)
    if n > 0:
        fuzz = [py, "-m", "lorainv.cli", "fuzz", "--fast", "--max-examples", str(n), "--seed", str(seed)]
        fuzz += ["--strict", str(strict), "--json", ".lorainv/fuzz-report.json", "--quiet"]
        if _fuzz_has("--db"):  # no example database: the gate's budget stays the same examples every run
            fuzz += ["--db", "none"]
        for m in a.checkers:
            fuzz += ["--checkers", m]
        steps.append(("fuzz", fuzz))
    return steps


def _fuzz_has(flag: str) -> bool:
    """Whether ``lorainv fuzz`` has the option ``flag`` (read from its parser)."""
    from lorainv.cli import fuzz

    p = argparse.ArgumentParser()
    fuzz.add_parser(p.add_subparsers())
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return flag in sub.choices["fuzz"]._option_string_actions


def run(a: argparse.Namespace, out: TextIO) -> int:
    """Run the gate's steps in order; 0 when all pass, 1 at the first failure, 2 on bad usage."""
    if a.workers is not None and a.workers < 0:
        sys.stderr.write("lorainv gate: --workers must be >= 0\n")
        return 2
    if a.fuzz_examples is not None and a.fuzz_examples < 0:
        sys.stderr.write("lorainv gate: --fuzz-examples must be >= 0\n")
        return 2
    missing = [t for t in (a.tests or ["tests"]) if not Path(t.split("::")[0]).exists()]
    if missing:
        sys.stderr.write(f"lorainv gate: --tests path(s) not found: {missing}\n")
        return 2
    if a.checkers:  # fail fast, naming the module, before minutes of tests
        from lorainv.extensions import collect

        collect(a.checkers)
    strict = a.strict if a.strict is not None else strict_level_from_env(2)
    root = Path.cwd()
    env = dict(os.environ)
    env["LORAINV_STRICT_MEM_CHECK"] = str(strict)
    env.pop("SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY", None)  # one level, stated once
    if a.profile:
        env["LORAINV_HYPOTHESIS_PROFILE"] = a.profile
    trace_dir = Path(env.get("LORAINV_TRACE_DIR") or root / ".lorainv" / "traces").resolve()
    env["LORAINV_TRACE_DIR"] = str(trace_dir)
    trace_dir.mkdir(parents=True, exist_ok=True)
    (root / ".lorainv").mkdir(exist_ok=True)
    start = time.time()
    for name, cmd in _steps(a, root, strict):
        out.write(f"lorainv gate: {name}: {' '.join(cmd[1:] if cmd[0] == sys.executable else cmd)}\n")
        out.flush()
        rc = subprocess.run(cmd, env=env, cwd=root, check=False).returncode
        if rc != 0:
            out.write(f"lorainv gate: FAILED at {name} (exit {rc})\n")
            _show_traces(out, trace_dir, start)
            return 1
    out.write("lorainv gate: clean\n")
    return 0


def _show_traces(out: TextIO, trace_dir: Path, since: float) -> None:
    new = sorted(p for p in trace_dir.rglob("*.json") if p.stat().st_mtime >= since - 1)
    if not new:
        out.write("lorainv gate: no trace saved\n")
        return
    out.write("lorainv gate: saved traces (replay with: lorainv replay PATH):\n")
    for p in new:
        out.write(f"  {p}\n")
