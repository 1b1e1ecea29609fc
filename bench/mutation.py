"""Suite power, measured: how many mutants of ``lorainv/impl/`` the fuzzer alone kills.

The mutants come from a standard tool, cosmic-ray, through its Python API: every operator
cosmic-ray's ``init`` would use by default (``cosmic_ray.plugins.operator_names()``, those that
take no arguments) is asked for its ``mutation_positions`` over the parso tree of each target
file, in cosmic-ray's own walk order, and a mutant is cosmic-ray's ``mutate_code(source,
operator, occurrence)``. Nothing is hand-picked: all mutation points are enumerated, then a
seeded random sample (``--sample N --seed S``) is drawn.

One population filter is applied, and counted in the report: mutation points inside type
annotations (parameter, return and variable annotations). Every file of ``lorainv/impl``
starts with ``from __future__ import annotations`` and no code evaluates those annotations, so
such a mutant cannot change behaviour (cosmic-ray itself already skips ``|`` in variable
annotations for that reason).

Each mutant is written into a COPY of the package (a snapshot of ``--src`` taken at the start;
the checkout itself is never touched) and judged by the command a user gates with::

    python -m lorainv.cli fuzz --fast --max-examples B --seed 0 --quiet --json R

run with ``PYTHONPATH`` at the copy and a timeout; for the network, batch and backend files
(``llama.py``, ``batch.py``, ``backends/``) a ``--numeric`` run with a smaller budget follows
when the fast run stays clean. Outcomes:

* **killed** — the fuzzer reported a violation (exit status 1 with its JSON report);
* **killed (crash)** — the CLI died with an uncaught error while fuzzing (the harness turns an
  engine crash inside an op into a violation, so this is a crash outside the ops);
* **killed (import)** — the CLI died in module-level code (the mutant cannot even be imported);
* **survived** — every run was clean;
* **timed out** — a run exceeded ``--timeout`` (counted apart, not as killed);
* **not reached** — the mutation point is in code the clean fuzz run never executes. This is
  *shown*, not assumed: the unmutated copy is fuzzed once under ``coverage`` with the very same
  command (same seed, same budget); a campaign is deterministic in its seed (Hypothesis
  ``seed``, no database, the runtime reads only a simulated clock), so a mutant none of whose
  lines (from the first line of its enclosing statement to the mutation's end) executed in
  that run behaves exactly like the clean code and cannot be killed. Such mutants are not run
  and are reported as their own category: blind spots of the generators (or dead code), not
  equivalent mutants. ``--run-unreached`` runs them anyway and reports any that is not clean
  (``unreached_refuted`` in the JSON; it has always been empty so far).

A kill needs no shrunk trace: when the CLI under test has ``--no-shrink`` it is passed;
without it the default timeout allows for Hypothesis shrinking (which took 110 s of one kill).
A survivor whose op count differs from the clean run's is hinted "behaviour changed": it did
change what the engine did, so it cannot be equivalent.

Score = killed (all three kinds) / (run mutants − equivalent), where *equivalent* is the number
of mutants whose verdict (``--verdicts FILE``) starts with ``equivalent``. The survivors, time-outs
and not-reached mutants are printed as a Markdown table with an empty verdict column, ready for
``bench/RESULTS.md``; a human writes ``missing check: ...`` or ``equivalent: ...`` there, and
``--rescore bench/results/mutation.json --verdicts bench/RESULTS.md`` (verdicts may also be a
JSON object ``{id: verdict}`` or ``id verdict`` lines) recomputes the score without re-running.
An interrupted run continues with ``--resume`` (same sample and budgets). After a check is
added, ``--only ID,... --update OLD.json`` re-runs those mutants on the current code and
merges them into the earlier results by id (the JSON's ``updated_from`` names the earlier
commit, the re-run ids and how many results were kept).

Run ``python -m bench.mutation [--sample 150 --seed 0 --jobs 2]``; writes
``bench/results/mutation.json``. ``--quick``: 4 mutants, 30 fast / 3 numeric examples. The
default sample of 150 leaves about 100 mutants to run: in the dry runs 7 of 24 sampled points
were code the fuzzer never runs (the Triton kernels, checkpoint saving, test-only checks).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import common

NAME = "mutation"
PROGRESS = "mutation.progress.jsonl"  # one finished mutant per line, written as the run goes
REPO = Path(__file__).resolve().parents[1]
DEFAULT_TARGETS = ("lorainv/impl",)
# files whose mutants also get a --numeric run (the network, the batch builder and the LoRA backends)
NUMERIC_FILES = ("lorainv/impl/llama.py", "lorainv/impl/batch.py", "lorainv/impl/backends/")
# parso node types that are a statement (or a compound statement's header) for reachability
_STMT_TYPES = frozenset(
    {
        "simple_stmt",
        "if_stmt",
        "while_stmt",
        "for_stmt",
        "try_stmt",
        "with_stmt",
        "funcdef",
        "classdef",
        "decorated",
        "async_stmt",
        "match_stmt",
        "case_block",
    }
)
KILLED = ("killed", "killed (crash)", "killed (import)")
# "invalid": the mutant could not be made or judged (a bug of this bench; never seen): not scored
STATUSES = (*KILLED, "survived", "timed out", "not reached", "invalid")
# cosmic-ray's ExceptionReplacer writes this name into ``except`` clauses; cosmic-ray defines the
# class in its own package, so the mutant's interpreter gets it as a builtin (sitecustomize)
_SITECUSTOMIZE = (
    "import builtins\n\n\n"
    "class CosmicRayTestingException(Exception):\n"
    '    """Raised by nothing: an except clause naming it catches nothing."""\n\n\n'
    "builtins.CosmicRayTestingException = CosmicRayTestingException\n"
)


@dataclass(frozen=True)
class MutationPoint:
    """One cosmic-ray mutation: ``operator`` applied at its ``occurrence``-th position in ``path``.

    ``occurrence`` counts every position of that operator in the file in cosmic-ray's walk
    order (annotation positions included, so that ``mutate_code`` applies exactly this one).
    ``stmt_line`` is the first line of the enclosing statement (used for reachability).
    """

    path: str  # relative to the source root, e.g. "lorainv/impl/engine.py"
    operator: str  # cosmic-ray name, e.g. "core/ReplaceComparisonOperator_Lt_LtE"
    occurrence: int
    line: int
    col: int
    end_line: int
    stmt_line: int

    @property
    def id(self) -> str:
        return f"{self.path}:{self.operator.split('/', 1)[-1]}:{self.occurrence}"

    @property
    def numeric(self) -> bool:
        return any(self.path == f or (f.endswith("/") and self.path.startswith(f)) for f in NUMERIC_FILES)


@dataclass
class MutantResult:
    """What happened to one sampled mutant. ``status`` is one of ``STATUSES``."""

    id: str
    path: str
    line: int
    operator: str
    before: str
    after: str
    status: str = "survived"
    killed_by: str = ""  # "fast" or "numeric" for a kill
    detail: str = ""  # the violation message, the crash's last line, or why not run
    hint: str = ""  # for a survivor: whether it ran differently from the clean code (not equivalent then)
    seconds: float = 0.0  # wall time of all runs of this mutant
    runs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Settings:
    """How each mutant is judged (the same for the clean baseline)."""

    fast_examples: int
    numeric_examples: int
    fuzz_seed: int
    timeout_s: float | None  # None: derived from the baseline
    no_shrink: bool = False  # pass --no-shrink (when the CLI has it): a kill needs no shrunk trace


# -- enumeration ---------------------------------------------------------------------------------
def operators() -> list[tuple[str, Any]]:
    """cosmic-ray's default operator set: every registered operator that takes no arguments."""
    import cosmic_ray.plugins as plugins

    out = []
    for name in plugins.operator_names():
        cls = plugins.get_operator(name)
        if not cls.arguments():
            out.append((name, cls()))
    return out


