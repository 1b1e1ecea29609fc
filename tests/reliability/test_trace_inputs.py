"""Hostile trace files for ``lorainv replay``, and a scan of the source tree for unsafe loading.

* A malformed trace (bad JSON, wrong format version, unknown op, missing or mistyped field,
  oversize, non-UTF-8, a directory or a FIFO instead of a file ...) is a `TraceError` naming
  the field, and ``lorainv replay`` exits 2 (in process and through the console script).
* A well-formed trace whose ops reference unknown ids is replayed exactly as the engine
  applies those ops: ``Rejected`` events with the engine's own error names; exit 0.
* Paths in a trace are data: a ``LoadAdapter`` source is only ever read (never written,
  never executed); hostile sources are refused with an `AdapterError` and touch nothing.
* No code path in ``lorainv/`` unpickles or evaluates: no pickle-family import, no bare
  ``eval``/``exec``, every ``torch.load`` passes ``weights_only=True``.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from reliability_util import no_hang

import lorainv
import lorainv.trace as trace_mod
from lorainv.cli import main
from lorainv.config import RuntimeConfig
from lorainv.errors import TraceError
from lorainv.events import Rejected
from lorainv.impl.adapters import write_peft_adapter
from lorainv.impl.dummy_net import DummyNetwork
from lorainv.impl.engine import Engine
from lorainv.ops import (
    Abort,
    AddRequest,
    AdvanceClock,
    CloseSession,
    CompleteTransfers,
    LoadAdapter,
    Op,
    OpenSession,
    PinAdapter,
    Step,
    UnloadAdapter,
)
from lorainv.trace import Trace, load, replay

LORAINV_BIN = Path(sys.executable).parent / "lorainv"  # the console script of this environment
CFG = RuntimeConfig(network="dummy", strict_mem_check=2, max_loras_per_batch=2)


def base_trace(ops: list[Op] | None = None) -> dict[str, Any]:
    ops = ops if ops is not None else [AddRequest("r1", (1, 2, 3), None, 2), Step(), Step()]
    return Trace(CFG, tuple(ops)).to_dict()


def write(path: Path, data: Any) -> Path:
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(json.dumps(data))
    return path


def replay_cli(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with no_hang(60):
        rc = main(["replay", str(path)])
    out, err = capsys.readouterr()
    return rc, out, err


def edit(**top: Any) -> dict[str, Any]:
    d = base_trace()
    d.update(top)
    return d


def with_op(raw: dict[str, Any]) -> dict[str, Any]:
    d = base_trace()
    d["ops"].insert(1, raw)
    return d


def with_config(**changes: Any) -> dict[str, Any]:
    d = base_trace()
    d["config"].update(changes)
    return d


MALFORMED: list[tuple[str, Any, list[str]]] = [
    ("truncated-json", b'{"format": 1, "ops": [', ["not valid JSON", "line 1"]),
    ("empty-file", b"", ["not valid JSON"]),
    ("not-an-object", [1, 2], ["trace must be a JSON object", "list"]),
    ("format-2", edit(format=2), ["format 2 is not supported"]),
    ("format-true", edit(format=True), ["format True is not supported"]),
    ("format-string", edit(format="1"), ["format '1' is not supported"]),
    ("missing-ops", {k: v for k, v in base_trace().items() if k != "ops"}, ["missing field 'ops'"]),
    ("missing-config", {k: v for k, v in base_trace().items() if k != "config"}, ["missing field 'config'"]),
    ("unknown-top-field", edit(bogus=1), ["unknown field(s) ['bogus']"]),
    ("ops-not-list", edit(ops={"op": "Step"}), ["trace.ops must be a list"]),
    ("seed-string", edit(seed="0"), ["trace.seed must be an int"]),
    ("numeric-int", edit(numeric=1), ["trace.numeric must be a bool"]),
    ("expect-list", edit(expect=["kv"]), ["trace.expect"]),
    ("unknown-op", with_op({"op": "Frobnicate"}), ["trace.ops[1]", "unknown op 'Frobnicate'"]),
    ("op-not-object", with_op(["Step"]), ["trace.ops[1]", "must be an object"]),
    ("op-kind-not-string", with_op({"op": 7}), ["trace.ops[1]", "unknown op 7"]),
    ("missing-rid", with_op({"op": "Abort"}), ["trace.ops[1]", "Abort: missing field 'rid'"]),
    ("extra-op-field", with_op({"op": "Step", "n": 1}), ["trace.ops[1]", "Step: unknown field(s) ['n']"]),
    ("prompt-string", with_op({"op": "AddRequest", "rid": "x", "prompt": "abc"}), ["AddRequest.prompt"]),
    ("prompt-float", with_op({"op": "AddRequest", "rid": "x", "prompt": [1, 2.5]}), ["AddRequest.prompt[1]"]),
    ("prompt-bool", with_op({"op": "AddRequest", "rid": "x", "prompt": [True]}), ["AddRequest.prompt[0]"]),
    (
        "max-new-float",
        with_op({"op": "AddRequest", "rid": "x", "prompt": [1], "max_new_tokens": 2.0}),
        ["AddRequest.max_new_tokens"],
    ),
    ("rid-int", with_op({"op": "Abort", "rid": 3}), ["Abort.rid", "expected a string"]),
    ("pinned-string", with_op({"op": "LoadAdapter", "name": "a", "source": "gen:2:1", "pinned": "yes"}), ["pinned"]),
    ("dt-string", with_op({"op": "AdvanceClock", "dt": "1"}), ["AdvanceClock.dt"]),
    ("config-type", with_config(max_total_tokens="64"), ["trace.config", "max_total_tokens must be an int"]),
    ("config-range", with_config(page_size=0), ["trace.config", "page_size=0 is out of range"]),
    ("config-unknown", with_config(turbo=True), ["trace.config", "unknown field(s) ['turbo']"]),
    ("config-fault-unknown", with_config(faults=["nope"]), ["trace.config", "unknown fault(s) ['nope']"]),
    ("config-faults-nested", with_config(faults=[["x"]]), ["trace.config", "faults must be a list of fault names"]),
    ("config-network", with_config(network="/bin/sh"), ["trace.config", "network='/bin/sh' is not allowed"]),
    ("non-utf8", b'{"format": 1, "meta": "\xff\xfe", "ops": []}', ["cannot read trace", "utf-8"]),
    ("nested-too-deep", b"[" * 100_000, ["not valid JSON"]),
    ("int-too-long", b'{"format": ' + b"1" * 5000 + b"}", ["not valid JSON"]),
]


@pytest.mark.parametrize(("data", "needles"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_trace_is_a_trace_error_exit_2(
    data: Any, needles: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "t.json", data)
    with pytest.raises(TraceError) as info:
        load(path)
    for n in needles:
        assert n in str(info.value), f"{n!r} not in {info.value}"
    rc, out, err = replay_cli(path, capsys)
    assert rc == 2
    assert err.startswith("lorainv replay: TraceError: ") and needles[-1] in err, err
    assert "replaying" not in out  # refused before anything ran


def test_oversize_trace_refused_unread(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # the real limit, with a sparse file (no disk used): refused from its size alone
    sparse = tmp_path / "huge.json"
    with open(sparse, "wb") as f:
        f.truncate(trace_mod.MAX_TRACE_BYTES + 1)
    rc, _, err = replay_cli(sparse, capsys)
    assert rc == 2 and f"{trace_mod.MAX_TRACE_BYTES + 1} bytes; at most {trace_mod.MAX_TRACE_BYTES}" in err
    # a lowered limit: a valid trace just over it is refused, the same trace under it replays
    path = write(tmp_path / "t.json", base_trace())
    size = path.stat().st_size
    monkeypatch.setattr(trace_mod, "MAX_TRACE_BYTES", size - 1)
    rc, _, err = replay_cli(path, capsys)
    assert rc == 2 and f"{size} bytes; at most {size - 1}" in err
    monkeypatch.setattr(trace_mod, "MAX_TRACE_BYTES", size)
    rc, out, _ = replay_cli(path, capsys)
    assert rc == 0 and "clean: 3 ops" in out


def test_too_many_ops_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trace_mod, "MAX_OPS", 2)
    rc, _, err = replay_cli(write(tmp_path / "t.json", base_trace()), capsys)
    assert rc == 2 and "trace.ops has 3 ops; at most 2" in err


@pytest.mark.parametrize("kind", ["directory", "missing", "fifo", "dev-zero", "nul-byte"])
def test_not_a_readable_trace_file(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.json"
    needle = "not a regular file"
    if kind == "directory":
        path.mkdir()
    elif kind == "missing":
        needle = "No such file or directory"
    elif kind == "fifo":
        os.mkfifo(path)  # a plain open() would wait for a writer forever
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")  # stat size 0, but an endless read
    else:
        path = Path(str(path) + "\x00.json")
        needle = "null byte"
    rc, out, err = replay_cli(path, capsys)
    assert rc == 2 and "TraceError" in err and needle in err, err
    assert out == ""


def test_console_script_exit_code_on_bad_trace(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.json", with_op({"op": "AddRequest", "rid": "x", "prompt": [1, "two"]}))
    res = subprocess.run([str(LORAINV_BIN), "replay", str(path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res
    assert "TraceError: trace.ops[1]: AddRequest.prompt[1]: expected an int" in res.stderr
    assert "Traceback" not in res.stderr


# -- well-formed traces with unknown ids: applied exactly as the engine would -----------------
UNKNOWN_IDS: list[tuple[Op, str | None]] = [
    (Abort("ghost"), "RequestError"),
    (AddRequest("r1", (1, 2), "ghost", 2), "RequestError"),
    (CloseSession("nosuch"), "RequestError"),
    (UnloadAdapter("ghost"), "AdapterNotFoundError"),
    (PinAdapter("ghost"), "AdapterNotFoundError"),
    (LoadAdapter("x", "/etc/passwd"), "AdapterNotFoundError"),
    (AdvanceClock(math.nan), "RequestError"),
    (OpenSession("s"), None),
    (AddRequest("r2", (1, 2, 3), None, 2, "s"), None),
    (AddRequest("r2", (4,), None, 2), "RequestError"),  # rid already used
    (AddRequest("r3", (4,), None, 2, "s"), "RequestError"),  # session already has a live turn
    (Step(), None),
    (Step(), None),
    (Step(), None),
    (Abort("r2"), "RequestError"),  # already finished
    (CompleteTransfers(5), None),  # more than pending: fine
    (CloseSession("s"), None),
    (CloseSession("s"), "RequestError"),
]


def test_unknown_ids_replay_as_the_engine_applies_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ops = [op for op, _ in UNKNOWN_IDS]
    path = write(tmp_path / "t.json", base_trace(ops))
    res = replay(load(path))
    assert res.ok and res.failed_at is None, res.violations
    direct = Engine(CFG)
    for i, (op, error) in enumerate(UNKNOWN_IDS):
        events = res.records[i].events
        assert events == direct.apply(op), (i, op)  # exactly what the engine reports
        rejected = [e for e in events if isinstance(e, Rejected)]
        if error is None:
            assert rejected == [], (op, events)
        else:
            assert len(events) == 1 and rejected[0].op == op.kind and rejected[0].error == error, (op, events)
    rc, out, err = replay_cli(path, capsys)
    assert rc == 0 and err == ""
    assert f"clean: {len(ops)} ops, no violation" in out
    assert "Rejected(op=Abort, error=RequestError, message=unknown request id 'ghost')" in out
    assert "Rejected(op=UnloadAdapter, error=AdapterNotFoundError" in out


# -- paths in traces are only read ------------------------------------------------------------
def listing(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every entry under ``root``: (mode, mtime_ns, sha256 of files)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else ""
            out[str(p.relative_to(root))] = (st.st_mode, st.st_mtime_ns, digest)
    return out


def test_trace_paths_are_only_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hostile ``LoadAdapter`` sources (system files, traversal, shell syntax, devices, a plain
    directory) are refused with an `AdapterError`; nothing is written or executed. The listing
    compared is the replay's working directory under ``tmp_path`` (where every relative path
    and the shell payloads point), not all of /tmp, which other processes may change."""
    work = tmp_path / "work"
    victim = work / "victim"
    victim.mkdir(parents=True)
    (victim / "notes.txt").write_text("keep me")
    good = write_peft_adapter(work / "good", DummyNetwork.dims, rank=2, seed=1)
    pwned = work / "pwned"
    hostile = [
        "/etc/passwd",
        "/etc",
        "/nonexistent/adapter",
        "../../../../../../etc/shadow",
        str(victim),
        str(victim / "notes.txt"),
        f"$(touch {pwned})",
        f"`touch {pwned}`",
        f"x; touch {pwned}",
        f"gen:2:1; touch {pwned}",
        "/dev/zero",
        "/proc/self/mem",
    ]
    ops: list[Op] = [LoadAdapter(f"h{i}", src) for i, src in enumerate(hostile)]
    ops += [LoadAdapter("good", str(good)), AddRequest("r", (1, 2), "good", 2), Step(), Step(), Step()]
    path = write(tmp_path / "t.json", base_trace(ops))
    passwd = hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()
    monkeypatch.chdir(work)  # relative paths resolve here; any stray write would show up
    before = listing(work)
    res = replay(load(path))
    rc, out, _ = replay_cli(path, capsys)
    assert listing(work) == before
    assert not pwned.exists()
    assert hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest() == passwd
    assert res.ok and rc == 0 and "clean" in out
    for i in range(len(hostile)):
        (ev,) = res.records[i].events
        assert isinstance(ev, Rejected) and ev.op == "LoadAdapter", ev
        assert ev.error.startswith("Adapter") and ev.error.endswith("Error"), ev
    assert res.records[len(hostile)].events[0].kind == "AdapterRegistered"  # the real one is read


