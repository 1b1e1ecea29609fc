"""Strict memory-check levels (docs/design.md §1): 0 never checks, 1 checks every pool when a step
leaves the engine idle (the leak check), 2 checks every pool after every op and reports the
events of the last ``history_steps`` steps. Also ``RuntimeConfig.from_env`` and the
``session_double_count`` fault, which makes a strict check fire on healthy state.
"""

from __future__ import annotations

from typing import Any

import pytest
from checker_states import brief, dummy_config

from lorainv.checkers import run_checks
from lorainv.checkers.refinement import RefinementChecker
from lorainv.config import RuntimeConfig
from lorainv.errors import ConfigError, InvariantViolation, Violation
from lorainv.events import Retracted
from lorainv.impl.engine import Engine
from lorainv.model.reference import ReferenceModel
from lorainv.ops import Abort, AddRequest, CompleteTransfers, Op, OpenSession, Step

# Two requests on 14 tokens of pages of 2: at the fifth step r1 (longest prompt, odd KV length)
# is retracted, and ``retract_leaks_tail`` keeps its partial last page: indices 14 and 15.
RETRACT_OPS: list[Op] = [AddRequest("r0", (1, 2, 3), None, 8), AddRequest("r1", (4, 5, 6, 7), None, 8)]
RETRACT_OPS += [Step()] * 5
RETRACT_STEP = len(RETRACT_OPS) - 1
LEAKED = (14, 15)
TAIL: list[Op] = [CompleteTransfers(None), Step()] * 40

# r0's 10-token prompt runs in chunks of 4; it is aborted mid-prefill
ABORT_OPS: list[Op] = [AddRequest("r0", tuple(range(1, 11)), None, 4), Step(), Abort("r0")]


SESSION_OPS: list[Op] = [
    OpenSession("s"),
    AddRequest("t1", (1, 2, 3), None, 2, "s"),
    Step(),
    Step(),  # t1 finished: its 4 tokens are now the (inactive) session's
    AddRequest("t2", (4, 5), None, 2, "s"),
    Step(),  # t2 borrows them: the slot is active
]


def engine(level: int, fault: str, **cfg: Any) -> Engine:
    base: dict[str, Any] = {"page_size": 2, "max_total_tokens": 14}
    base.update(cfg)
    return Engine(dummy_config(strict_mem_check=level, faults=frozenset({fault}), **base))


def run(e: Engine, ops: list[Op]) -> tuple[int, InvariantViolation | None]:
    """Apply ``ops`` until one raises; returns (index reached, the exception or None)."""
    for i, op in enumerate(ops):
        try:
            e.apply(op)
        except InvariantViolation as exc:
            return i, exc
    return len(ops), None


def test_scenario_leaks_exactly_at_the_retraction() -> None:
    e = engine(0, "retract_leaks_tail")
    first = None
    for i, op in enumerate(RETRACT_OPS):
        ev = e.apply(op)
        if first is None and e.check():
            first = i
            assert Retracted("r1", 4) in ev
    assert first == RETRACT_STEP
    assert ("kv", "K3", LEAKED) in brief(e.check())


# -- level 0 ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "ops", "cfg"),
    [
        ("retract_leaks_tail", RETRACT_OPS, {}),
        ("abort_chunked_leaks_kv", ABORT_OPS, {"chunked_prefill_size": 4, "max_total_tokens": 64}),
        ("session_double_count", SESSION_OPS, {"max_total_tokens": 64}),
    ],
)
def test_level_0_never_raises(fault: str, ops: list[Op], cfg: dict[str, Any]) -> None:
    e = engine(0, fault, **cfg)
    i, exc = run(e, ops)
    assert exc is None and e.check() != []  # broken (or, for the double count, misjudged) state
    i, exc = run(e, TAIL)
    assert exc is None and i == len(TAIL) and e.is_idle()


# -- level 1 ------------------------------------------------------------------------------------


