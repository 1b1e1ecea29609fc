"""No silent stall (issue 15 §4): an engine built with defaults makes progress through the
public API alone, and a state from which nothing can ever run is a ``liveness/no_progress``
violation from ``check()`` and from the strict hook.

The traffic is the issue's: overlap loading, two LoRA slots, a small KV pool, three adapters,
six requests (one aborted), driven only by ``load_adapter``, ``add_request``, ``abort`` and
``step``. The reference run is ``device="cpu"`` (copies land at the next step, a different
landing schedule); greedy outputs must not depend on when an adapter's copy lands.
"""

from __future__ import annotations

from typing import Any

import pytest

from lorainv import Engine, RuntimeConfig
from lorainv.errors import InvariantViolation

STALL_CFG: dict[str, Any] = {"enable_lora_overlap_loading": True, "max_loras_per_batch": 2, "max_total_tokens": 160}
PROMPTS = [[1 + i, 2, 3, 4, 5] for i in range(6)]
ABORTED = "r1"
MAX_STEPS = 5_000


def _queue(engine: Engine) -> list[str]:
    for i in range(3):
        engine.load_adapter(f"a{i}", f"gen:4:{i}")
    rids = [engine.add_request(p, f"a{i % 3}", max_new_tokens=6) for i, p in enumerate(PROMPTS)]
    engine.abort(ABORTED)
    return rids


def _serve(engine: Engine) -> tuple[list[str], int, int]:
    """Queue the traffic and step until idle; (rids, steps taken, most copies seen pending after a step)."""
    rids = _queue(engine)
    most_pending = 0
    for n in range(MAX_STEPS):
        if engine.is_idle():
            return rids, n, most_pending
        engine.step()
        most_pending = max(most_pending, engine.device.pending())
    return rids, MAX_STEPS, most_pending


def test_default_engine_finishes_the_stall_traffic_like_the_cpu_device() -> None:
    engine = Engine(RuntimeConfig(**STALL_CFG))
    assert engine.cfg.device == "sim-auto"
    rids, steps, most_pending = _serve(engine)
    assert steps < MAX_STEPS, "the default engine stalled"
    # the copies really were asynchronous: some stayed pending across a step
    assert most_pending > 0
    assert engine.check() == []
    ref = Engine(RuntimeConfig(**STALL_CFG, device="cpu"))
    ref_rids, ref_steps, _ = _serve(ref)
    assert ref_steps < MAX_STEPS and ref_rids == rids
    for rid in rids:
        want = "aborted" if rid == ABORTED else "finished"
        assert engine.status(rid) == ref.status(rid) == want
        assert engine.output(rid) == ref.output(rid)
        assert len(engine.output(rid)) == (0 if rid == ABORTED else 6)


def test_default_latency_is_a_number_of_steps() -> None:
    """A copy on the default device lands ``transfer_latency_steps`` steps after it is issued."""
    for latency in (1, 3):
        engine = Engine(RuntimeConfig(**STALL_CFG, transfer_latency_steps=latency))
        engine.load_adapter("a0", "gen:4:0")
        engine.add_request([1, 2, 3], "a0", max_new_tokens=2)
        engine.step()  # issues the load
        assert engine.device.pending() > 0
        for _ in range(latency - 1):
            engine.step()
            assert engine.device.pending() > 0 and engine.status("r0") == "waiting"
        engine.step()
        assert engine.device.pending() == 0 and engine.status("r0") != "waiting"


def _block_copies(monkeypatch: pytest.MonkeyPatch, engine: Engine) -> None:
    """The planted defect: the device never lands a side-stream copy."""
    monkeypatch.setattr(engine.device, "poll", lambda: None)


def test_blocked_loads_are_a_liveness_violation_from_check(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine(RuntimeConfig(**STALL_CFG))
    _block_copies(monkeypatch, engine)
    rids = _queue(engine)
    for _ in range(50):
        engine.step()
    waiting = [r for r in rids if r != ABORTED]
    assert [engine.status(r) for r in waiting] == ["waiting"] * len(waiting)
    violations = engine.check()
    assert [(v.pool, v.invariant) for v in violations] == [("liveness", "no_progress")]
    v = violations[0]
    assert sorted(v.offenders) == sorted(waiting)
    assert "never landed" in v.message and "'a0'" in v.message and "5 waiting request(s)" in v.message


@pytest.mark.parametrize("level", [1, 2])
def test_blocked_loads_raise_during_step_at_strict_levels(monkeypatch: pytest.MonkeyPatch, level: int) -> None:
    engine = Engine(RuntimeConfig(**STALL_CFG, strict_mem_check=level))
    _block_copies(monkeypatch, engine)
    _queue(engine)
    latency = engine.cfg.transfer_latency_steps
    with pytest.raises(InvariantViolation) as info:
        for _ in range(latency + 2):
            engine.step()
    assert [(v.pool, v.invariant) for v in info.value.violations] == [("liveness", "no_progress")]
    assert engine.steps == latency + 2  # the first step past the device's bound


def test_no_false_positive_while_loads_are_within_their_latency() -> None:
    """Slow copies are progress: strict level 2 (every checker and the no-progress check after
    every op) runs the whole traffic to the end, with copies pending for most of the steps."""
    engine = Engine(RuntimeConfig(**STALL_CFG, transfer_latency_steps=6, strict_mem_check=2))
    rids, steps, _ = _serve(engine)
    assert steps < MAX_STEPS and engine.check() == []
    assert all(engine.status(r) == ("aborted" if r == ABORTED else "finished") for r in rids)


def test_manual_device_pending_loads_are_left_to_its_driver() -> None:
    """device="sim" promises no landing bound: its driver (the fuzzer, a trace) lands copies,
    so waiting on them is not a stall; the driver's ``complete_transfers`` then finishes all."""
    engine = Engine(RuntimeConfig(**STALL_CFG, device="sim", strict_mem_check=1))
    rids = _queue(engine)
    for _ in range(30):
        engine.step()
    assert engine.device.pending() > 0 and engine.check() == []
    for _ in range(200):
        if engine.is_idle():
            break
        engine.complete_transfers()
        engine.step()
    assert all(engine.status(r) in ("finished", "aborted") for r in rids)


def test_sim_device_lands_each_copy_at_its_own_due_poll() -> None:
    import torch

    from lorainv.errors import ConfigError
    from lorainv.impl.device import SimDevice

    dev = SimDevice(latency_steps=3)
    side = dev.new_stream("side")
    a, b = torch.zeros(2), torch.zeros(2)
    dev.copy_async(a, torch.ones(2), side)  # issued at tick 0: due at tick 3
    dev.poll()
    dev.copy_async(b, torch.full((2,), 2.0), side)  # issued at tick 1: due at tick 4
    ev_a = dev.record_event(side)
    dev.poll()
    assert dev.pending() == 2 and bool(torch.isnan(a).all()) and not ev_a.query()
    dev.poll()  # tick 3
    assert dev.pending() == 1 and a.tolist() == [1.0, 1.0] and bool(torch.isnan(b).all())
    dev.poll()  # tick 4
    assert dev.pending() == 0 and b.tolist() == [2.0, 2.0] and ev_a.query()
    manual = SimDevice()
    manual.copy_async(a, torch.zeros(2), manual.new_stream("side"))
    for _ in range(100):
        manual.poll()
    assert manual.pending() == 1 and manual.latency_steps is None and not manual.auto_complete
    assert manual.complete_all() == (1, 0) and a.tolist() == [0.0, 0.0]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="latency_steps must be None or an int >= 1"):
            SimDevice(latency_steps=bad)  # type: ignore[arg-type]
