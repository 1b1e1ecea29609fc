"""The mutation benchmark (``bench/mutation.py``, issue #13): its mutants come from cosmic-ray,
a mutant that breaks the page allocator is killed by the fuzzer, a mutant in CUDA-only code is
reported as not reached (and really survives when run), and verdicts feed the score.

One end-to-end run (two mutants, a 30-example budget) takes about 30 s on the shared CPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a top-level package of the repository, not installed
    sys.path.insert(0, str(ROOT))

pytest.importorskip("cosmic_ray")
pytest.importorskip("coverage")

from bench import mutation  # noqa: E402

pytestmark = pytest.mark.slow


def point_at(rel: str, operator: str, text: str) -> mutation.MutationPoint:
    """The mutation point of ``operator`` on the line of ``rel`` that contains ``text``."""
    points, _ = mutation.enumerate_points(ROOT, [rel])
    lines = (ROOT / rel).read_text().splitlines()
    hits = [p for p in points if p.operator == operator and text in lines[p.line - 1]]
    if len(hits) != 1:
        pytest.fail(f"expected one {operator} point on a line of {rel} containing {text!r}, got {len(hits)}")
    return hits[0]


def test_mutants_are_cosmic_rays(tmp_path: Path) -> None:
    """The mutant is exactly what cosmic-ray's own ``mutate_code`` makes, and annotations are left out."""
    from cosmic_ray.mutating import mutate_code
    from cosmic_ray.operators.boolean_replacer import ReplaceFalseWithTrue

    rel = "lorainv/impl/kv_pool.py"
    pt = point_at(rel, "core/ReplaceFalseWithTrue", "self._free[pages] = False")
    src = (ROOT / rel).read_text()
    assert mutation.mutate(src, pt) == mutate_code(src, ReplaceFalseWithTrue(), pt.occurrence)
    assert mutation.before_after(src, mutation.mutate(src, pt)) == (
        "self._free[pages] = False",
        "self._free[pages] = True",
    )
    code = (
        "from __future__ import annotations\n\n"
        "def f(x: int | None = 1) -> int | str:\n"
        "    y: int | None = x\n"
        "    return x | 2\n"
    )
    (tmp_path / "probe.py").write_text(code)
    points, filtered = mutation.enumerate_points(tmp_path, ["probe.py"])
    assert filtered["annotation"] == 2 * 11  # two '|' in the signature's annotations, 11 replacements each
    assert {p.line for p in points if "BitOr" in p.operator} == {5}  # only the '|' that runs
    assert all(p.line in (3, 5) for p in points)  # the default value 1 and the body


def test_sample_is_seeded_and_uniform_over_ids() -> None:
    points, _ = mutation.enumerate_points(ROOT, ["lorainv/impl/kv_pool.py"])
    a = mutation.sample_points(points, 10, seed=3)
    assert a == mutation.sample_points(list(reversed(points)), 10, seed=3)
    assert a != mutation.sample_points(points, 10, seed=4)
    assert len({p.id for p in a}) == 10


def test_verdicts_and_score(tmp_path: Path) -> None:
    def r(i: int, status: str) -> mutation.MutantResult:
        return mutation.MutantResult(
            f"lorainv/impl/x.py:AddNot:{i}", "lorainv/impl/x.py", i, "AddNot", "a", "b", status
        )

    results = [r(0, "killed"), r(1, "killed (crash)"), r(2, "survived"), r(3, "survived"), r(4, "timed out")]
    results.append(r(5, "not reached"))
    md = tmp_path / "RESULTS.md"
    md.write_text(
        "| id | where | status | mutation | verdict |\n|---|---|---|---|---|\n"
        "| `lorainv/impl/x.py:AddNot:2` | x.py:2 | survived | `a` → `b` | equivalent: a no-op twice |\n"
        "| `lorainv/impl/x.py:AddNot:3` | x.py:3 | survived | `a` → `b` | missing check: y |\n"
        "| `lorainv/impl/x.py:AddNot:4` | x.py:4 | timed out | `a` → `b` |  |\n"
    )
    verdicts = mutation.load_verdicts(md)
    assert verdicts == {
        "lorainv/impl/x.py:AddNot:2": "equivalent: a no-op twice",
        "lorainv/impl/x.py:AddNot:3": "missing check: y",
    }
    sc = mutation.score(results, verdicts)
    assert (sc["killed"], sc["killed (crash)"], sc["survived"], sc["timed out"], sc["not reached"]) == (1, 1, 2, 1, 1)
    assert sc["run"] == 5 and sc["equivalent"] == 1
    assert sc["score"] == pytest.approx(2 / 4)  # 2 killed over 5 run minus 1 equivalent
    assert sc["score_with_unreached"] == pytest.approx(2 / 5)
    assert sc["without_verdict"] == ["lorainv/impl/x.py:AddNot:4", "lorainv/impl/x.py:AddNot:5"]
    js = tmp_path / "v.json"
    js.write_text(json.dumps({"lorainv/impl/x.py:AddNot:3": "equivalent: z"}))
    assert mutation.score(results, mutation.load_verdicts(js))["score"] == pytest.approx(2 / 4)
    table = mutation.survivors_markdown(results, verdicts)
    assert table.count("\n") == 2 + 4 - 1  # header, rule, and the 4 not-killed mutants
    assert mutation.parse_verdicts(table) == verdicts