def _in_annotation(node: Any) -> bool:
    """Whether a parso node lies inside a parameter, return or variable annotation."""
    child, parent = node, node.parent
    while parent is not None:
        kids = parent.children
        i = next(k for k, c in enumerate(kids) if c is child)
        if parent.type == "tfpdef" and i > 0:  # lambda-free typed parameter: name ':' annotation
            return True
        if parent.type == "param" and i > 0 and getattr(kids[i - 1], "value", None) == ":":
            return True
        if parent.type == "funcdef" and i > 0 and getattr(kids[i - 1], "value", None) == "->":
            return True
        if parent.type == "annassign" and i == 1:
            return True
        if parent.type in ("suite", "file_input"):
            return False
        child, parent = parent, parent.parent
    return False


def _stmt_line(node: Any) -> int:
    """The first line of the statement that contains ``node`` (or ``node`` itself)."""
    n = node
    while n is not None and n.type not in _STMT_TYPES:
        n = n.parent
    return int((n or node).start_pos[0])


def target_files(root: Path, targets: Sequence[str]) -> list[str]:
    """The ``.py`` files under ``targets`` (paths relative to ``root``), sorted."""
    files: set[str] = set()
    for t in targets:
        p = root / t
        found = [p] if p.is_file() else sorted(p.rglob("*.py"))
        files.update(str(f.relative_to(root)) for f in found if "__pycache__" not in f.parts)
    return sorted(files)


