"""``lorainv fuzz --workers N`` (issue 17 §1, §2): worker processes with their own seed streams
share one example database and one trace directory; the merged report adds up the shards; a
planted fault is found, one shrunk trace is saved in the driver's trace directory, and the next
run replays it from the database before generating anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorainv.cli import main

pytestmark = pytest.mark.slow  # ordered ahead of the rest (tests/conftest.py)

FAULT = "stale_overlap_event"  # found within a few dozen fast examples


def run_fuzz(backend: list[str], tmp_path: Path, name: str, *args: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    report = tmp_path / f"{name}.json"
    rc = main(["fuzz", *backend, "--fast", "--seed", "0", "--quiet", "--json", str(report), *args])
    return rc, json.loads(report.read_text())


def check_planted_fault_then_replay(
    backend: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shrink: bool = True
) -> None:
    """The shared body of the process and Ray tests (``shrink=False``: save the failure as found,
    which is faster; shrinking runs the same shard code on every backend)."""
    traces = tmp_path / "traces"
    monkeypatch.setenv("LORAINV_TRACE_DIR", str(traces))
    monkeypatch.delenv("LORAINV_FAULTS", raising=False)
    args = ["--faults", FAULT, "--max-examples", "400", "--stop-on-first", "--db", str(tmp_path / "db")]
    args += [] if shrink else ["--no-shrink"]
    rc, first = run_fuzz(backend, tmp_path, "first", *args)
    assert rc == 1 and first["workers"] == 2 and len(first["shards"]) == 2
    assert first["examples"] == sum(s["examples"] for s in first["shards"]) > 0
    assert first["states"] >= max(s["states"] for s in first["shards"])
    kept = first["failures"][0]
    assert kept["shrunk"] == shrink and kept["first"] and kept["phase"] == "generate" and kept["fault"] == FAULT
    saved = sorted(traces.iterdir())
    assert [Path(f["trace"]) for f in [first]] == [traces / kept["trace_file"]]
    assert len(saved) == len(first["failures"]) and (traces / kept["trace_file"]).is_file()
    trace = json.loads((traces / kept["trace_file"]).read_text())
    assert (
        trace["expect"] == {"pool": kept["pool"], "invariant": kept["invariant"]}
        and len(trace["ops"]) == kept["trace_ops"]
    )

    rc, second = run_fuzz(backend, tmp_path, "second", *args)
    assert rc == 1
    again = second["failures"][0]
    assert (again["phase"], again["examples_before"]) == ("replay", 0), second["failures"]
    assert (again["pool"], again["invariant"]) == (kept["pool"], kept["invariant"])


def test_workers_find_a_planted_fault_and_the_next_run_replays_it_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_planted_fault_then_replay(["--workers", "2"], tmp_path, monkeypatch)


def test_workers_clean_run_merges_every_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAINV_TRACE_DIR", str(tmp_path / "traces"))
    rc, rep = run_fuzz(["--workers", "2"], tmp_path, "clean", "--max-examples", "6", "--db", "none")
    assert rc == 0 and rep["violations"] == 0 and rep["backend"] == "processes"
    # each shard runs its half of the budget (Hypothesis may run an example or two more)
    assert all(s["examples"] >= 3 for s in rep["shards"]) and rep["examples"] == sum(
        s["examples"] for s in rep["shards"]
    )
    assert sum(r["examples"] for r in rep["rounds"]) == rep["examples"] and {r["shard"] for r in rep["rounds"]} == {
        0,
        1,
    }
    assert rep["coverage"]["events"]["Queued"] > 0
    assert not (tmp_path / "traces").exists() or not list((tmp_path / "traces").iterdir())


@pytest.mark.slow
def test_fuzz_scaling_bench_quick(tmp_path: Path) -> None:
    """bench/fuzz_scaling.py --quick runs and reports sane numbers (not asserted beyond sanity:
    this is a shared machine)."""
    import importlib

    module = importlib.import_module("lorainv_bench.fuzz_scaling")
    argv = ["--quick", "--out", str(tmp_path), "--workers", "1", "--ray", "off", "--seconds", "3"]
    assert module.main([*argv, "--faults", "stale_overlap_event", "--limit", "30"]) == 0
    doc = json.loads((tmp_path / "fuzz_scaling.json").read_text())
    assert doc["benchmark"] == "fuzz_scaling" and doc["quick"] is True and doc["cores"] >= 1
    [run] = doc["throughput"]
    assert run["workers"] == 1 and run["ops"] > 0 and run["speedup_ops_per_s"] == 1.0
    [hunt] = doc["time_to_failure"]
    assert hunt["found"] and hunt["ttf_s"] > 0 and hunt["violation"]


CAP_CHECKER = """
from lorainv.checkers import register
from lorainv.errors import Violation


@register("hdcap_kv_cap")
class KvCap:
    def check(self, snap):
        full = [r for r in snap.requests if r.kv_len >= 9]
        return [Violation("hdcap", "U1", f"{r.rid} holds {r.kv_len} tokens", (r.rid,)) for r in full]
"""


def test_user_checkers_are_in_force_in_every_worker_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--checkers MODULE`` reaches the worker processes (the driver itself checks nothing):
    a user checker that flags any request holding 9 tokens of KV is what the workers report."""
    (tmp_path / "hdcap_ext.py").write_text(CAP_CHECKER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("LORAINV_TRACE_DIR", str(tmp_path / "traces"))
    args = ["--checkers", "hdcap_ext", "--max-examples", "60", "--stop-on-first", "--no-shrink", "--db", "none"]
    rc, rep = run_fuzz(["--workers", "2"], tmp_path, "cap", *args)
    assert rc == 1 and rep["backend"] == "processes"
    assert {(f["pool"], f["invariant"]) for f in rep["failures"]} == {("hdcap", "U1")}, rep["failures"]


def test_only_the_first_failure_is_shrunk_while_the_workers_keep_exploring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --stop-on-first both workers keep hunting after the first failure and find the
    planted fault again and again; exactly one of all those failures was shrunk, the first."""
    from lorainv.testing.fuzzrun import plan_shards
    from lorainv.testing.workers import run_processes

    monkeypatch.setenv("LORAINV_TRACE_DIR", str(tmp_path / "traces"))
    specs = plan_shards(
        workers=2, seed=0, modes=["fast"], faults=frozenset({FAULT}), strict=0, policy=None, max_examples=60,
        deadline=None, shrink=True, stop_on_first=False, db="none", checkers=[],
    )  # fmt: skip
    reports, interrupted = run_processes(specs, lambda msg: None)
    failures = [f for r in reports for f in r.failures]
    assert not interrupted and {r.shard for r in reports if r.failures} == {0, 1} and len(failures) > 2
    assert [(f.first, f.shrunk) for f in failures if f.first or f.shrunk] == [(True, True)]
