"""The vLLM target: construction, each op, the checkers against deliberately broken vLLMs, and
a short Hypothesis run. Skipped where vLLM is not installed (ci/install-vllm.sh installs it)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("vllm")

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorainv.config import RuntimeConfig
from lorainv.errors import Violation
from lorainv.events import (
    Aborted,
    AdapterRegistered,
    BatchFormed,
    Decoded,
    Event,
    Finished,
    PrefixHit,
    Queued,
    Rejected,
    Retracted,
    Scheduled,
)
from lorainv.model.token_oracle import TokenOracle, next_token
from lorainv.ops import Abort, AddRequest, LoadAdapter, Op, OpenSession, Step, UnloadAdapter
from lorainv.targets import Target, make_target
from lorainv.targets.drive import TargetRun

CFG = RuntimeConfig(
    page_size=4,
    max_total_tokens=64,
    max_running_requests=4,
    chunked_prefill_size=16,
    max_loras_per_batch=2,
    network="dummy",
)
PROMPT = tuple(range(1, 10))  # 9 tokens: two full blocks and one token


def target(cfg: RuntimeConfig = CFG, **kw: object) -> object:
    return make_target("vllm", cfg, **kw)


def run(ops: list[Op], cfg: RuntimeConfig = CFG, **kw: object) -> tuple[TargetRun, list[Violation]]:
    r = TargetRun(target(cfg, **kw))
    found: list[Violation] = []
    for op in ops:
        found += r.apply(op).violations
    return r, found + r.finish()


def kinds(vs: list[Violation]) -> set[str]:
    return {v.invariant for v in vs}


# -- construction ------------------------------------------------------------------------------
def test_construction_sizes_from_runtime_config() -> None:
    t = target()
    assert isinstance(t, Target)
    pool = t.scheduler.kv_cache_manager.block_pool
    assert len(pool.blocks) == 64 // 4 + 1  # +1: the null block
    assert pool.get_num_free_blocks() == 16
    assert t.scheduler.max_num_running_reqs == 4
    assert t.scheduler.scheduler_config.max_num_batched_tokens == 16
    assert t.scheduler.lora_config.max_loras == 2
    assert t.is_idle()
    assert t.capabilities.ops == {"AddRequest", "Abort", "Step", "LoadAdapter", "UnloadAdapter"}
    assert not t.capabilities.reference_model


def test_unknown_target_name_is_a_config_error() -> None:
    from lorainv.errors import ConfigError

    with pytest.raises(ConfigError, match="known"):
        make_target("sglang", CFG)


def test_snapshot_is_a_pure_read() -> None:
    t = target()
    for op in (LoadAdapter("a", "gen:8:1"), AddRequest("r0", PROMPT, "a", 3), Step()):
        t.apply(op)
    a, b = t.snapshot(), t.snapshot()
    assert a == b
    assert t.scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == 16 - 3


# -- ops ---------------------------------------------------------------------------------------
def test_add_request_carries_the_lora_identity_and_salt() -> None:
    t = target()
    assert t.apply(LoadAdapter("a", "gen:8:1")) == [AdapterRegistered("a", 8, False)]
    assert t.apply(AddRequest("r0", PROMPT, "a", 3)) == [Queued("r0", "a", 9, 3)]
    req = t.scheduler.requests["r0"]
    assert (req.lora_request.lora_name, req.lora_request.lora_int_id) == ("a", 1)
    assert req.lora_request.lora_path == "/lorainv/adapters/a"
    assert req.max_tokens == 3 and req.prompt_token_ids == list(PROMPT)


@pytest.mark.parametrize(
    "op",
    [
        AddRequest("r0", PROMPT, "nope", 3),
        AddRequest("r0", (), None, 3),
        AddRequest("r0", (5000,), None, 3),
        AddRequest("r0", PROMPT, None, 0),
        AddRequest("r0", tuple(range(60)), None, 8),  # over the KV capacity (max_model_len)
        Abort("ghost"),
        UnloadAdapter("ghost"),
        LoadAdapter("a", "gen:8:1", pinned=True),
        LoadAdapter("a", "gen:64:1"),  # rank over max_lora_rank
        OpenSession("s"),  # not a capability
    ],
)
def test_bad_ops_are_rejected_and_change_nothing(op: Op) -> None:
    t = target()
    before = t.snapshot()
    ev = t.apply(op)
    assert len(ev) == 1 and isinstance(ev[0], Rejected)
    assert t.snapshot() == before
    assert not t.scheduler.requests


def test_session_id_is_the_cache_salt_and_salts_do_not_share() -> None:
    ops: list[Op] = [AddRequest("r0", PROMPT, None, 1, session_id="t1"), Step()]
    ops += [AddRequest("r1", PROMPT, None, 1, session_id="t2"), Step()]
    ops += [AddRequest("r2", PROMPT, None, 1, session_id="t1"), Step()]
    r, found = run(ops)
    assert not found, found
    assert r.target.tracked["r1"].req.cache_salt == "t2"
    hits = [e for rec in r.records for e in rec.events if isinstance(e, PrefixHit)]
    assert hits == [PrefixHit("r2", 8, "cache")]  # the same salt hits; another salt does not


def test_a_prefix_hit_across_salts_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.v1.request import Request

    real = Request.__init__

    def no_salt(self: Request, *a: object, **kw: object) -> None:
        kw["cache_salt"] = None  # the engine drops the salt before hashing
        real(self, *a, **kw)

    monkeypatch.setattr(Request, "__init__", no_salt)
    ops: list[Op] = [AddRequest("r0", PROMPT, None, 2, session_id="t1"), Step()]
    ops += [AddRequest("r1", PROMPT, None, 2, session_id="t2"), Step()]
    _, found = run(ops)
    assert "VB4" in kinds(found)


def test_reload_gets_a_new_lora_int_id_with_the_same_name_and_path() -> None:
    t = target()
    t.apply(LoadAdapter("a", "gen:8:1"))
    t.apply(AddRequest("r0", PROMPT, "a", 1))
    assert isinstance(t.apply(UnloadAdapter("a"))[0], Rejected)  # a live request uses it
    t.apply(Abort("r0"))
    t.apply(UnloadAdapter("a"))
    t.apply(LoadAdapter("a", "gen:8:2"))
    t.apply(AddRequest("r1", PROMPT, "a", 1))
    old, new = t.tracked["r0"].req.lora_request, t.tracked["r1"].req.lora_request
    assert (old.lora_name, old.lora_path) == (new.lora_name, new.lora_path)
    assert (old.lora_int_id, new.lora_int_id) == (1, 2)
    assert t.identities == {1: "gen:8:1", 2: "gen:8:2"}
    v = target(reload_paths="versioned")
    v.apply(LoadAdapter("a", "gen:8:1"))
    v.apply(UnloadAdapter("a"))
    v.apply(LoadAdapter("a", "gen:8:1"))
    assert v.adapters["a"].path == "/lorainv/adapters/a@2"


def test_abort_frees_through_finish_requests() -> None:
    t = target()
    t.apply(AddRequest("r0", PROMPT, None, 4))
    t.apply(Step())
    assert t.scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == 13
    assert t.apply(Abort("r0")) == [Aborted("r0", "decoding")]
    assert t.tracked["r0"].req.status.name == "FINISHED_ABORTED"
    assert t.scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == 16
    assert t.is_idle()
    assert isinstance(t.apply(Abort("r0"))[0], Rejected)


def test_step_samples_the_oracle_token_and_finishes_by_length() -> None:
    t = target()
    t.apply(AddRequest("r0", PROMPT, None, 2))
    ev = t.apply(Step())
    base = TokenOracle.for_config(CFG, t.dims).identity(None)
    first = next_token(base, PROMPT)
    assert ev == [BatchFormed("prefill", ("r0",), (None,), 1), Scheduled("r0", 9, True), Decoded("r0", first)]
    ev = t.apply(Step())
    second = next_token(base, (*PROMPT, first))
    assert ev == [BatchFormed("decode", ("r0",), (None,), 1), Decoded("r0", second), Finished("r0", "length")]
    assert t.is_idle()


def test_chunked_prefill_and_prefix_hit_are_reported() -> None:
    t = target(CFG.replace(chunked_prefill_size=8))
    t.apply(AddRequest("r0", (*PROMPT, 10, 11), None, 1))
    ev = t.apply(Step())
    assert Scheduled("r0", 8, False) in ev
    ev = t.apply(Step())
    assert Scheduled("r0", 3, True) in ev
    t.apply(AddRequest("r1", PROMPT, None, 1))
    ev = t.apply(Step())
    assert PrefixHit("r1", 8, "cache") in ev


def test_kv_pressure_preempts_with_retracted() -> None:
    cfg = CFG.replace(max_total_tokens=24, chunked_prefill_size=32, max_running_requests=4)
    ops: list[Op] = [AddRequest(f"r{i}", tuple(range(10 * i + 1, 10 * i + 8)), None, 12) for i in range(3)]
    r, found = run([*ops, *[Step()] * 10], cfg)
    assert not found, found
    events = [e for rec in r.records for e in rec.events]
    assert any(isinstance(e, Retracted) and e.reason == "kv" for e in events)
    assert sum(isinstance(e, Finished) for e in events) == 3


def test_max_loras_holds_back_a_third_adapter() -> None:
    ops: list[Op] = [LoadAdapter(n, f"gen:8:{i}") for i, n in enumerate("abc")]
    ops += [AddRequest(f"r{i}", (i + 1, 2, 3), n, 4) for i, n in enumerate("abc")]
    r, found = run([*ops, Step()])
    assert not found, found
    batch = next(e for e in r.records[len(ops)].events if isinstance(e, BatchFormed))
    assert set(batch.adapters) == {"a", "b"}  # c waits: admitting it would make three adapters
    assert any(isinstance(e, BatchFormed) and "c" in e.adapters for rec in r.records for e in rec.events)


# -- the checkers catch broken vLLMs (planted with monkeypatch) --------------------------------
def test_skipping_the_free_on_abort_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    def keep_blocks(self: Scheduler, request: object) -> None:
        del self.requests[request.request_id]  # forgets the request but never frees its blocks

    monkeypatch.setattr(Scheduler, "_free_blocks", keep_blocks)
    _, found = run([AddRequest("r0", PROMPT, None, 4), Step(), Abort("r0")])
    assert "VR1" in kinds(found) and "VB2" in kinds(found)


def test_a_prefix_hit_across_adapters_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    import vllm.v1.core.kv_cache_utils as kcu

    monkeypatch.setattr(kcu, "_gen_lora_extra_hash_keys", lambda request: [])  # hashes ignore the adapter
    ops: list[Op] = [LoadAdapter("a", "gen:8:1"), LoadAdapter("b", "gen:8:2")]
    ops += [AddRequest("r0", PROMPT, "a", 1), Step(), AddRequest("r1", PROMPT, "b", 1), Step()]
    _, found = run(ops)
    assert "VB4" in kinds(found)
    crossed = next(v for v in found if v.invariant == "VB4")
    assert "gen:8:1" in crossed.message and ("r1", 1) in crossed.offenders


def test_a_lost_ref_count_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.v1.core.block_pool import BlockPool

    real = BlockPool.touch

    def touch_once(self: BlockPool, blocks: object) -> None:
        real(self, blocks)
        for b in blocks:
            if b.ref_cnt > 1:
                b.ref_cnt -= 1  # a hit that does not count its second holder

    monkeypatch.setattr(BlockPool, "touch", touch_once)
    ops: list[Op] = [AddRequest("r0", PROMPT, None, 4), Step(), AddRequest("r1", PROMPT, None, 4), Step()]
    _, found = run(ops)
    assert "VB2" in kinds(found)


def test_an_overspent_budget_and_max_loras_are_caught() -> None:
    t = target()
    t.scheduler.max_num_scheduled_tokens = 64  # vLLM ignores the configured budget
    t.scheduler.scheduler_config.max_num_batched_tokens = 64
    t.scheduler.lora_config.max_loras = 3  # and admits a third adapter
    r = TargetRun(t)
    ops: list[Op] = [LoadAdapter(n, f"gen:8:{i}") for i, n in enumerate("abc")]
    ops += [AddRequest(f"r{i}", tuple(range(1, 12)), n, 2) for i, n in enumerate("abc")]
    found = [v for op in [*ops, Step()] for v in r.apply(op).violations]
    assert {"VS1", "VS2"} <= kinds(found)


def test_the_reload_finding_same_path_reuses_kv_of_old_weights() -> None:
    """vLLM keys cached blocks by (LoRA name, path); an unload + load of new weights under the
    same name and path hits blocks computed with the old weights (see
    tests/regressions/vllm/reload_same_path.md). With one path per load there is no hit."""
    ops: list[Op] = [LoadAdapter("a", "gen:8:1"), AddRequest("r0", PROMPT, "a", 1), Step()]
    ops += [UnloadAdapter("a"), LoadAdapter("a", "gen:8:2"), AddRequest("r1", PROMPT, "a", 1), Step()]
    _, found = run(ops)
    assert kinds(found) == {"VB4"}
    _, clean = run(ops, reload_paths="versioned")
    assert not clean


# -- a short Hypothesis run: clean vLLM, every checker, the token oracle and liveness -------------
ADAPTERS = ("a", "b", "c")
op_strategy = st.one_of(
    st.builds(
        lambda i, a, n, m: ("add", i, a, n, m),
        st.integers(0, 3),
        st.sampled_from((None, *ADAPTERS)),
        st.integers(1, 14),
        st.integers(1, 6),
    ),
    st.builds(lambda k: ("abort", k), st.integers(0, 40)),
    st.just(("step",)),
    st.just(("step",)),
    st.builds(lambda a, s: ("reload", a, s), st.sampled_from(ADAPTERS), st.integers(1, 3)),
)


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.lists(op_strategy, max_size=30))
def test_fuzz_clean_vllm(script: list[tuple[object, ...]]) -> None:
    cfg = CFG.replace(max_total_tokens=32, chunked_prefill_size=8)
    r = TargetRun(target(cfg, reload_paths="versioned"))
    for i, a in enumerate(ADAPTERS):
        r.apply(LoadAdapter(a, f"gen:8:{i + 1}"))
    n = 0
    for item in script:
        if item[0] == "add":
            _, base, adapter, length, m = item
            r.apply(AddRequest(f"r{n}", tuple(range(base * 4 + 1, base * 4 + 1 + length)), adapter, m))
            n += 1
        elif item[0] == "abort":
            r.apply(Abort(f"r{item[1] % max(n, 1)}"))
        elif item[0] == "step":
            r.apply(Step())
        else:
            _, a, s = item
            if isinstance(r.apply(UnloadAdapter(a)).events[0], Rejected):
                continue
            r.apply(LoadAdapter(a, f"gen:8:{s}"))
    found = [v for rec in r.records for v in rec.violations] + r.finish()
    assert not found, [str(v) for v in found]


def test_a_wrapper_that_skips_freeing_on_abort_is_caught() -> None:
    from lorainv.targets.vllm import VllmTarget

    class LeakyAbort(VllmTarget):
        def _op_Abort(self, op: Abort) -> list[Event]:
            t = self.tracked[op.rid]
            state, t.state = t.state, "aborted"  # reports the abort, never tells vLLM
            return [Aborted(op.rid, state)]

    r = TargetRun(LeakyAbort(CFG))
    found: list[Violation] = []
    for op in (AddRequest("r0", PROMPT, None, 4), Step(), Abort("r0")):
        found += r.apply(op).violations
    assert {"live", "VR1"} <= kinds(found)


def test_the_model_refuses_a_target_that_reports_a_token_too_many() -> None:
    from lorainv.targets.vllm import VllmTarget

    class Chatty(VllmTarget):
        def _op_Step(self, op: Step) -> list[Event]:
            ev = super()._op_Step(op)
            return [*ev, *[Decoded(e.rid, 0) for e in ev if isinstance(e, Finished)]]

    r = TargetRun(Chatty(CFG))
    found: list[Violation] = []
    for op in (AddRequest("r0", PROMPT, None, 1), Step()):
        found += r.apply(op).violations
    assert any(v.pool == "model" and v.invariant == "refinement" for v in found)


VLLM_TRACES = sorted((Path(__file__).parent.parent / "regressions" / "vllm").glob("*.json"))


@pytest.mark.parametrize("path", VLLM_TRACES, ids=lambda p: p.stem)
def test_vllm_regression_traces_replay_as_expected(path: Path) -> None:
    """Every trace under tests/regressions/vllm/ ends as its ``expect`` says, and its analysis
    (the .md of the same name) exists."""
    from lorainv.targets.drive import replay_on_target, trace_target
    from lorainv.trace import load

    trace = load(path)
    assert trace_target(trace)[0] == "vllm"
    found, _, _ = replay_on_target(trace)
    if trace.expect is None:
        assert not found, found
    else:
        assert any(v.pool == trace.expect["pool"] and v.invariant == trace.expect["invariant"] for v in found)
    assert path.with_suffix(".md").exists()


def test_a_hash_missing_from_the_cache_map_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.v1.core.block_pool import BlockPool

    def hash_only(self: BlockPool, key: object, block: object, num_tokens: int | None) -> None:
        block.set_block_hash(key, num_tokens=num_tokens)  # the map never learns of it

    monkeypatch.setattr(BlockPool, "_insert_block_hash", hash_only)
    _, found = run([AddRequest("r0", PROMPT, None, 2), Step()])
    assert "VB5" in kinds(found)
