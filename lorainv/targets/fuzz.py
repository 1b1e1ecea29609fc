"""A Hypothesis campaign against any `Target` that is not lorainv's engine (``lorainv fuzz
--target vllm``): a rule-based machine whose rules are only the ops in the target's
capabilities, every op checked by `TargetRun` (the target's model, its checkers, the token
oracle), liveness at teardown, the shrunk failing trace saved with its target.

Inputs are biased towards the situations the target's checkers are about: prompts start
with one of a few shared prefixes (prefix hits, and the chance of a hit across adapters or
salts), adapters are reloaded under the same name with other weights, KV caches are small
(preemption) and chunks short (chunked prefill). Coverage counters say which were reached.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, settings
from hypothesis import seed as hyp_seed
from hypothesis import strategies as st
from hypothesis.errors import Flaky
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule, run_state_machine_as_test

from lorainv.config import RuntimeConfig
from lorainv.errors import Violation
from lorainv.events import Aborted, Finished, PrefixHit, Queued, Rejected, Retracted, Scheduled
from lorainv.ops import Abort, AddRequest, LoadAdapter, Op, Step, UnloadAdapter
from lorainv.targets.base import make_target
from lorainv.targets.drive import TargetRun
from lorainv.trace import Trace

ADAPTERS = ("a", "b", "c")
SALTS = (None, None, None, "t1", "t2")
# the coverage counters a campaign reports (each must be reached for the "done when")
COUNTERS = (
    "abort",
    "chunked_prefill",
    "preemption",
    "prefix_hit",
    "prefix_shared_across_adapters",
    "prefix_shared_across_salts",
    "reload_other_weights",
    "max_loras_full_step",
    "max_loras_held_back",
)


def configs() -> st.SearchStrategy[RuntimeConfig]:
    """Small engines: a few blocks (preemption), short chunks, one to three adapters per step."""

    @st.composite
    def build(draw: Any) -> RuntimeConfig:
        ps = draw(st.sampled_from((1, 2, 4)))
        tokens = draw(st.sampled_from((24, 32, 48, 64)))  # a request of up to 26 tokens fits
        return RuntimeConfig(
            network="dummy",
            page_size=ps,
            max_total_tokens=tokens,
            max_running_requests=draw(st.integers(1, 6)),
            chunked_prefill_size=draw(st.sampled_from((6, 8, 12, 32))),
            max_loras_per_batch=draw(st.integers(1, 3)),
            enable_prefix_cache=draw(st.sampled_from((True, True, True, False))),
        )

    return build()


@dataclass
class CampaignStats:
    examples: int = 0
    ops: int = 0
    counters: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)


@dataclass
class TargetCampaignResult:
    found: bool
    trace: Trace | None
    trace_path: str | None
    seconds: float
    stats: CampaignStats
    message: str = ""


def make_machine(target_name: str, target_kw: dict[str, Any], stats: CampaignStats) -> Any:
    """A fresh machine class for ``target_name`` that records into ``stats`` (mutated)."""

    class TargetMachine(RuleBasedStateMachine):
        last_failure: Trace | None = None
        last_message: str = ""

        def __init__(self) -> None:
            super().__init__()
            self.run: TargetRun | None = None
            self.cfg: RuntimeConfig | None = None
            self.n = 0
            self.sources: dict[str, str] = {}  # registered adapter -> its weights
            self.seen: dict[tuple[int, ...], set[tuple[str | None, str | None]]] = {}
            self.live: set[str] = set()  # queued and not yet finished or aborted, from the events
            stats.examples += 1

        @initialize(cfg=configs())
        def setup(self, cfg: RuntimeConfig) -> None:
            self.cfg = cfg
            self.run = TargetRun(make_target(target_name, cfg, **target_kw))
            self.ops_allowed = self.run.target.capabilities.ops

        # -- rules: one per op kind, enabled only if the target supports it --------------------
        def _do(self, op: Op) -> None:
            assert self.run is not None
            rec = self.run.apply(op)
            stats.ops += 1
            for ev in rec.events:
                stats.events[ev.kind] += 1
                if isinstance(ev, Queued):
                    self.live.add(ev.rid)
                elif isinstance(ev, (Finished, Aborted)):
                    self.live.discard(ev.rid)
                self._count(op, ev)
            if rec.events and isinstance(rec.events[0], Rejected):
                stats.rejected[op.kind] += 1
            elif isinstance(op, LoadAdapter):
                self.sources[op.name] = op.source
            elif isinstance(op, UnloadAdapter):
                self.sources.pop(op.name, None)
            if isinstance(op, Step):
                self._count_step()
            self._fail_on(rec.violations)

        def _count(self, op: Op, ev: Any) -> None:
            c = stats.counters
            if isinstance(ev, Aborted):
                c["abort"] += 1
                c[f"abort_{ev.state}"] += 1
            elif isinstance(ev, Scheduled) and not ev.done:
                c["chunked_prefill"] += 1
            elif isinstance(ev, Retracted):
                c["preemption"] += 1
            elif isinstance(ev, PrefixHit):
                c["prefix_hit"] += 1

        def _count_step(self) -> None:
            t: Any = self.run.target if self.run is not None else None
            if t is None or not hasattr(t, "last_loras"):
                return
            if t.last_loras and len(t.last_loras) == t.max_loras:
                stats.counters["max_loras_full_step"] += 1
                waiting = [
                    tr.req.lora_request.lora_int_id
                    for tr in t.tracked.values()
                    if tr.state == "waiting" and tr.req.lora_request is not None
                ]
                if any(lid not in t.last_loras for lid in waiting):
                    stats.counters["max_loras_held_back"] += 1

        def _fail_on(self, violations: list[Violation]) -> None:
            if not violations:
                return
            v = violations[0]
            assert self.run is not None and self.cfg is not None
            trace = Trace(
                self.cfg,
                tuple(self.run.ops),
                expect={"pool": v.pool, "invariant": v.invariant},
                meta={"target": target_name, "target_options": dict(target_kw), "message": str(v)},
            )
            if "target" in {f.name for f in dataclasses.fields(Trace)}:  # traces record their target
                trace = dataclasses.replace(trace, target=target_name)
            type(self).last_failure = trace
            type(self).last_message = str(v)
            raise AssertionError(str(v))

        @precondition(lambda self: "LoadAdapter" in self.ops_allowed and len(self.sources) < len(ADAPTERS))
        @rule(data=st.data(), rank=st.sampled_from((1, 4, 8)), seed=st.integers(1, 3))
        def load(self, data: Any, rank: int, seed: int) -> None:
            free = [a for a in ADAPTERS if a not in self.sources]
            self._do(LoadAdapter(data.draw(st.sampled_from(free)), f"gen:{rank}:{seed}"))

        @precondition(lambda self: "UnloadAdapter" in self.ops_allowed and "LoadAdapter" in self.ops_allowed)
        @precondition(lambda self: bool(self.sources))
        @rule(data=st.data(), seed=st.integers(1, 3))
        def reload(self, data: Any, seed: int) -> None:
            """Unload, then load other weights under the same name (a serving-layer reload);
            refused while a live request uses the adapter."""
            name = data.draw(st.sampled_from(sorted(self.sources)))
            old = self.sources[name]
            self._do(UnloadAdapter(name))
            if name not in self.sources:
                source = f"gen:8:{seed}"
                if source != old:
                    stats.counters["reload_other_weights"] += 1
                self._do(LoadAdapter(name, source))

        @precondition(lambda self: "AddRequest" in self.ops_allowed)
        @rule(
            data=st.data(),
            prefix=st.sampled_from((0, 0, 1, 2)),
            extra=st.lists(st.integers(0, 1023), max_size=6),
            plen=st.sampled_from((0, 4, 8, 8, 12, 12)),
            salt=st.sampled_from(SALTS),
            max_new=st.integers(1, 8),
        )
        def add(self, data: Any, prefix: int, extra: list[int], plen: int, salt: str | None, max_new: int) -> None:
            assert self.cfg is not None
            # mostly a registered adapter or the base model; now and then an unknown name
            adapter = data.draw(st.sampled_from((None, None, *sorted(self.sources), *sorted(self.sources), "zz")))
            prompt = tuple(range(100 * prefix + 1, 100 * prefix + 1 + plen)) + tuple(extra)
            if not prompt:
                prompt = (7,)
            rid = f"r{self.n}"
            self.n += 1
            self._note_sharing(prompt, adapter, salt)
            self._do(AddRequest(rid, prompt, adapter, max_new, salt))

        def _note_sharing(self, prompt: tuple[int, ...], adapter: str | None, salt: str | None) -> None:
            """Count requests whose first block of tokens was already queued under other
            weights or another salt: a chance for a hit that must not happen."""
            assert self.cfg is not None
            ps = self.cfg.page_size
            if len(prompt) <= ps or (adapter is not None and adapter not in self.sources):
                return
            key = prompt[:ps]
            me = (None if adapter is None else self.sources[adapter], salt)
            before = self.seen.setdefault(key, set())
            if any(w != me[0] and s == salt for w, s in before):
                stats.counters["prefix_shared_across_adapters"] += 1
            if any(s != salt and w == me[0] for w, s in before):
                stats.counters["prefix_shared_across_salts"] += 1
            before.add(me)

        @precondition(lambda self: "Abort" in self.ops_allowed and self.n > 0)
        @rule(data=st.data(), any_rid=st.integers(0, 9))
        def abort(self, data: Any, any_rid: int) -> None:
            """Abort a live request (3 in 10), any request ever queued (1 in 10), else step: aborts
            as often as steps would end most requests before they run."""
            if any_rid > 3:
                self._do(Step())
                return
            pool = sorted(self.live) if self.live and any_rid else [f"r{i}" for i in range(self.n)]
            self._do(Abort(data.draw(st.sampled_from(pool))))

        @precondition(lambda self: "Step" in self.ops_allowed)
        @rule(n=st.integers(1, 4))
        def step(self, n: int) -> None:
            for _ in range(n):
                self._do(Step())

        def teardown(self) -> None:
            if self.run is None:
                return
            self._fail_on(self.run.finish())

    return TargetMachine


def run_target_campaign(
    target_name: str,
    *,
    max_examples: int = 100,
    seconds: float | None = None,
    seed: int = 0,
    steps: int = 40,
    target_kw: dict[str, Any] | None = None,
    progress: Callable[[CampaignStats], None] | None = None,
    save_dir: str | Path | None = None,
) -> TargetCampaignResult:
    """Run rounds of ``target_name``'s machine until ``max_examples`` examples or ``seconds``
    pass, or a violation is found (then shrunk and saved under ``save_dir``)."""
    from lorainv.trace import save, trace_dir

    stats = CampaignStats()
    kw = dict(target_kw or {})
    t0 = time.monotonic()
    rnd = 0
    while stats.examples < max_examples and (seconds is None or time.monotonic() - t0 < seconds):
        machine = make_machine(target_name, kw, stats)
        chunk = min(20, max_examples - stats.examples)
        s = settings(
            max_examples=chunk,
            stateful_step_count=steps,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate, Phase.shrink],
            report_multiple_bugs=False,
            suppress_health_check=list(HealthCheck),
            print_blob=False,
        )
        try:
            run_state_machine_as_test(hyp_seed(seed * 1000 + rnd)(machine), settings=s)
        except (AssertionError, Flaky) as e:
            trace = machine.last_failure
            path = None
            if trace is not None:
                d = Path(save_dir) if save_dir is not None else trace_dir()
                d.mkdir(parents=True, exist_ok=True)
                path = str(save(trace, d / f"{target_name}-seed{seed}-{int(time.time())}.json"))
            msg = machine.last_message or str(e).splitlines()[0]
            return TargetCampaignResult(True, trace, path, time.monotonic() - t0, stats, msg)
        rnd += 1
        if progress is not None:
            progress(stats)
    return TargetCampaignResult(False, None, None, time.monotonic() - t0, stats)


def coverage(stats: CampaignStats) -> dict[str, Any]:
    """The counters of `COUNTERS` (zero when never reached), event kinds and rejected ops."""
    return {
        "counters": {k: stats.counters.get(k, 0) for k in COUNTERS},
        "abort_by_state": {k[6:]: v for k, v in stats.counters.items() if k.startswith("abort_")},
        "events": dict(stats.events),
        "rejected": dict(stats.rejected),
        "never_reached": [k for k in COUNTERS if not stats.counters.get(k)],
    }


def parse_target_options(items: list[str] | None) -> dict[str, Any]:
    """``["reload_paths=versioned", ...]`` -> keyword arguments of the target's constructor
    (values stay strings; ``true``/``false`` and integers are converted)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            from lorainv.errors import ConfigError

            raise ConfigError(f"--target-option expects KEY=VALUE, got {item!r}")
        value: Any = raw
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        elif raw.lstrip("-").isdigit():
            value = int(raw)
        out[key] = value
    return out