def test_level_1_raises_only_when_idle_and_names_the_leaked_indices() -> None:
    e = engine(1, "retract_leaks_tail")
    i, exc = run(e, RETRACT_OPS + TAIL)
    assert exc is not None, "the idle leak check never fired"
    assert i > RETRACT_STEP  # the leak existed from RETRACT_STEP on, yet level 1 waited for idle
    assert isinstance((RETRACT_OPS + TAIL)[i], Step) and e.is_idle()
    assert ("kv", "K3", LEAKED) in brief(exc.violations)
    leak = next(v for v in exc.violations if v.invariant == "K3")
    assert leak.message.startswith("leaked token indices: owned by nobody")
    assert ("kv", "K1", (-2,)) in brief(exc.violations)
    assert exc.recent_events == []  # the event history is a level-2 feature
    assert "offenders=[14, 15]" in str(exc)


def test_level_1_checks_once_per_idle_step(monkeypatch: pytest.MonkeyPatch) -> None:
    e = Engine(dummy_config(strict_mem_check=1))
    calls: list[bool] = []
    progress_only: list[bool] = []  # the no-progress check alone, after every busy step (issue 15 §4)
    real = e.check

    def counting(**kw: bool) -> list[Violation]:
        (progress_only if kw.get("progress_only") else calls).append(e.is_idle())
        return real(**kw)

    monkeypatch.setattr(e, "check", counting)
    e.apply(AddRequest("r0", (1, 2, 3), None, 3))
    e.apply(AddRequest("r1", (4, 5), None, 2))
    assert calls == []  # not at ops other than Step
    idle_after = []
    for _ in range(6):
        e.apply(Step())
        idle_after.append(e.is_idle())
    assert idle_after == [False, False, True, True, True, True]
    assert calls == [True] * 4  # one full check per step that left the engine idle
    assert progress_only == [False, False]


def test_level_1_abort_mid_prefill() -> None:
    e = engine(1, "abort_chunked_leaks_kv", chunked_prefill_size=4, max_total_tokens=64)
    i, exc = run(e, [*ABORT_OPS, Step()])
    assert i == len(ABORT_OPS)  # not at the Abort: only a Step that finds the engine idle checks
    assert exc is not None
    assert brief(exc.violations) == [
        ("kv", "K1", (-4,)),
        ("kv", "K3", (2, 3, 4, 5)),
        ("req_to_token", "K5", (0,)),
        ("req_to_token", "K2", ()),
    ]


# -- level 2 ------------------------------------------------------------------------------------


def test_level_2_raises_at_the_first_bad_step_with_recent_events() -> None:
    e = engine(2, "retract_leaks_tail", history_steps=3)
    i, exc = run(e, RETRACT_OPS + TAIL)
    assert i == RETRACT_STEP and exc is not None
    assert brief(exc.violations) == [("kv", "K1", (-2,)), ("kv", "K3", LEAKED)]
    # the ring buffer holds the last 3 steps (steps 3, 4 and 5), the failing one last
    assert len(exc.recent_events) == 3
    assert [r.split(":")[0] for r in exc.recent_events] == ["step 3", "step 4", "step 5"]
    assert "Retracted(rid=r1, output_len=4, reason=kv)" in exc.recent_events[-1]
    assert "last 3 step(s) of events:" in str(exc)


def test_level_2_history_defaults_to_history_steps() -> None:
    cfg = dummy_config(strict_mem_check=2, page_size=2, max_total_tokens=14, faults={"retract_leaks_tail"})
    assert cfg.history_steps == 8
    e = Engine(cfg)
    _, exc = run(e, RETRACT_OPS)
    assert exc is not None and len(exc.recent_events) == 5  # fewer steps than the buffer holds
    assert exc.recent_events[0].startswith("step 1: ")


def test_level_2_abort_mid_prefill_raises_at_the_abort() -> None:
    e = engine(2, "abort_chunked_leaks_kv", chunked_prefill_size=4, max_total_tokens=64)
    i, exc = run(e, ABORT_OPS)
    assert i == len(ABORT_OPS) - 1 and exc is not None
    assert ("kv", "K3", (2, 3, 4, 5)) in brief(exc.violations)
    assert ("req_to_token", "K5", (0,)) in brief(exc.violations)
    assert len(exc.recent_events) == 1 and "Scheduled(rid=r0, chunk_tokens=4, done=False)" in exc.recent_events[0]


