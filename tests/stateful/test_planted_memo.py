"""The snapshotter's memos are lorainv's own code on the fuzzer's hot path: a memo whose key
misses something would hide a change from every checker. Each plant below drops one part of
a memo's key (in a copy of the function's source) and the campaign behind
``lorainv fuzz --fast --max-examples 400 --seed 0`` must fail on it."""

from __future__ import annotations

import inspect
import textwrap
from pathlib import Path

import pytest

from lorainv.impl import snapshotter
from lorainv.testing.campaign import run_campaign

PLANTS = {
    # a bare request's record reused across a state change (waiting -> aborted, same fields)
    "request memo ignores the state": (
        "_req",
        "            state,\n            r.adapter,",
        "            r.adapter,",
        {("refinement", "live"), ("snapshot", "memo")},
    ),
    # the pinned cache's entries and needs reused after the registry changed
    "pinned memo ignores the registry": (
        "_pinned",
        "    sig = (tuple((k, id(v)) for k, v in items), tuple((n, id(a)) for n, a in adapters))",
        "    sig = (tuple((k, id(v)) for k, v in items),)",
        {("snapshot", "memo"), ("pinned", "PN1"), ("pinned", "PN3")},
    ),
}


@pytest.mark.parametrize("name", list(PLANTS))
def test_a_stale_memo_is_found_by_fast_fuzz(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fn_name, old, new, pools = PLANTS[name]
    fn = getattr(snapshotter, fn_name)
    src = textwrap.dedent(inspect.getsource(fn))
    assert old in src, f"snapshotter.{fn_name} no longer contains the planted line: update the plant"
    scope: dict[str, object] = {}
    exec(compile(src.replace(old, new), f"<planted {fn_name}>", "exec"), vars(snapshotter), scope)
    monkeypatch.setattr(snapshotter, fn_name, scope[fn_name])
    monkeypatch.setenv("LORAINV_TRACE_DIR", str(tmp_path))
    res = run_campaign(max_examples=400, seed=0, shrink=False, name="planted-memo")
    assert res.found and res.trace is not None, f"{name}: not found in 400 examples"
    assert (res.trace.expect["pool"], res.trace.expect["invariant"]) in pools, res.trace.expect
