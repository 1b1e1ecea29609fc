"""The ``lorainv`` command line: in process through ``lorainv.cli.main`` (with capsys) and, for
the end-to-end paths, as the installed ``lorainv`` script in a subprocess.

Exit codes: 0 clean, 1 a violation was found, 2 a usage error or an invalid input file.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lorainv.cli import main
from lorainv.config import RuntimeConfig
from lorainv.events import EVENTS
from lorainv.impl.faults import FAULTS
from lorainv.ops import OPS, AddRequest, LoadAdapter, Step
from lorainv.testing.machine import RARE_STATES
from lorainv.trace import Trace, save

# a generate request: "r0   gen1  prompt 'hello'" then "           output \"...\"  ids [1, 2]"
ROW = re.compile(r"^(r\d+)\s+(\S+)\s+prompt (.*)\n\s+output \"(.*)\"  ids (\[[\d, ]*\])$", re.MULTILINE)
REPLAY_WITH = re.compile(r"replay with:\s+lorainv replay (\S+)")
SUBCOMMANDS = ("generate", "fuzz", "replay", "gate", "bench")


def lorainv_cmd() -> list[str]:
    """The installed console script next to this interpreter, else ``python -m lorainv.cli``."""
    script = Path(sys.executable).with_name("lorainv")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lorainv.cli"]


def run_cli(args: list[str], cwd: Path, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, LORAINV_TRACE_DIR=str(cwd / "traces"))
    for var in ("LORAINV_FAULTS", "LORAINV_STRICT_MEM_CHECK"):
        env.pop(var, None)
    return subprocess.run(
        [*lorainv_cmd(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def rows(text: str) -> list[tuple[str, str, str, str, list[int]]]:
    """The requests ``generate`` printed: (rid, adapter, prompt, output text, output ids)."""
    return [(m[0], m[1], m[2], m[3], ast.literal_eval(m[4])) for m in ROW.findall(text)]


# -- help, version, usage ------------------------------------------------------------------------
def test_help_in_a_subprocess(tmp_path: Path) -> None:
    res = run_cli(["--help"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: lorainv")
    for cmd in SUBCOMMANDS:
        assert cmd in res.stdout


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_subcommand_help(capsys: pytest.CaptureFixture[str], cmd: str) -> None:
    with pytest.raises(SystemExit) as info:
        main([cmd, "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: lorainv {cmd}")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from lorainv import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lorainv {__version__}"


@pytest.mark.parametrize("argv", [[], ["serve"], ["generate", "--max-new-tokens", "x"], ["fuzz", "--strict", "3"]])
def test_argparse_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: lorainv" in capsys.readouterr().err


# -- help shows defaults; importing the CLI imports no torch --------------------------------------
@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_subcommand_help_shows_defaults_without_noise(capsys: pytest.CaptureFixture[str], cmd: str) -> None:
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text
    if cmd == "generate":
        assert "tokens to generate per prompt (default: 8)" in text
        assert "LoRA kernels (default: torch_native)" in text


def test_importing_the_cli_and_listing_faults_import_no_torch(tmp_path: Path) -> None:
    """``--help`` and ``--list-faults`` are instant because nothing imports torch (about 2-8 s)."""
    code = (
        "import sys, io\n"
        "import lorainv.cli\n"
        "heavy = ('torch', 'triton', 'transformers', 'peft')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
        "assert lorainv.cli.main(['fuzz', '--list-faults'], out=io.StringIO()) == 0\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LORAINV_FAULTS"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:2] == ["[]", "[]"]


# -- generate ------------------------------------------------------------------------------------
def test_decode_maps_ids_back_to_bytes_then_text() -> None:
    from lorainv.cli.generate import decode

    assert decode([104, 105]) == "hi"
    assert decode([0xE2, 0x82, 0xAC]) == "\u20ac"  # the euro sign's three UTF-8 bytes
    assert decode([0xFF]) == "\ufffd"  # not UTF-8
    assert decode([104, 300, 105]) == "h\ufffdi"  # an id outside the byte range
    assert decode([10, 27]) == "\\n\\x1b"  # control characters are shown escaped, never emitted


def test_generate_default_demo_sends_each_prompt_to_two_adapters(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate"]) == 0
    out = capsys.readouterr().out
    table = rows(out)
    assert [r[0] for r in table] == [f"r{i}" for i in range(8)]
    assert {r[1] for r in table} == {"base", "gen0", "gen1", "gen2"}
    by_prompt: dict[str, set[str]] = {}
    for _, adapter, prompt, _, ids in table:
        by_prompt.setdefault(prompt, set()).add(adapter)
        assert len(ids) == 8 and all(0 <= t < 256 for t in ids)
    assert set(by_prompt) == {"'The adapter said'", "'Multi-LoRA serving'", "'KV cache pressure'", "'hello'"}
    assert all(len(adapters) == 2 for adapters in by_prompt.values())
    assert "8 requests, 64 tokens" in out and "invariants: clean" in out


def test_generate_serves_each_prompt_on_the_adapter_it_names(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "--prompt", "gen1:hi: there", "--prompt", "base:hi: there", "--prompt-ids", "gen2:1,2,3"]
    assert main([*argv, "--max-new-tokens", "4"]) == 0
    table = rows(capsys.readouterr().out)
    assert [(r[0], r[1], r[2]) for r in table] == [
        ("r0", "gen1", "'hi: there'"),  # only the first colon separates the adapter
        ("r1", "base", "'hi: there'"),
        ("r2", "gen2", "ids [1, 2, 3]"),
    ]
    # the same requests served by an engine directly, each alone, with the CLI's config and adapters
    from lorainv.impl.engine import Engine

    engine = Engine(RuntimeConfig(device="cpu", max_total_tokens=4096))
    for i, rank in enumerate((8, 4, 16)):
        engine.load_adapter(f"gen{i}", f"gen:{rank}:{i + 1}")
    hi = list(b"hi: there")
    for (_, _, _, text, ids), (prompt, adapter) in zip(table, [(hi, "gen1"), (hi, None), ([1, 2, 3], "gen2")]):
        assert engine.generate([prompt], [adapter], max_new_tokens=4) == [ids]
        if all(32 <= t < 127 for t in ids):  # printable ASCII reads back as itself
            assert text == bytes(ids).decode()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prompt", "hello"], "--prompt expects ADAPTER:..., with ADAPTER one of base, gen0, gen1, gen2"),
        (["--prompt", "note: x"], "got 'note: x'"),
        (["--prompt", "gen0:"], "the text is empty"),
        (["--prompt-ids", "gen0:1,x"], "expected comma-separated integers"),
        (["--adapter", "base=/tmp"], "'base' names the base model"),
    ],
)
def test_generate_bad_prompt_spec_exits_2(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert main(["generate", *argv]) == 2
    assert message in capsys.readouterr().err


def test_generate_triton_without_gpu_or_interpreter_names_the_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    if torch.cuda.is_available():  # pragma: no cover - a GPU runs the kernels; nothing to refuse
        pytest.skip("a CUDA GPU is present")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["generate", "--backend", "triton"]) == 2
    err = capsys.readouterr().err
    assert "TRITON_INTERPRET=1" in err and "Traceback" not in err


@pytest.mark.parametrize("spec", ["bad", "=dir", "name=", "="])
def test_generate_adapter_without_name_and_dir_exits_2(capsys: pytest.CaptureFixture[str], spec: str) -> None:
    assert main(["generate", "--adapter", spec]) == 2
    err = capsys.readouterr().err
    assert "--adapter expects NAME=DIR" in err and repr(spec) in err


def test_generate_adapter_dir_missing_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["generate", "--adapter", f"x={tmp_path / 'absent'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorainv generate: Adapter") and "absent" in err


# -- fuzz ----------------------------------------------------------------------------------------
def test_fuzz_list_faults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fuzz", "--list-faults"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(FAULTS) == 12 and len(lines) == 12
    for line, (name, desc) in zip(lines, FAULTS.items()):
        assert line.split()[0] == name
        assert line.endswith("  " + desc)


@pytest.mark.parametrize("faults", ["nope", "stale_overlap_event,nope"])
def test_fuzz_unknown_fault_exits_2(capsys: pytest.CaptureFixture[str], faults: str) -> None:
    assert main(["fuzz", "--faults", faults, "--max-examples", "1"]) == 2
    err = capsys.readouterr().err
    assert "unknown fault(s) ['nope']" in err and "--list-faults" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-examples", "0"], "--max-examples must be >= 1"),
        (["--max-examples", "-3"], "--max-examples must be >= 1"),
        (["--minutes", "0"], "--minutes must be a finite number > 0"),
        (["--minutes", "inf"], "--minutes must be a finite number > 0"),
        (["--minutes", "nan"], "--minutes must be a finite number > 0"),
    ],
)
def test_fuzz_bad_budget_exits_2(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert main(["fuzz", *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "summary" not in captured.out  # refused before any round ran


def test_fuzz_clean_campaign_writes_a_json_report(tmp_path: Path) -> None:
    report = tmp_path / "out" / "report.json"
    res = run_cli(["fuzz", "--fast", "--max-examples", "40", "--seed", "1", "--json", str(report)], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "clean: no violation found" in res.stdout
    data = json.loads(report.read_text())
    assert data["examples"] >= 40 and data["ops"] > 0 and data["violations"] == 0
    assert data["seed"] == 1 and data["faults"] == []
    assert sum(r["examples"] for r in data["rounds"]) == data["examples"]
    assert not (tmp_path / "traces").exists() or not list((tmp_path / "traces").iterdir())
    assert data["ops_per_s"] > 0 and data["states"] > 0 and data["transitions"] > 0
    # coverage counters: machine-drawn ops by variant (setup and teardown ops are not drawn)
    cov = data["coverage"]
    variants = cov["op_variants"]
    drawn = sum(v["accepted"] + v["rejected"] for v in variants.values())
    assert 0 < drawn <= data["ops"]
    assert all(k.split(":", 1)[0] in OPS for k in variants) and set(variants) <= set(cov["known_op_variants"])
    assert variants["Step:step"]["accepted"] > 0 and variants["Step:step"]["rejected"] == 0
    assert cov["events"]["Queued"] > 0 and set(cov["missing_events"]) == set(EVENTS) - set(cov["events"])
    assert set(cov["missing_op_variants"]) == set(cov["known_op_variants"]) - set(variants)
    assert set(cov["rare"]) == set(RARE_STATES)
    printed = res.stdout[res.stdout.index("coverage") :]
    assert f"{len(variants)} of {len(cov['known_op_variants'])}" in printed
    assert f"{len(EVENTS) - len(cov['missing_events'])} of {len(EVENTS)}" in printed
    assert all(r in printed for r in RARE_STATES)


def test_fuzz_finds_a_fault_and_replay_reproduces_it(tmp_path: Path) -> None:
    args = ["fuzz", "--faults", "stale_overlap_event", "--seed", "0", "--fast", "--max-examples", "300"]
    res = run_cli(args, tmp_path, timeout=60)
    assert res.returncode == 1, res.stdout + res.stderr
    found = REPLAY_WITH.search(res.stdout)
    assert found, res.stdout
    path = Path(found.group(1))
    assert path.parent == tmp_path / "traces" and path.is_file()
    trace = json.loads(path.read_text())
    assert trace["config"]["faults"] == ["stale_overlap_event"] and trace["expect"]

    rep = run_cli(["replay", str(path)], tmp_path)
    assert rep.returncode == 1, rep.stdout + rep.stderr
    assert "FIRST VIOLATION" in rep.stdout
    assert f"[{trace['expect']['pool']}/{trace['expect']['invariant']}]" in rep.stdout


# -- replay --------------------------------------------------------------------------------------
def test_replay_clean_trace(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    ops = (LoadAdapter("a", "gen:4:1"), AddRequest("x", (1, 2, 3), "a", 2), AddRequest("y", (4, 5), None, 2), Step())
    path = save(Trace(RuntimeConfig(network="dummy", max_loras_per_batch=2), ops), tmp_path / "clean.json")
    assert main(["replay", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"clean: {len(ops)} ops, no violation" in out
    assert "FIRST VIOLATION" not in out
    assert "AdapterRegistered(name=a" in out and "Queued(rid=x" in out


def test_replay_verbose_shows_the_teardown_drain(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    ops = (AddRequest("x", (1, 2, 3), None, 3),)
    path = save(Trace(RuntimeConfig(network="dummy"), ops), tmp_path / "t.json")
    assert main(["replay", str(path)]) == 0
    quiet = capsys.readouterr().out
    assert main(["replay", "--verbose", str(path)]) == 0
    verbose = capsys.readouterr().out
    assert "   ~ Step()" not in quiet and "   ~ Step()" in verbose and "Finished(rid=x" in verbose


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        ('{"format": 1, "ops": []}', "missing field 'config'"),
        ('{"format": 99, "config": {}, "ops": []}', "format 99 is not supported"),
        ('{"format": 1, "config": {}, "ops": [{"op": "Nope"}]}', "trace.ops[0]"),
    ],
)
def test_replay_invalid_trace_exits_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    assert main(["replay", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorainv replay: TraceError:") and message in err


def test_replay_missing_file_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["replay", str(tmp_path / "absent.json")]) == 2
    assert "cannot read trace" in capsys.readouterr().err


# -- bench ---------------------------------------------------------------------------------------
def test_bench_lists_every_benchmark_with_a_description(tmp_path: Path) -> None:
    res = run_cli(["bench"], tmp_path)  # from a directory that is not the repository
    assert res.returncode == 0, res.stderr
    listed = dict(line.split(None, 1) for line in res.stdout.splitlines()[2:] if line.strip())
    repo_bench = Path(__file__).resolve().parents[2] / "bench"
    on_disk = {p.stem for p in repo_bench.glob("*.py") if "\ndef main(" in p.read_text()}
    assert set(listed) == on_disk and "detect" in listed and "common" not in listed
    assert listed["detect"].startswith("How fast the stateful fuzzer finds each historic bug")


def test_bench_nonexistent_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "no benchmark named 'nonexistent'" in err and "detect" in err


def test_bench_with_a_missing_dependency_names_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Regression: a benchmark whose own import fails was reported as "no benchmark"."""
    import lorainv.cli.bench as cli_bench

    pkg = tmp_path / "lorainv_fake_bench"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "common.py").write_text(f"def quick_dir():\n    return {str(tmp_path / 'quick')!r}\n")
    (pkg / "needsdep.py").write_text("import lorainv_no_such_dependency\n\n\ndef main(argv):\n    return 0\n")
    (pkg / "ok.py").write_text("def main(argv):\n    print('ran', argv)\n    return 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli_bench, "PACKAGE", "lorainv_fake_bench")
    assert main(["bench", "needsdep"]) == 2
    err = capsys.readouterr().err
    assert "needs the missing module 'lorainv_no_such_dependency'" in err and "no benchmark" not in err
    # --quick without --out is pointed at the quick directory, never at committed results
    assert main(["bench", "ok", "--quick"]) == 0
    assert f"ran ['--quick', '--out', {str(tmp_path / 'quick')!r}]" in capsys.readouterr().out
    assert main(["bench", "ok", "--quick", "--out", "here"]) == 0
    assert "ran ['--quick', '--out', 'here']" in capsys.readouterr().out
