"""The fuzzer finds op-obligation, policy and refinement bugs: each realistic bug of issue 13 is planted
in ``lorainv/impl`` with monkeypatch (never as a runtime fault branch) and the campaign behind
``lorainv fuzz --fast --max-examples 400 --seed 0`` must report it, in the pool and under the
invariant that name it. Shrinking is off (CI time); the clean runtime passes the same budget (the
controls at the end).

A plant edits one line of a runtime method's source (``_plant``), so it follows the method
as it is today and fails loudly if that line is gone.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lorainv.errors import AdapterError, RequestError
from lorainv.impl.drainer import Drainer
from lorainv.impl.engine import Engine
from lorainv.impl.lora_pool import LoraPool
from lorainv.impl.scheduler import Scheduler
from lorainv.model.policy import POLICY_CHECKS
from lorainv.testing.campaign import run_campaign
from lorainv.testing.replay import replay

BUDGET = 400
Plant = Callable[[pytest.MonkeyPatch], None]


def _plant(mp: pytest.MonkeyPatch, cls: type, name: str, old: str, new: str) -> None:
    """Replace ``cls.name`` by its own source with ``old`` replaced by ``new``."""
    fn = getattr(cls, name)
    src = textwrap.dedent(inspect.getsource(fn))
    assert old in src, f"{cls.__name__}.{name} no longer contains {old!r}: update the plant"
    scope: dict[str, Any] = {}
    exec(
        compile(src.replace(old, new), f"<planted {cls.__name__}.{name}>", "exec"),
        vars(sys.modules[fn.__module__]),
        scope,
    )
    mp.setattr(cls, name, scope[name])


def abort_ignored(mp: pytest.MonkeyPatch) -> None:
    """``Abort`` validates as documented, then leaves a live request running."""

    def ignore(self: Engine, op: Any) -> list[Any]:
        if not self._req(op.rid).state.live:
            raise RequestError(f"request {op.rid} already ended")
        return []

    mp.setattr(Engine, "_op_Abort", ignore)


def pin_always_refused(mp: pytest.MonkeyPatch) -> None:
    """``PinAdapter`` finds the adapter, then refuses every pin."""

    def refuse(self: Engine, op: Any) -> list[Any]:
        self._registered(op.name)
        raise AdapterError(f"cannot pin {op.name!r}")

    mp.setattr(Engine, "_op_PinAdapter", refuse)


def mru_eviction(mp: pytest.MonkeyPatch) -> None:
    _plant(mp, LoraPool, "choose_slot", "victim = min(cands", "victim = max(cands")


def retraction_victim_against_rule(mp: pytest.MonkeyPatch) -> None:
    _plant(mp, Scheduler, "schedule_decode", "victim = min(decoders", "victim = max(decoders")


def retraction_becomes_abort(mp: pytest.MonkeyPatch) -> None:
    retract = Scheduler.retract

    def abort_instead(self: Scheduler, req: Any, ev: list[Any], reason: str = "kv") -> None:
        if reason != "kv":
            return retract(self, req, ev, reason)
        if req is self.staged:
            self.staged = None
        else:
            self.running.remove(req)
        self.finish(req, "abort", "no KV left", ev)

    mp.setattr(Scheduler, "retract", abort_instead)


def budget_never_decremented(mp: pytest.MonkeyPatch) -> None:
    _plant(mp, Scheduler, "schedule_prefill", "budget -= chunk", "pass")


def max_running_ignored(mp: pytest.MonkeyPatch) -> None:
    _plant(
        mp, Scheduler, "schedule_prefill", "len(self.running) + len(batch) >= self.cfg.max_running_requests", "False"
    )


def fast_device(mp: pytest.MonkeyPatch) -> None:
    """Copies land while the scheduler moves to the next request, as on a GPU. The simulated
    device lands copies only when told, so a load never lands mid-round and the no-thrash
    guard has nothing to guard (removing it alone is an equivalent mutant there)."""
    admit = Scheduler._admit_adapter

    def admit_after_landing(self: Scheduler, uid: Any, batch_adapters: Any, ev: list[Any]) -> bool:
        self.device.complete(None)
        return admit(self, uid, batch_adapters, ev)

    mp.setattr(Scheduler, "_admit_adapter", admit_after_landing)


def no_thrash_guard_removed(mp: pytest.MonkeyPatch) -> None:
    _plant(mp, Scheduler, "_admit_adapter", "protected = need | self.round_loads", "protected = need")
    fast_device(mp)


def drain_victim_most_demanding(mp: pytest.MonkeyPatch) -> None:
    """The drainer marks the running adapter with the most demand, not the least."""
    _plant(mp, Drainer, "update", "d = min(free, key=self._victim_key)", "d = max(free, key=self._victim_key)")


def fail_transfers_ignored(mp: pytest.MonkeyPatch) -> None:
    """``FailTransfers`` validates as documented, then arms no failure on the device (the
    loads it should break all land)."""
    _plant(mp, Engine, "_op_FailTransfers", "self.device.fail_next(op.n)", "pass")


FAST_LOADS = {"enable_lora_overlap_loading": True, "max_loras_per_batch": 1}

# plant -> (config overrides that make it reachable, the (pool, invariant) that must name it)
PLANTS: dict[str, tuple[Plant, dict[str, Any], tuple[str, str]]] = {
    "abort ignored": (abort_ignored, {}, ("obligation", "effect")),
    "pin always refused": (pin_always_refused, {}, ("obligation", "rejected-valid")),
    "MRU instead of LRU": (mru_eviction, {}, ("policy", "eviction-victim")),
    "retraction victim against the rule": (retraction_victim_against_rule, {}, ("policy", "retraction-victim")),
    "retraction replaced by an abort": (retraction_becomes_abort, {}, ("policy", "retraction-victim")),
    "prefill budget never decremented": (budget_never_decremented, {}, ("policy", "prefill-budget")),
    "max_running_requests ignored": (max_running_ignored, {}, ("policy", "max-running")),
    "no-thrash guard removed": (no_thrash_guard_removed, FAST_LOADS, ("policy", "no-thrash")),
    "drain victim against the rule": (drain_victim_most_demanding, {}, ("policy", "drain-victim")),
    "FailTransfers ignored": (fail_transfers_ignored, {}, ("refinement", "injected-failures")),
}


@pytest.mark.parametrize("name", list(PLANTS))
def test_planted_bug_is_found(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plant, overrides, want = PLANTS[name]
    monkeypatch.setenv("LORAINV_TRACE_DIR", str(tmp_path))
    plant(monkeypatch)
    res = run_campaign(max_examples=BUDGET, seed=0, shrink=False, overrides=overrides, name="planted")
    assert res.found, f"{name}: not found in {BUDGET} examples"
    assert res.trace is not None
    assert (res.trace.expect["pool"], res.trace.expect["invariant"]) == want, res.trace.meta


@pytest.mark.slow
@pytest.mark.parametrize(
    ("setup", "overrides"), [("default", {}), ("fast device", FAST_LOADS)], ids=["default", "fast-device"]
)
def test_clean_runtime_passes_the_same_budget(
    setup: str, overrides: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: with nothing planted the same campaign runs clean, also on the device that
    lands copies mid-round (the FCFS check allows for a load that lands mid-round)."""
    monkeypatch.setenv("LORAINV_TRACE_DIR", str(tmp_path))
    if setup == "fast device":
        fast_device(monkeypatch)
    res = run_campaign(max_examples=BUDGET, seed=0, shrink=False, overrides=overrides, name="clean")
    assert not res.found, res.trace.meta if res.trace is not None else res.error
    assert res.examples >= BUDGET


def test_a_switched_off_policy_check_is_silent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine with another eviction policy switches ``eviction-victim`` off: the trace that
    check flagged replays without it (the policy set travels in the trace's meta), while the
    full set still flags it."""
    monkeypatch.setenv("LORAINV_TRACE_DIR", str(tmp_path))
    mru_eviction(monkeypatch)
    res = run_campaign(max_examples=BUDGET, seed=0, shrink=False, name="planted")
    assert res.found and res.trace is not None
    assert res.trace.expect == {"pool": "policy", "invariant": "eviction-victim"}
    assert replay(res.trace).matches(res.trace.expect)
    others = sorted(set(POLICY_CHECKS) - {"eviction-victim"})
    off = dataclasses.replace(res.trace, meta={**res.trace.meta, "policy": others})
    again = replay(off)
    assert not any(v.pool == "policy" and v.invariant == "eviction-victim" for v in again.violations)
