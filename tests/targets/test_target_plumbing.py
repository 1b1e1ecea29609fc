"""Targets through the shared tooling: traces record their target, the harness, replay and
``lorainv fuzz --target`` take one. The vLLM parts skip where vLLM is not installed."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from lorainv.cli import main
from lorainv.config import RuntimeConfig
from lorainv.errors import TraceError
from lorainv.ops import AddRequest, Step
from lorainv.testing.harness import Harness
from lorainv.testing.replay import replay
from lorainv.trace import Trace, load, save

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (ci/install-vllm.sh)")
CFG = RuntimeConfig(network="dummy", page_size=4, max_total_tokens=64, chunked_prefill_size=16, max_loras_per_batch=2)
REGRESSION = Path(__file__).parent.parent / "regressions" / "vllm" / "reload_same_path.json"


def test_traces_record_their_target_and_old_ones_load_as_lorainv(tmp_path: Path) -> None:
    t = Trace(CFG, (AddRequest("r0", (1, 2), None, 1), Step()), target="vllm")
    assert load(save(t, tmp_path / "t.json")).target == "vllm"
    old = t.to_dict()
    del old["target"]
    assert Trace.from_dict(old).target == "lorainv"
    with pytest.raises(TraceError, match="target"):
        Trace.from_dict({**old, "target": 3})


def test_harness_default_is_lorainvs_engine() -> None:
    from lorainv.impl.engine import Engine

    h = Harness(CFG)
    assert isinstance(h.engine, Engine) and h.model is not None
    assert not h.apply(AddRequest("r0", (1, 2, 3), None, 2)).violations
    assert not h.finish()


def test_fuzz_rejects_lorainv_only_flags_and_unknown_targets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fuzz", "--target", "vllm", "--numeric", "--max-examples", "1"]) == 2
    assert "lorainv's engine only" in capsys.readouterr().err
    assert main(["fuzz", "--target", "nope", "--max-examples", "1"]) == 2
    assert "unknown target" in capsys.readouterr().err


def test_fuzz_target_vllm_without_vllm_says_how_to_install(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # vLLM made unimportable for this test alone (a None entry makes an import raise ImportError),
    # so the message is checked whether or not vLLM is installed
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")] + ["vllm"]:
        monkeypatch.setitem(sys.modules, name, None)
    assert main(["fuzz", "--target", "vllm", "--max-examples", "1"]) == 2
    assert "install-vllm.sh" in capsys.readouterr().err


@needs_vllm
def test_harness_drives_the_vllm_target() -> None:
    from lorainv.ops import LoadAdapter

    h = Harness(CFG, target="vllm")
    assert h.engine.name == "vllm"
    for op in (LoadAdapter("a", "gen:8:1"), AddRequest("r0", tuple(range(1, 10)), "a", 3), Step()):
        assert not h.apply(op).violations
    assert not h.finish()
    assert h.engine.is_idle() and [r.op.kind for r in h.records][-1] == "Step"


@needs_vllm
def test_replay_and_cli_replay_a_vllm_trace(capsys: pytest.CaptureFixture[str]) -> None:
    res = replay(load(REGRESSION))
    assert res.matches(load(REGRESSION).expect) and res.failed_at == 6
    assert main(["replay", str(REGRESSION)]) == 1
    assert "target vllm" in capsys.readouterr().out


@needs_vllm
def test_cli_fuzz_target_vllm(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    args = ["fuzz", "--target", "vllm", "--target-option", "reload_paths=versioned", "--max-examples", "6"]
    assert main([*args, "--json", str(report), "--quiet"]) == 0
    doc = json.loads(report.read_text())
    assert doc["target"] == "vllm" and doc["violations"] == 0 and doc["examples"] >= 6
