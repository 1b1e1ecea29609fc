"""`fuzzrun.freeze_startup` freezes the start-up objects once per process, after collecting
garbage: cyclic garbage is freed rather than frozen, and later objects are never frozen."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import gc, json, weakref
from lorainv.testing.fuzzrun import freeze_startup

class Node:
    pass

a = Node(); a.me = a            # cyclic garbage made before the freeze
gone = weakref.ref(a); del a
freeze_startup()
first = gc.get_freeze_count()
keep = [[i] for i in range(10000)]  # made after the freeze
freeze_startup()
print(json.dumps([gone() is None, first > 0, gc.get_freeze_count() == first]))
"""


def test_freeze_collects_first_and_happens_once() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == [True, True, True]
