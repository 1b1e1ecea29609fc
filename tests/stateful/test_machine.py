"""The lockstep state machine runs clean on the correct runtime (fast and numeric modes)."""

from __future__ import annotations

import json
import subprocess
import sys

from hypothesis import HealthCheck, settings

from lorainv.testing.machine import make_machine

FastMachine = make_machine("FastMachine")
OverlapSessionsMachine = make_machine(
    "OverlapSessionsMachine", enable_lora_overlap_loading=True, lora_drain_wait_threshold=0.5, page_size=2
)
NumericMachine = make_machine("NumericMachine", network="tiny", numeric=True)

_common = {"deadline": None, "database": None, "derandomize": True, "suppress_health_check": list(HealthCheck)}

TestFastMachine = FastMachine.TestCase
TestFastMachine.settings = settings(max_examples=300, stateful_step_count=30, **_common)

TestOverlapSessionsMachine = OverlapSessionsMachine.TestCase
TestOverlapSessionsMachine.settings = settings(max_examples=150, stateful_step_count=30, **_common)

TestNumericMachine = NumericMachine.TestCase
TestNumericMachine.settings = settings(max_examples=25, stateful_step_count=20, **_common)


COVERAGE_SCRIPT = """
import json
from lorainv.testing import harness
from lorainv.testing.campaign import run_campaign
seen = set()
original = harness.Harness.apply
def spy(self, op):
    rec = original(self, op)
    seen.update(e.kind for e in rec.events)
    return rec
harness.Harness.apply = spy
res = run_campaign(max_examples=200, derandomize=True, name="coverage")
print(json.dumps({"found": res.found, "seen": sorted(seen), "states": res.states, "transitions": res.transitions}))
"""


def test_machine_reaches_the_interesting_states() -> None:
    """The clean runs above are only evidence if they reach retraction, prefix hits, loads,
    failed transfers, drains and sessions. (A fresh interpreter keeps the derandomized run
    independent of whatever ran before in this process.)"""
    out = subprocess.run([sys.executable, "-c", COVERAGE_SCRIPT], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert not res["found"]
    wanted = {
        "Retracted",
        "PrefixHit",
        "SessionRestored",
        "SessionSaved",
        "LoadStarted",
        "LoadCompleted",
        "LoadFailed",
        "Evicted",
        "DrainMarked",
        "DrainCleared",
        "CacheEvicted",
        "Aborted",
        "Pinned",
    }
    assert wanted <= set(res["seen"]), f"never reached: {sorted(wanted - set(res['seen']))}"
    assert res["states"] > 50 and res["transitions"] > res["states"]
