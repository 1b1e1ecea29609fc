"""The lockstep state machine runs clean on the correct runtime (fast and numeric modes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, settings

from lorainv.testing.machine import make_machine

pytestmark = pytest.mark.slow  # ordered ahead of the rest (tests/conftest.py)

FastMachine = make_machine("FastMachine")
OverlapSessionsMachine = make_machine(
    "OverlapSessionsMachine", enable_lora_overlap_loading=True, lora_drain_wait_threshold=0.5, page_size=2
)
NumericMachine = make_machine("NumericMachine", network="tiny", numeric=True)
# drains come fast: a short wait threshold, and a victim is retracted as soon as it made progress
DRAIN = {"lora_drain_wait_threshold": 0.1, "lora_drain_policy": "preempt", "lora_drain_quantum": 0.01}
DrainMachine = make_machine("DrainMachine", **DRAIN)
# ended requests are forgotten at once (but for two): the model must forget the same ones
RetiringMachine = make_machine("RetiringMachine", max_finished_requests=2)

_common = {"deadline": None, "database": None, "derandomize": True, "suppress_health_check": list(HealthCheck)}

TestFastMachine = FastMachine.TestCase
TestFastMachine.settings = settings(max_examples=300, stateful_step_count=30, **_common)

TestOverlapSessionsMachine = OverlapSessionsMachine.TestCase
TestOverlapSessionsMachine.settings = settings(max_examples=150, stateful_step_count=30, **_common)

TestDrainMachine = DrainMachine.TestCase
TestDrainMachine.settings = settings(max_examples=200, stateful_step_count=30, **_common)

TestRetiringMachine = RetiringMachine.TestCase
TestRetiringMachine.settings = settings(max_examples=150, stateful_step_count=30, **_common)

TestNumericMachine = NumericMachine.TestCase
TestNumericMachine.settings = settings(max_examples=25, stateful_step_count=20, **_common)


COVERAGE_SCRIPT = """
import json, sys
from lorainv.testing import harness
from lorainv.testing.campaign import run_campaign
seen = set()
original = harness.Harness.apply
def spy(self, op):
    rec = original(self, op)
    seen.update(e.kind if e.kind != "Retracted" else f"Retracted:{e.reason}" for e in rec.events)
    return rec
harness.Harness.apply = spy
n, overrides = int(sys.argv[1]), json.loads(sys.argv[2])
res = run_campaign(max_examples=n, derandomize=True, name="coverage", overrides=overrides)
print(json.dumps({"found": res.found, "seen": sorted(seen), "states": res.states, "transitions": res.transitions}))
"""


def coverage(n: int, overrides: dict[str, object]) -> dict[str, object]:
    """A derandomized clean campaign in a fresh interpreter: what it found and which events it saw."""
    argv = [sys.executable, "-c", COVERAGE_SCRIPT, str(n), json.dumps(overrides)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_machine_reaches_the_interesting_states() -> None:
    """The clean runs above are only evidence if they reach retraction, prefix hits, loads,
    failed transfers, drains and sessions. (A fresh interpreter keeps the derandomized run
    independent of whatever ran before in this process.)"""
    res = coverage(300, {})
    assert not res["found"]
    wanted = {
        "Retracted:kv",
        "PrefixHit",
        "SessionRestored",
        "SessionSaved",
        "LoadStarted",
        "LoadCompleted",
        "LoadFailed",
        "Evicted",
        "DrainMarked",
        "DrainCleared",
        "SlotReserved",
        "ReservationEnded",
        "CacheEvicted",
        "Aborted",
        "Pinned",
    }
    assert wanted <= set(res["seen"]), f"never reached: {sorted(wanted - set(res['seen']))}"
    assert res["states"] > 50 and res["transitions"] > res["states"]


def test_drain_machine_reaches_preemption() -> None:
    """The preempt policy's paths: a victim retracted for a drain, the slot reserved and taken."""
    res = coverage(150, DRAIN)
    assert not res["found"]
    wanted = {"DrainMarked", "Retracted:drain", "DrainCleared", "SlotReserved", "ReservationEnded"}
    assert wanted <= set(res["seen"]), f"never reached: {sorted(wanted - set(res['seen']))}"