def enumerate_points(root: Path, files: Sequence[str]) -> tuple[list[MutationPoint], dict[str, int]]:
    """All cosmic-ray mutation points of ``files``; returns (population, counts of filtered points).

    The population leaves out points inside type annotations (counted under ``annotation``).
    """
    from cosmic_ray.ast import ast_nodes, get_ast

    ops = operators()
    points: list[MutationPoint] = []
    skipped: Counter[str] = Counter()
    for rel in files:
        nodes = list(ast_nodes(get_ast((root / rel).read_text(encoding="utf-8"))))
        for name, op in ops:
            occurrence = 0
            for node in nodes:
                for start, end in op.mutation_positions(node):
                    if _in_annotation(node):
                        skipped["annotation"] += 1
                    else:
                        points.append(
                            MutationPoint(rel, name, occurrence, start[0], start[1], end[0], _stmt_line(node))
                        )
                    occurrence += 1
    return points, dict(skipped)


def sample_points(points: Sequence[MutationPoint], n: int, seed: int) -> list[MutationPoint]:
    """A seeded uniform sample of ``n`` points (all of them when fewer), in file/line order."""
    pop = sorted(points, key=lambda p: p.id)
    picked = random.Random(seed).sample(pop, min(n, len(pop)))
    return sorted(picked, key=lambda p: (p.path, p.line, p.col, p.id))


def mutate(source: str, point: MutationPoint) -> str:
    """cosmic-ray's mutant of ``source`` at ``point`` (raises if cosmic-ray applies nothing)."""
    import cosmic_ray.plugins as plugins
    from cosmic_ray.mutating import mutate_code

    code = mutate_code(source, plugins.get_operator(point.operator)(), point.occurrence)
    if code is None or code == source:
        raise ValueError(f"cosmic-ray made no change for {point.id}")
    return str(code)


def before_after(source: str, mutated: str) -> tuple[str, str]:
    """The changed lines (stripped, joined with ' / ') before and after the mutation."""
    a, b = source.splitlines(), mutated.splitlines()
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    ja, jb = len(a), len(b)
    while ja > i and jb > i and a[ja - 1] == b[jb - 1]:
        ja, jb = ja - 1, jb - 1

    def show(lines: list[str]) -> str:
        text = " / ".join(s.strip() for s in lines) or "(removed)"
        return text if len(text) <= 100 else text[:97] + "..."

    return show(a[i:ja]), show(b[i:jb])


# -- running -------------------------------------------------------------------------------------
def snapshot(src: Path, dst: Path) -> None:
    """Copy ``src/lorainv`` to ``dst/lorainv`` (no bytecode), plus the builtin cosmic-ray needs."""
    shutil.copytree(src / "lorainv", dst / "lorainv", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (dst / "sitecustomize.py").write_text(_SITECUSTOMIZE)


def fuzz_cmd(mode: str, s: Settings, report: Path) -> list[str]:
    examples = s.fast_examples if mode == "fast" else s.numeric_examples
    budget = ["--max-examples", str(examples), "--seed", str(s.fuzz_seed)] + (["--no-shrink"] if s.no_shrink else [])
    return [sys.executable, "-m", "lorainv.cli", "fuzz", f"--{mode}", *budget, "--quiet", "--json", str(report)]


def _cli_source(copy: Path) -> str:
    """The source of the copy's command line: ``lorainv/cli.py``, or every module of ``lorainv/cli/``."""
    single = copy / "lorainv" / "cli.py"
    if single.exists():
        return single.read_text(encoding="utf-8")
    return "".join(p.read_text(encoding="utf-8") for p in sorted((copy / "lorainv" / "cli").glob("*.py")))


def cli_has_no_shrink(copy: Path) -> bool:
    """Whether the copy's ``lorainv fuzz`` takes ``--no-shrink`` (shrinking only slows a kill down)."""
    return '"--no-shrink"' in _cli_source(copy)


def _env(copy: Path) -> dict[str, str]:
    # no inherited LORAINV_* (strict level, faults): every run is judged by the settings shown
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAINV_")}
    env["PYTHONPATH"] = str(copy)  # the copy only: the checkout must not leak in
    env["LORAINV_TRACE_DIR"] = str(copy / "traces")
    env.pop("COVERAGE_PROCESS_START", None)
    return env


def run_fuzz(copy: Path, mode: str, s: Settings, timeout: float | None, prefix: Sequence[str] = ()) -> dict[str, Any]:
    """Run the fuzz CLI on the package at ``copy``; returns a run record.

    ``outcome`` is ``violation``, ``clean``, ``crash``, ``import`` or ``timeout``. The cwd is the
    copy, so ``python -m`` puts the copy (not the checkout) first on ``sys.path``.
    """
    report = copy / f"fuzz-{mode}.json"
    report.unlink(missing_ok=True)
    cmd = fuzz_cmd(mode, s, report)
    if prefix:  # e.g. ``python -m coverage run ...``: it takes the ``-m lorainv.cli ...`` part
        cmd = [*prefix, *cmd[1:]]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=copy, env=_env(copy), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "outcome": "timeout", "seconds": round(time.perf_counter() - t0, 2), "detail": ""}
    dt = round(time.perf_counter() - t0, 2)
    doc: dict[str, Any] = {}
    if report.exists():
        try:
            doc = json.loads(report.read_text())
        except ValueError:
            doc = {}
    rec: dict[str, Any] = {"mode": mode, "seconds": dt, "returncode": p.returncode, "ops": doc.get("ops")}
    if p.returncode == 1 and doc.get("violations") == 1:
        rec.update(outcome="violation", detail=str(doc.get("violation", ""))[:300])
    elif p.returncode == 0 and doc.get("violations") == 0:
        rec.update(outcome="clean", detail="")
    else:
        err = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
        rec.update(outcome="import" if died_at_import(p.stderr) else "crash", detail=(err or ["?"])[-1][:300])
    return rec