def test_console_script_replays_clean_trace(tmp_path: Path) -> None:
    path = write(tmp_path / "t.json", base_trace([op for op, _ in UNKNOWN_IDS]))
    res = subprocess.run([str(LORAINV_BIN), "replay", str(path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "Rejected(op=CloseSession, error=RequestError" in res.stdout and "clean:" in res.stdout


# -- nothing in lorainv/ unpickles or evaluates ----------------------------------------------
TORCH_LOAD = re.compile(r"(?<![\w.])torch\.load\(")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


def unsafe_calls(source: str, filename: str) -> list[str]:
    """Pickle-family imports, bare ``eval``/``exec``/``__import__`` calls, ``torch.load`` without
    ``weights_only=True`` and ``numpy.load(allow_pickle=True)`` in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            f = node.func
            kw = {k.arg: k.value for k in node.keywords}
            if isinstance(f, ast.Name) and f.id in ("eval", "exec", "__import__"):
                found.append(f"{where}: {f.id}(...)")
            elif isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Name):
                if f.value.id == "torch":
                    w = kw.get("weights_only")
                    if not (isinstance(w, ast.Constant) and w.value is True):
                        found.append(f"{where}: torch.load without weights_only=True")
                if f.value.id in ("np", "numpy"):
                    a = kw.get("allow_pickle")
                    if a is not None and not (isinstance(a, ast.Constant) and a.value is False):
                        found.append(f"{where}: numpy.load(allow_pickle=...)")
    return found


def test_scanner_flags_each_unsafe_form() -> None:
    bad = """
import pickle
from dill import loads
import numpy as np, torch
torch.load(f)
torch.load(f, weights_only=False)
np.load(f, allow_pickle=True)
eval("1")
exec("x = 1")
"""
    hits = unsafe_calls(bad, "bad.py")
    assert len(hits) == 7, hits
    assert unsafe_calls("import torch\ntorch.load(f, weights_only=True)\nmodel.eval()\n", "ok.py") == []


def test_no_pickle_eval_or_unsafe_load_in_lorainv() -> None:
    root = Path(lorainv.__file__).parent
    files = sorted(root.rglob("*.py"))
    assert len(files) > 30
    hits = [h for f in files for h in unsafe_calls(f.read_text(), str(f.relative_to(root)))]
    assert hits == []
    # the documented torch.loads are the weights_only=True fallbacks for adapter_model.bin: the
    # engine's loader and the numeric oracle's own reader
    text_hits = [(f.name, ln.strip()) for f in files for ln in f.read_text().splitlines() if TORCH_LOAD.search(ln)]
    assert sorted(text_hits) == [
        ("adapters.py", 'obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)'),
        ("numeric_oracle.py", 'tensors = torch.load(bin_file, map_location="cpu", weights_only=True)'),
    ]
    # and "pickle" appears only in prose (docstrings, comments, messages), never as code
    for f in files:
        for ln in f.read_text().splitlines():
            if "pickle" in ln.lower():
                assert re.search(r"(never |un)pickl|survives copy and pickle", ln, re.I), f"{f.name}: {ln.strip()}"