@pytest.mark.parametrize("level", [1, 2])
def test_healthy_runs_never_raise(level: int) -> None:
    for fault_free_ops, cfg in ((RETRACT_OPS, {}), (ABORT_OPS, {"chunked_prefill_size": 4, "max_total_tokens": 64})):
        base: dict[str, Any] = {"page_size": 2, "max_total_tokens": 14, **cfg}
        e = Engine(dummy_config(strict_mem_check=level, **base))
        _, exc = run(e, fault_free_ops + TAIL)
        assert exc is None and e.is_idle()


# -- session_double_count -------------------------------------------------------------------


def test_session_double_count_fires_on_healthy_state() -> None:
    e = engine(2, "session_double_count", max_total_tokens=64)
    i, exc = run(e, SESSION_OPS)
    assert i == len(SESSION_OPS) - 1 and exc is not None
    assert brief(exc.violations) == [("kv", "K1", (4,))]  # the lent 4 tokens counted twice
    assert "session_held 4" in exc.violations[0].message


def test_session_double_count_is_only_an_accounting_error() -> None:
    """At level 0 with the fault, the state matches the model and every other checker: only
    the K1 identity, which reads the faulty counter, complains. Without it all is clean."""
    for faults, want in ((frozenset({"session_double_count"}), [("kv", "K1", (4,))]), (frozenset(), [])):
        cfg = dummy_config(page_size=2, faults=faults)
        e, m = Engine(cfg), ReferenceModel(cfg)
        for op in SESSION_OPS:
            assert m.observe(op, e.apply(op)) == []
        snap = e.snapshot()
        assert [s.is_active for s in snap.sessions] == [True]
        assert brief(run_checks(snap)) == want
        assert RefinementChecker(m).check(snap) == []


def test_session_double_count_level_2_clean_without_the_fault() -> None:
    e = Engine(dummy_config(strict_mem_check=2, page_size=2))
    _, exc = run(e, SESSION_OPS + TAIL)
    assert exc is None


# -- from_env -----------------------------------------------------------------------------------


def test_from_env_reads_the_strict_level() -> None:
    assert RuntimeConfig.from_env({"LORAINV_STRICT_MEM_CHECK": "2"}).strict_mem_check == 2
    assert RuntimeConfig.from_env({"LORAINV_STRICT_MEM_CHECK": "1"}, network="dummy").strict_mem_check == 1
    assert RuntimeConfig.from_env({}).strict_mem_check == 0
    assert RuntimeConfig.from_env({"LORAINV_STRICT_MEM_CHECK": ""}, strict_mem_check=1).strict_mem_check == 1
    # the environment wins over the caller's overrides
    assert RuntimeConfig.from_env({"LORAINV_STRICT_MEM_CHECK": "0"}, strict_mem_check=2).strict_mem_check == 0
    cfg = RuntimeConfig.from_env({"LORAINV_FAULTS": "retract_leaks_tail, session_double_count"})
    assert cfg.faults == {"retract_leaks_tail", "session_double_count"}


@pytest.mark.parametrize(("raw", "msg"), [("x", "must be 0, 1 or 2"), ("3", "strict_mem_check=3 is out of range")])
def test_from_env_rejects_bad_levels(raw: str, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        RuntimeConfig.from_env({"LORAINV_STRICT_MEM_CHECK": raw})


def test_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAINV_STRICT_MEM_CHECK", "2")
    monkeypatch.setenv("LORAINV_FAULTS", "retract_leaks_tail")
    cfg = RuntimeConfig.from_env(network="dummy", page_size=2, max_total_tokens=14)
    assert cfg.strict_mem_check == 2
    i, exc = run(Engine(cfg), RETRACT_OPS)
    assert i == RETRACT_STEP and exc is not None