def progress_key(point: MutationPoint, source: str, s: Settings) -> str:
    """Identifies a judged mutant: the same id in the same file text, judged with the same budgets."""
    digest = hashlib.sha1(source.encode()).hexdigest()[:16]
    return f"{point.id}|{digest}|{s.fast_examples}|{s.numeric_examples}|{s.fuzz_seed}|{s.no_shrink}"


def read_progress(path: Path) -> dict[str, dict[str, Any]]:
    """Finished mutants of an earlier (interrupted) run by `progress_key`; a torn last line is ignored."""
    out: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                out[rec["key"]] = rec["result"]
            except (ValueError, KeyError, TypeError):
                continue
    return out


def died_at_import(stderr: str) -> bool:
    """Whether a traceback ends in module-level code (a module failed to import) or a syntax error."""
    frames = re.findall(r'File "[^"]*", line \d+, in (\S+)', stderr)
    last = [ln for ln in stderr.strip().splitlines() if ln.strip()][-1:] or [""]
    return last[0].startswith(("SyntaxError", "IndentationError")) or (bool(frames) and frames[-1] == "<module>")


def judge(point: MutationPoint, source: str, base: Path, work: Path, s: Settings, timeout: float) -> MutantResult:
    """Apply ``point`` to a fresh copy of ``base`` under ``work`` and fuzz it (fast, then numeric)."""
    mutated = mutate(source, point)
    before, after = before_after(source, mutated)
    res = MutantResult(point.id, point.path, point.line, point.operator.split("/", 1)[-1], before, after)
    copy = work / re.sub(r"[^A-Za-z0-9_.-]", "_", point.id)
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(base, copy)
    (copy / point.path).write_text(mutated, encoding="utf-8")
    t0 = time.perf_counter()
    try:
        for mode in ("fast", "numeric") if point.numeric else ("fast",):
            rec = run_fuzz(copy, mode, s, timeout)
            res.runs.append(rec)
            outcome = rec["outcome"]
            if outcome == "clean":
                continue
            res.detail = rec.get("detail", "")
            if outcome == "timeout":
                res.status = "timed out"
            else:
                res.status = {"violation": "killed", "crash": "killed (crash)", "import": "killed (import)"}[outcome]
                res.killed_by = mode
            break
    finally:
        res.seconds = round(time.perf_counter() - t0, 2)
        shutil.rmtree(copy, ignore_errors=True)
    return res


def executed_lines(clean: Path, mode: str, s: Settings) -> tuple[dict[str, set[int]], dict[str, Any]] | None:
    """Lines of ``lorainv/`` the clean fuzz run (at ``clean``) executes, by relative path, and the run record.

    Returns None when ``coverage`` is not installed (then every mutant is run).
    """
    try:
        from coverage import CoverageData
    except ImportError:
        return None
    data_file = clean / f".coverage-{mode}"
    prefix = [sys.executable, "-m", "coverage", "run", f"--data-file={data_file}", f"--include={clean}/lorainv/*"]
    rec = run_fuzz(clean, mode, s, None, prefix=prefix)
    data = CoverageData(basename=str(data_file))
    data.read()
    lines: dict[str, set[int]] = {}
    for f in data.measured_files():
        rel = os.path.relpath(f, clean)
        lines[rel] = set(data.lines(f) or ())
    return lines, rec