def test_end_to_end_kill_and_not_reached(tmp_path: Path) -> None:
    killable = point_at("lorainv/impl/kv_pool.py", "core/ReplaceFalseWithTrue", "self._free[pages] = False")
    cuda = point_at("lorainv/impl/device.py", "core/ReplaceTrueWithFalse", "non_blocking=True")
    only = f"{killable.id},{cuda.id}"
    out = tmp_path / "out"
    argv = ["--quick", "--max-examples", "10", "--jobs", "1", "--only", only, "--out", str(out), "--run-unreached"]
    assert mutation.main(argv) == 0
    doc = json.loads((out / "mutation.json").read_text())
    assert doc["benchmark"] == "mutation" and doc["quick"] is True and doc["tool"]["name"] == "cosmic-ray"
    assert doc["baseline"]["fast"]["outcome"] == "clean"
    got = {r["id"]: r for r in doc["results"]}
    assert got[killable.id]["status"] == "killed" and got[killable.id]["killed_by"] == "fast"
    assert got[killable.id]["detail"]  # the violation message
    assert got[cuda.id]["status"] == "not reached", got[cuda.id]
    assert "clean" in got[cuda.id]["detail"] and doc["unreached_refuted"] == []
    assert doc["counts"]["score"] == 1.0 and doc["counts"]["score_with_unreached"] == 0.5
    assert doc["timing"]["all_run"]["n"] == 2 and doc["timing"]["all_run"]["median_s"] > 0
    # verdicts filled in later re-score the saved run without running anything
    (v := tmp_path / "verdicts.txt").write_text(f"{cuda.id} equivalent: non_blocking only matters on a GPU\n")
    again = tmp_path / "again"
    assert mutation.main(["--rescore", str(out / "mutation.json"), "--verdicts", str(v), "--out", str(again)]) == 0
    redo = json.loads((again / "mutation.json").read_text())
    assert redo["counts"]["equivalent_incl_unreached"] == 1 and redo["counts"]["score_with_unreached"] == 1.0
    assert redo["results"] == doc["results"] and redo["machine"] == doc["machine"]


def test_outcome_helpers(tmp_path: Path) -> None:
    """An import-time death is told from a crash while fuzzing; --no-shrink is passed only when asked."""
    at_import = 'Traceback (most recent call last):\n  File "/c/lorainv/cli.py", line 9, in cmd_fuzz\n'
    at_import += "  File \"/c/lorainv/impl/engine.py\", line 3, in <module>\nNameError: name 'x' is not defined\n"
    assert mutation.died_at_import(at_import)
    assert mutation.died_at_import('  File "/c/lorainv/impl/kv_pool.py", line 4\n    x = = 1\nSyntaxError: bad\n')
    assert not mutation.died_at_import(
        '  File "/c/lorainv/testing/campaign.py", line 9, in run_campaign\nKeyError: 1\n'
    )
    s = mutation.Settings(fast_examples=7, numeric_examples=2, fuzz_seed=0, timeout_s=None)
    cmd = mutation.fuzz_cmd("numeric", s, tmp_path / "r.json")
    assert cmd[1:5] == ["-m", "lorainv.cli", "fuzz", "--numeric"] and "2" in cmd and "--no-shrink" not in cmd
    s.no_shrink = True
    assert "--no-shrink" in mutation.fuzz_cmd("fast", s, tmp_path / "r.json")


def test_resume_reuses_finished_mutants(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupted run's progress file is reused for the same mutant, file text and budgets."""
    pt = point_at("lorainv/impl/kv_pool.py", "core/ReplaceFalseWithTrue", "self._free[pages] = False")
    s = mutation.Settings(fast_examples=30, numeric_examples=3, fuzz_seed=0, timeout_s=None)
    s.no_shrink = mutation.cli_has_no_shrink(ROOT)  # as main() decides it for this checkout
    src = (ROOT / pt.path).read_text()
    done = mutation.MutantResult(pt.id, pt.path, pt.line, "ReplaceFalseWithTrue", "a", "b", "killed", "fast", "v", "")
    out = tmp_path / "out"
    out.mkdir()
    line = {"key": mutation.progress_key(pt, src, s), "result": mutation.asdict(done)}
    (out / mutation.PROGRESS).write_text(json.dumps(line) + "\n{torn")
    assert mutation.read_progress(out / mutation.PROGRESS) == {line["key"]: line["result"]}
    assert mutation.progress_key(pt, src + "#", s) != line["key"]

    def clean(*a: object, **k: object) -> dict[str, object]:
        return {"mode": "fast", "outcome": "clean", "seconds": 1.0, "ops": 10}

    def never(*a: object, **k: object) -> None:
        raise AssertionError("a finished mutant was run again")

    monkeypatch.setattr(mutation, "run_fuzz", clean)
    monkeypatch.setattr(mutation, "judge", never)
    assert mutation.main(["--quick", "--no-reach", "--resume", "--only", pt.id, "--out", str(out)]) == 0
    doc = json.loads((out / "mutation.json").read_text())
    assert [(r["id"], r["status"], r["detail"]) for r in doc["results"]] == [(pt.id, "killed", "v")]
    assert not (out / mutation.PROGRESS).exists()  # a finished run leaves no progress file


def test_update_needs_only() -> None:
    with pytest.raises(SystemExit) as e:
        mutation.main(["--update", "old.json"])
    assert e.value.code == 2
