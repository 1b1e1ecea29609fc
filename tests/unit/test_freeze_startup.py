"""`fuzzrun.freeze_startup` freezes the start-up objects once per process: objects made after
the first call are never frozen by a later one."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import gc, json
from lorainv.testing.fuzzrun import freeze_startup

freeze_startup()
first = gc.get_freeze_count()
keep = [[i] for i in range(10000)]  # made after the freeze
freeze_startup()
print(json.dumps([first > 0, gc.get_freeze_count() == first]))
"""


def test_freeze_happens_once_per_process() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == [True, True]