def reached(point: MutationPoint, lines: dict[str, set[int]]) -> bool:
    """Whether any line from the enclosing statement's start to the mutation's end executed."""
    got = lines.get(point.path, set())
    return any(ln in got for ln in range(point.stmt_line, point.end_line + 1))


# -- verdicts and score --------------------------------------------------------------------------
def load_verdicts(path: Path) -> dict[str, str]:
    """Verdicts by mutant id read from ``path`` (see `parse_verdicts`)."""
    return parse_verdicts(path.read_text(encoding="utf-8"))


def parse_verdicts(text: str) -> dict[str, str]:
    """Verdicts by mutant id from JSON (``{id: verdict}``), a Markdown table, or ``id verdict`` lines.

    In a Markdown table the row's first cell that looks like an id (``path.py:Operator:N``) is
    the id and its last non-empty cell the verdict; rows with an empty verdict are ignored.
    """
    if text.lstrip().startswith("{"):
        doc = json.loads(text)
        return {str(k): str(v).strip() for k, v in doc.items() if str(v).strip()}
    id_re = re.compile(r"^`?([\w./-]+\.py:\w+:\d+)`?$")
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            ids = [m.group(1) for c in cells if (m := id_re.match(c))]
            if ids and cells[-1] and not id_re.match(cells[-1]):
                out[ids[0]] = cells[-1]
        elif line and not line.startswith("#"):
            head, _, rest = line.partition(" ")
            m = id_re.match(head)
            if m and rest.strip():
                out[m.group(1)] = rest.strip()
    return out


def is_equivalent(verdict: str | None) -> bool:
    return bool(verdict) and verdict.strip().lower().startswith("equivalent")  # type: ignore[union-attr]


def score(results: Iterable[MutantResult], verdicts: dict[str, str]) -> dict[str, Any]:
    """Counts per status and the score over non-equivalent mutants.

    ``score`` = killed / (run − equivalent), over the mutants that were run; ``score_with_unreached``
    also counts the not-reached mutants (as not killed) in the denominator. Timeouts count as
    not killed. Equivalent = a verdict that starts with "equivalent".
    """
    rs = list(results)
    counts = Counter(r.status for r in rs)
    killed = sum(counts[k] for k in KILLED)
    rs = [r for r in rs if r.status != "invalid"]
    ran = [r for r in rs if r.status != "not reached"]
    eq_run = sum(1 for r in ran if is_equivalent(verdicts.get(r.id)))
    eq_all = sum(1 for r in rs if is_equivalent(verdicts.get(r.id)))
    denom = len(ran) - eq_run
    denom_all = len(rs) - eq_all
    unjudged = [r.id for r in rs if r.status not in KILLED and not verdicts.get(r.id)]
    return {
        "total": len(rs),
        "run": len(ran),
        **{k: counts[k] for k in STATUSES},
        "killed_all": killed,
        "equivalent": eq_run,
        "equivalent_incl_unreached": eq_all,
        "score": round(killed / denom, 4) if denom else None,
        "score_with_unreached": round(killed / denom_all, 4) if denom_all else None,
        "formula": "score = killed / (run - equivalent); killed includes crash and import deaths; "
        "timeouts are not killed; not-reached mutants are not run (score_with_unreached counts them as not killed)",
        "without_verdict": unjudged,
    }


# -- report --------------------------------------------------------------------------------------
def render_counts(sc: dict[str, Any]) -> str:
    rows = [[k, sc[k]] for k in STATUSES]
    rows += [["equivalent (by verdict)", sc["equivalent"]], ["run", sc["run"]], ["sampled", sc["total"]]]

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    rows += [["score", pct(sc["score"])], ["score incl. not reached", pct(sc["score_with_unreached"])]]
    return common.table(["outcome", "mutants"], rows)


def render_files(results: Sequence[MutantResult]) -> str:
    by: dict[str, Counter[str]] = {}
    for r in results:
        by.setdefault(r.path, Counter())[r.status] += 1
    head = ["file", "sampled", "killed", "crash", "import", "survived", "timeout", "not reached", "invalid"]
    rows = [[f, sum(c.values()), *(c[s] for s in STATUSES)] for f, c in sorted(by.items())]
    return common.table(head, rows)