def cmd_fuzz_target(a: Any, out: Any) -> int:
    """``lorainv fuzz --target NAME`` for a target other than lorainv's engine: the campaign of
    this module for ``--minutes`` (default 0.75) or ``--max-examples``; prints a summary and the
    coverage counters, writes ``--json``; exit 1 with the shrunk trace when a checker fires."""
    import json

    from lorainv.targets.base import make_target

    kw = parse_target_options(getattr(a, "target_option", None))
    make_target(a.target, RuntimeConfig(network="dummy"), **kw)  # a bad name or option fails before the run
    minutes = a.minutes if a.minutes is not None else (0.75 if a.max_examples is None else None)
    limit = a.max_examples if a.max_examples is not None else 10**9
    opts = "".join(f" {k}={v}" for k, v in kw.items())
    out.write(f"lorainv fuzz: target {a.target}{opts}, seed {a.seed}\n")
    res = run_target_campaign(
        a.target, max_examples=limit, seconds=None if minutes is None else 60 * minutes, seed=a.seed, target_kw=kw
    )
    cov = coverage(res.stats)
    dt = max(res.seconds, 1e-9)
    rows = [
        ("examples", res.stats.examples),
        ("ops", res.stats.ops),
        ("ops/s", f"{res.stats.ops / dt:.0f}"),
        ("wall time", f"{res.seconds:.1f}s"),
        ("violations", int(res.found)),
    ]
    out.write("\n  summary\n  " + "-" * 32 + "\n")
    for k, v in rows:
        out.write(f"  {k:<18}{v:>14}\n")
    out.write("\n  coverage\n  " + "-" * 32 + "\n")
    for k, v in cov["counters"].items():
        out.write(f"  {k:<32}{v:>6}\n")
    if cov["never_reached"]:
        out.write(f"  never reached: {', '.join(cov['never_reached'])}\n")
    report: dict[str, Any] = {
        "target": a.target,
        "target_options": kw,
        "seed": a.seed,
        "examples": res.stats.examples,
        "ops": res.stats.ops,
        "ops_per_s": res.stats.ops / dt,
        "seconds": res.seconds,
        "violations": int(res.found),
        "coverage": cov,
    }
    if res.found and res.trace is not None:
        report.update(
            violation=res.message, expect=res.trace.expect, trace=res.trace_path, trace_ops=len(res.trace.ops)
        )
        out.write(f"\nVIOLATION ({res.trace.expect}): {res.message}\n")
        out.write(f"shrunk trace: {len(res.trace.ops)} ops -> {res.trace_path}\n")
        out.write(f"replay with:  lorainv replay {res.trace_path}\n")
    else:
        out.write("\nclean: no violation found\n")
    if getattr(a, "json", None):
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 1 if res.found else 0


def target_machine(target_name: str, **target_kw: Any) -> Any:
    """The campaign's machine for ``target_name`` as a pytest test case, like lorainv's
    machine: ``TestVllm = target_machine("vllm").TestCase`` (stats are kept on ``.stats``)."""
    stats = CampaignStats()
    machine = make_machine(target_name, target_kw, stats)
    machine.stats = stats
    return machine