def survivors_markdown(results: Sequence[MutantResult], verdicts: dict[str, str]) -> str:
    """The mutants a human must judge, as a Markdown table with the verdict column (maybe empty)."""
    rows = [r for r in results if r.status not in KILLED]
    lines = ["| id | where | status | mutation (before → after) | hint | verdict |", "|---|---|---|---|---|---|"]
    for r in rows:
        mut = f"`{r.before}` → `{r.after}`".replace("|", "\\|")
        cells = [f"`{r.id}`", f"{r.path}:{r.line}", r.status, mut, r.hint, verdicts.get(r.id, "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _timing(results: Sequence[MutantResult]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, sel in (
        ("all_run", [r for r in results if r.runs]),
        ("killed", [r for r in results if r.status in KILLED]),
        ("survived", [r for r in results if r.status == "survived"]),
    ):
        xs = [r.seconds for r in sel]
        if xs:
            out[label] = {
                "n": len(xs),
                "median_s": round(common.median(xs), 2),
                "mean_s": round(sum(xs) / len(xs), 2),
                "max_s": round(max(xs), 2),
            }
    return out


# -- main ----------------------------------------------------------------------------------------
def _git(src: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(src), *args], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def print_report(
    targets: str, s: Settings, results: Sequence[MutantResult], sc: dict[str, Any], verdicts: dict[str, str]
) -> None:
    print(
        f"mutation — cosmic-ray operators over {', '.join(targets.split(','))}; lorainv fuzz --fast "
        f"--max-examples {s.fast_examples} --seed {s.fuzz_seed} (+ --numeric --max-examples "
        f"{s.numeric_examples} for {', '.join(NUMERIC_FILES)}) ({common.MACHINE_NOTE}; shared machine)\n"
    )
    print(render_counts(sc))
    print("\n" + render_files(results))
    print(f"\n{sc['formula']}.")
    print(
        "\nSurvivors, time-outs and not-reached mutants (fill the verdict: 'missing check: ...' or "
        "'equivalent: ...'):\n"
    )
    print(survivors_markdown(results, verdicts))


def rescore(path: Path, verdicts: dict[str, str], out: Path) -> int:
    """Apply ``verdicts`` to the results of an earlier run (its JSON at ``path``); runs nothing.

    Rewrites ``out/mutation.json`` with the new counts, keeping the run's machine facts.
    """
    doc = json.loads(path.read_text())
    results = [MutantResult(**r) for r in doc["results"]]
    st = doc["settings"]
    s = Settings(
        st["fast_examples"], st["numeric_examples"], st["fuzz_seed"], st["timeout_s"], st.get("no_shrink", False)
    )
    sc = score(results, verdicts)
    print_report(",".join(st.get("targets", DEFAULT_TARGETS)), s, results, sc, verdicts)
    doc.update(counts=sc, verdicts={r.id: verdicts[r.id] for r in results if r.id in verdicts})
    doc.pop("benchmark", None)
    written = common.write_json(out, NAME, doc)
    print(f"\nre-scored {len(results)} mutants of {path} with {len(doc['verdicts'])} verdicts; wrote {written}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(NAME, __doc__)
    p.add_argument("--sample", type=int, default=None, help="mutants to draw (default 150, quick 4)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--max-examples", type=int, default=None, help="fast fuzz budget per mutant (default 400, quick 30)")
    p.add_argument("--numeric-examples", type=int, default=None, help="numeric budget (default 40, quick 3)")
    p.add_argument("--fuzz-seed", type=int, default=0, help="seed passed to lorainv fuzz (default 0)")
    p.add_argument(
        "--timeout", type=float, default=None, help="seconds per fuzz run (default: from the clean run's time)"
    )
    p.add_argument("--jobs", type=int, default=2, help="mutants run in parallel (default 2)")
    p.add_argument("--src", type=Path, default=REPO, help="checkout whose lorainv/ is copied (default: this repo)")
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="comma-separated files/dirs under --src")
    p.add_argument("--only", default="", help="comma-separated mutant ids to run instead of a sample")
    p.add_argument("--verdicts", type=Path, default=None, help="verdicts: JSON {id: verdict}, Markdown table or text")
    p.add_argument("--no-reach", action="store_true", help="skip the coverage run; run every sampled mutant")
    p.add_argument(
        "--resume", action="store_true", help=f"reuse the results in OUT/{PROGRESS} of the same mutants and settings"
    )
    p.add_argument(
        "--rescore", type=Path, default=None, help="re-score an earlier mutation.json with --verdicts; runs nothing"
    )
    p.add_argument(
        "--update",
        type=Path,
        default=None,
        help="with --only: merge the re-run mutants into this earlier mutation.json (by id; the rest kept)",
    )
    p.add_argument("--run-unreached", action="store_true", help="run the not-reached mutants too, to check that claim")
    args = p.parse_args(argv)
    n = args.sample if args.sample is not None else (4 if args.quick else 150)
    s = Settings(
        fast_examples=args.max_examples or (30 if args.quick else 400),
        numeric_examples=args.numeric_examples or (3 if args.quick else 40),
        fuzz_seed=args.fuzz_seed,
        timeout_s=args.timeout,
    )
    if n < 1 or args.jobs < 1 or min(s.fast_examples, s.numeric_examples) < 1:
        p.error("--sample, --jobs and the budgets must be >= 1")
    verdicts = load_verdicts(args.verdicts) if args.verdicts else {}
    if args.update is not None and not args.only:
        p.error("--update needs --only (the mutants to re-run)")
    if args.rescore is not None:
        return rescore(args.rescore, verdicts, args.out)
    src = args.src.resolve()
    t_start = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="lorainv-mutation-") as tmp:
        work = Path(tmp)
        base = work / "base"
        snapshot(src, base)  # every later read (sources, mutants) comes from this snapshot
        s.no_shrink = cli_has_no_shrink(base)
        files = target_files(base, [t.strip() for t in args.targets.split(",") if t.strip()])
        t0 = time.perf_counter()
        points, filtered = enumerate_points(base, files)
        enum_s = time.perf_counter() - t0
        by_id = {pt.id: pt for pt in points}
        if args.only:
            wanted = [i.strip() for i in args.only.split(",") if i.strip()]
            missing = [i for i in wanted if i not in by_id]
            if missing:
                p.error(f"unknown mutant id(s) {missing}")
            chosen = [by_id[i] for i in wanted]
        else:
            chosen = sample_points(points, n, args.seed)
        log(f"mutation: {len(points)} points in {len(files)} files ({enum_s:.1f} s), {len(chosen)} chosen")

        # the clean copy: must be clean; under coverage it also tells which lines run at all
        modes = ["fast"] + (["numeric"] if any(pt.numeric for pt in chosen) else [])
        clean = work / "clean"
        shutil.copytree(base, clean)
        lines: dict[str, dict[str, set[int]]] = {}
        baseline: dict[str, dict[str, Any]] = {}
        for mode in modes:
            got = None if args.no_reach else executed_lines(clean, mode, s)
            if got is None:
                baseline[mode] = run_fuzz(clean, mode, s, None)
            else:
                lines[mode], baseline[mode] = got
            log(f"  clean {mode}: {baseline[mode]['outcome']} in {baseline[mode]['seconds']} s")
            if baseline[mode]["outcome"] != "clean":
                log(f"mutation: the UNMUTATED code is not clean in {mode} mode: {baseline[mode].get('detail')}")
                return 1
        slowest = max(b["seconds"] for b in baseline.values())
        # a kill also pays for Hypothesis shrinking unless the CLI can skip it: allow for that
        timeout = s.timeout_s or round(3 * slowest + 60 if s.no_shrink else 6 * slowest + 120, 1)

        results: list[MutantResult] = []
        to_run: list[MutationPoint] = []
        unreached: set[str] = set()
        sources = {f: (base / f).read_text(encoding="utf-8") for f in files}
        for pt in chosen:
            file_lines: dict[str, set[int]] = {}
            for mode in ("fast", "numeric") if pt.numeric else ("fast",):
                for f, ls in lines.get(mode, {}).items():
                    file_lines.setdefault(f, set()).update(ls)
            if lines and not reached(pt, file_lines):
                unreached.add(pt.id)
                if args.run_unreached:
                    to_run.append(pt)
                    continue
                op = pt.operator.split("/", 1)[-1]
                try:
                    before, after = before_after(sources[pt.path], mutate(sources[pt.path], pt))
                except ValueError as e:
                    results.append(MutantResult(pt.id, pt.path, pt.line, op, "?", "?", "invalid", detail=str(e)))
                    continue
                results.append(MutantResult(pt.id, pt.path, pt.line, op, before, after, status="not reached"))
            else:
                to_run.append(pt)
        log(
            f"  {len(unreached)} not reached; running {len(to_run)} with --jobs {args.jobs}, "
            f"timeout {timeout} s per run"
        )
        lock = threading.Lock()
        done = [0]
        progress = args.out / PROGRESS
        old = read_progress(progress) if args.resume else {}
        args.out.mkdir(parents=True, exist_ok=True)
        if not args.resume:
            progress.write_text("")

        def one(pt: MutationPoint) -> MutantResult:
            key = progress_key(pt, sources[pt.path], s)
            resumed = key in old
            if resumed:
                r = MutantResult(**old[key])
            else:
                try:
                    r = judge(pt, sources[pt.path], base, work, s, timeout)
                except Exception as e:  # one bad mutant must not lose an hour-long run
                    op = pt.operator.split("/", 1)[-1]
                    r = MutantResult(pt.id, pt.path, pt.line, op, "?", "?", status="invalid", detail=repr(e)[:300])
            with lock:
                done[0] += 1
                if not resumed:
                    with progress.open("a") as fh:
                        fh.write(json.dumps({"key": key, "result": asdict(r)}) + "\n")
                log(
                    f"  [{done[0]:>3}/{len(to_run)}] {r.status:<15} {r.seconds:>6.1f} s  {r.path}:{r.line} "
                    f"{r.operator}  {r.before} -> {r.after}" + ("  (resumed)" if resumed else "")
                )
            return r

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            ran = list(pool.map(one, to_run))
        falsified = []
        for r in ran:  # --run-unreached: a clean run confirms the claim; anything else refutes it
            if r.id in unreached:
                if r.status == "survived":
                    r.status, r.detail = "not reached", "run anyway (--run-unreached): clean"
                else:
                    falsified.append(r.id)
                    r.detail = f"NOT-REACHED CLAIM REFUTED ({r.status}): {r.detail}"
                    log(f"mutation: {r.id} was predicted unreachable but ended {r.status}")
        for r in ran:  # a survivor that ran differently from the clean code is not equivalent
            if r.status in ("survived", "not reached") and r.runs:
                diff = [
                    f"{x['mode']} ops {x.get('ops')} vs clean {baseline[x['mode']].get('ops')}"
                    for x in r.runs
                    if x.get("ops") != baseline[x["mode"]].get("ops")
                ]
                r.hint = "behaviour changed: " + ", ".join(diff) if diff else "same op count as clean"
        results += ran
        previous: dict[str, Any] | None = None
        if args.update is not None:  # --only re-ran some mutants of an earlier run: merge by id
            previous = json.loads(args.update.read_text(encoding="utf-8"))
            merged = {r["id"]: MutantResult(**r) for r in previous["results"]}
            merged.update({r.id: r for r in results})
            results = list(merged.values())
        results.sort(key=lambda r: (r.path, r.line, r.id))

    elapsed = time.perf_counter() - t_start
    sc = score(results, verdicts)
    print_report(args.targets, s, results, sc, verdicts)
    timing = _timing(results)
    doc = {
        "quick": args.quick,
        "tool": {"name": "cosmic-ray", "version": _version("cosmic-ray"), "operators": len(operators())},
        "source": {
            "src": str(src),
            "git_head": _git(src, "rev-parse", "HEAD").strip(),
            "dirty_files": len(_git(src, "status", "--porcelain", "lorainv").splitlines()),
        },
        "settings": {
            **asdict(s),
            "timeout_s": timeout,
            "jobs": args.jobs,
            "sample": n,
            "sample_seed": args.seed,
            "only": bool(args.only),
            "reachability": bool(lines),
            "numeric_files": list(NUMERIC_FILES),
            "targets": [t.strip() for t in args.targets.split(",") if t.strip()],
        },
        "population": {
            "files": len(files),
            "points": len(points),
            "filtered": filtered,
            "by_operator_family": dict(Counter(_family(pt.operator) for pt in points).most_common()),
        },
        "baseline": baseline,
        "updated_from": None
        if previous is None
        else {
            "git_head": previous["source"]["git_head"],
            "rerun": [r.id for r in ran],
            "kept": len(results) - len(ran),
        },
        "unreached_refuted": falsified,
        "counts": sc,
        "verdicts": {r.id: verdicts[r.id] for r in results if r.id in verdicts},
        "timing": timing,
        "elapsed_s": round(elapsed, 1),
        "results": [asdict(r) for r in results],
    }
    path = common.write_json(args.out, NAME, doc)
    (args.out / PROGRESS).unlink(missing_ok=True)  # only an interrupted run leaves it, for --resume
    per = timing.get("all_run", {})
    print(
        f"\n{len(results)} mutants in {elapsed:.0f} s (per run mutant: median {per.get('median_s', '-')} s, "
        f"max {per.get('max_s', '-')} s, --jobs {args.jobs}); wrote {path}"
    )
    return 0


def _family(operator: str) -> str:
    return operator.split("/", 1)[-1].split("_", 1)[0]


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
