"""One campaign shard: the loop behind ``lorainv fuzz``, shared by the CLI (in process), local
worker processes and Ray tasks (`lorainv.testing.workers`), so all three run the same code.

A shard is a seed stream, a mode list (``fast``/``numeric`` rounds in turn), a fault slice and
a budget (`ShardSpec`, picklable). `run_shard` first replays the examples the example database
holds for the shard's machines (a failure found last night replays first tonight), then runs
small rounds of `run_campaign` (25 fast or 3 numeric examples, so the time budget stays
tight) with seeds ``seed * 1000 + round + shard * 2**32`` until the budget is spent, a stop is
requested, or (``stop_on_first``) a failure is found. It returns a `ShardReport`: plain,
picklable data (counts, the sets of distinct states and transitions, the coverage counters,
the failures with their traces as JSON text).

The shard talks to its driver only through `ShardHooks` (progress, stop, "is this the first
failure?"), which each backend implements with its own library facilities.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

SEED_STRIDE = 2**32  # shard i's seeds are offset by i * SEED_STRIDE; shard 0 keeps the historic stream
FAST_CHUNK, NUMERIC_CHUNK = 25, 3  # examples per round
PROGRESS_EVERY_S = 0.5
STOP_POLL_S = 0.5


@dataclass(frozen=True)
class ShardSpec:
    """What one shard explores. Immutable and picklable (it crosses process and node borders).

    ``deadline``: wall-clock time (``time.time()``) at which the shard stops; None for none.
    ``max_examples``: this shard's share of the example budget (replayed examples count); None for none.
    ``replay``: the modes whose saved examples this shard replays first (each machine's
    saved examples are replayed by one shard only). ``db``: an `lorainv.testing.exampledb` spec.
    """

    index: int
    seed: int
    modes: tuple[str, ...]
    faults: frozenset[str] = frozenset()
    strict: int = 0
    policy: frozenset[str] | None = None
    max_examples: int | None = None
    deadline: float | None = None
    shrink: bool = True
    stop_on_first: bool = True
    db: str = "none"
    replay: tuple[str, ...] = ()
    checkers: tuple[str, ...] = ()
    generate: bool = True  # False: the replay pass only

    @property
    def fault_label(self) -> str:
        """The fault slice as one string (``none`` without faults): part of a failure's key."""
        return ",".join(sorted(self.faults)) or "none"

    def machine_name(self, mode: str) -> str:
        """The machine's name for ``mode``: the example database's key and the traces' file
        prefix. Shards with the same mode, faults, strict level and policy share it (and their
        saved examples); any of those differing gives another name, so a failure saved with one
        fault is never replayed (and deleted) by a run without it."""
        extra = (sorted(self.faults), self.strict, None if self.policy is None else sorted(self.policy))
        if extra == ([], 0, None):
            return f"fuzz-{mode}"
        return f"fuzz-{mode}-{hashlib.sha1(json.dumps(extra).encode()).hexdigest()[:8]}"

    def round_seed(self, rnd: int) -> int:
        return self.seed * 1000 + rnd + self.index * SEED_STRIDE


@dataclass
class Progress:
    """One progress message from a shard (picklable). The sets hold only what is new since
    the shard's previous message, so the driver's union is the number of distinct states."""

    shard: int
    mode: str
    examples: int
    ops: int
    new_states: set[Any] = field(default_factory=set)
    new_transitions: set[Any] = field(default_factory=set)
    new_failures: list[tuple[str, str, str]] = field(default_factory=list)
    done: bool = False


@dataclass
class FailureReport:
    """A failure a shard found. ``trace_json`` is the whole trace, so it reaches the driver even
    from another machine; ``trace_file`` is its file name (the driver saves it under its own
    trace directory); ``trace_path`` is where the shard saved it."""

    pool: str
    invariant: str
    message: str
    fault: str
    mode: str
    shard: int
    phase: str  # "replay" (from the example database) or "generate"
    examples_before: int  # examples that passed in this shard before the failing one (0: the first failed)
    seconds: float  # since the shard started
    shrunk: bool  # shrinking was on and not given up (Hypothesis does not shrink a replayed example again)
    first: bool  # the first failure of the whole campaign (the one that was shrunk)
    trace_ops: int
    trace_file: str
    trace_path: str
    trace_json: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.pool, self.invariant, self.fault)


@dataclass
class ShardReport:
    """What a shard did. Plain data; `merge` combines several."""

    shard: int
    examples: int = 0
    ops: int = 0
    replayed: int = 0  # saved examples replayed from the database (passing, and the failing one)
    states: set[Any] = field(default_factory=set)
    transitions: set[Any] = field(default_factory=set)
    counters: dict[str, Counter[Any]] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    failures: list[FailureReport] = field(default_factory=list)
    seconds: float = 0.0
    stop_reason: str = ""  # budget | examples | stop | failure | interrupted

    def absorb(self, r: ShardReport) -> None:
        """Add ``r``'s counts, states, transitions, counters, rounds and failures to this
        report (mutates this one; ``seconds`` and ``stop_reason`` are the caller's to combine)."""
        self.examples += r.examples
        self.ops += r.ops
        self.replayed += r.replayed
        self.states |= r.states
        self.transitions |= r.transitions
        for k, c in r.counters.items():
            self.counters.setdefault(k, Counter()).update(c)
        self.rounds.extend(r.rounds)
        self.failures.extend(r.failures)


class ShardHooks(Protocol):
    """How a shard reaches its driver. Every method may be called often; implementations keep
    them cheap (the shard throttles `progress` and `should_stop` itself)."""

    def progress(self, msg: Progress) -> None: ...

    def should_stop(self) -> bool: ...

    def request_stop(self) -> None: ...

    def failure_claimed(self) -> bool: ...

    def claim_failure(self) -> bool:
        """True for exactly one caller over the whole campaign: the first failure."""
        ...


class Flags:
    """The stop and first-failure flags of a campaign held in one object (mutated by
    `request_stop` and `claim_failure`): the in-process hooks and the Ray coordinator."""

    def __init__(self) -> None:
        self.stop = False
        self.claimed = False

    def should_stop(self) -> bool:
        return self.stop

    def request_stop(self) -> None:
        self.stop = True

    def failure_claimed(self) -> bool:
        return self.claimed

    def claim_failure(self) -> bool:
        first, self.claimed = not self.claimed, True
        return first


class LocalHooks(Flags):
    """Hooks for a shard running in the driver's own process (one worker)."""

    def __init__(self, on_progress: Callable[[Progress], None] | None = None) -> None:
        super().__init__()
        self.on_progress = on_progress

    def progress(self, msg: Progress) -> None:
        if self.on_progress is not None:
            self.on_progress(msg)


def _merge_stats(rep: ShardReport, stats: dict[str, Any], examples: int, ops: int) -> None:
    from lorainv.testing.machine import COVERAGE_COUNTERS

    rep.examples += examples
    rep.ops += ops
    rep.states |= stats.get("states", set())
    rep.transitions |= stats.get("transitions", set())
    for k in COVERAGE_COUNTERS:
        rep.counters.setdefault(k, Counter()).update(stats.get(k, Counter()))


def freeze_startup() -> None:
    """Once per process: freeze the objects alive now (`gc.freeze`). The start-up object graph
    (torch, Hypothesis, lorainv: over a million objects) lives as long as the process; frozen,
    the cyclic collector stops re-walking it on every full collection (measured: about 5-8 %
    more ops/s on ``lorainv fuzz --fast``). Once per process, so a long-lived caller (a test
    run calling shards in-process) does not freeze its later objects too. No collection first:
    a full one over that graph is a long window in which a Ctrl-C is lost (see
    ``lorainv.cli.fuzz._ctrl_c_also_stops``)."""
    if _FROZEN:
        return
    import gc

    gc.freeze()
    _FROZEN.append(True)


_FROZEN: list[bool] = []


def run_shard(spec: ShardSpec, hooks: ShardHooks) -> ShardReport:
    """Run one shard to its budget (see the module docstring) and report.

    The caller enters `lorainv.cli.common.user_extensions` with ``spec.checkers`` first. A
    KeyboardInterrupt (Ctrl-C in the driver's process) ends the shard with ``stop_reason``
    ``interrupted`` and the work of the interrupted round counted; it is not re-raised.
    Mutates nothing outside the example database and the trace directory.
    """
    from lorainv.testing.campaign import run_campaign
    from lorainv.testing.exampledb import database_from_spec

    freeze_startup()
    db = database_from_spec(spec.db)
    t0 = time.monotonic()
    rep = ShardReport(shard=spec.index)
    overrides = {"strict_mem_check": spec.strict} if spec.strict else {}
    sent_states: set[Any] = set()
    sent_trans: set[Any] = set()
    sent_failures: list[tuple[str, str, str]] = []
    last_msg = [0.0]
    last_poll = [0.0]
    live: dict[str, Any] = {}  # the running round's cumulative stats, as its last example left them

    def send(mode: str, stats: dict[str, Any], done: bool = False) -> None:
        states = rep.states | stats.get("states", set())
        trans = rep.transitions | stats.get("transitions", set())
        msg = Progress(
            shard=spec.index,
            mode=mode,
            examples=rep.examples + stats.get("examples", 0),
            ops=rep.ops + stats.get("ops", 0),
            new_states=states - sent_states,
            new_transitions=trans - sent_trans,
            new_failures=[f.key for f in rep.failures if f.key not in sent_failures],
            done=done,
        )
        sent_states.update(msg.new_states)
        sent_trans.update(msg.new_transitions)
        sent_failures.extend(msg.new_failures)
        hooks.progress(msg)

    def stop_now() -> bool:
        if spec.deadline is not None and time.time() >= spec.deadline:
            return True
        now = time.monotonic()
        if now - last_poll[0] >= STOP_POLL_S:
            last_poll[0] = now
            return hooks.should_stop()
        return False

    claims: list[bool] = []  # this round's answer to "is it the campaign's first failure?"

    def claim_once() -> bool:
        if not claims:
            claims.append(hooks.claim_failure())
        return claims[0]

    def campaign(mode: str, rnd: int, chunk: int, shrink: bool, replay_only: bool) -> Any:
        live.clear()
        claims.clear()

        def progress(stats: dict[str, Any]) -> None:
            live.update(stats=stats, mode=mode)
            now = time.monotonic()
            if now - last_msg[0] >= PROGRESS_EVERY_S:
                last_msg[0] = now
                send(mode, stats)

        return run_campaign(
            max_examples=chunk,
            seed=spec.round_seed(rnd),
            faults=spec.faults,
            network="tiny" if mode == "numeric" else "dummy",
            numeric=mode == "numeric",
            overrides=overrides,
            policy=spec.policy,
            progress=progress,
            name=spec.machine_name(mode),
            shrink=shrink,
            database=db,
            replay_only=replay_only,
            stop=None if replay_only else stop_now,
            claim=claim_once if shrink else None,
        )

    def record(res: Any, mode: str, phase: str, shrink: bool) -> None:
        examples_before = rep.examples
        _merge_stats(rep, res.stats, res.examples, res.ops)
        rep.rounds.append(
            {"shard": spec.index, "mode": mode, "phase": phase, "examples": res.examples, "ops": res.ops}
            | {"seconds": res.seconds}
        )
        if phase == "replay":  # replay stops at the first saved example that still fails
            rep.replayed += (res.passed_before_failure or 0) + 1 if res.found else res.examples
        if res.found and res.trace is not None:
            trace = res.trace
            first = claim_once()
            path = res.trace_path or ""
            text = json.dumps(trace.to_dict(), indent=1) + "\n"
            digest = hashlib.sha1(text.encode()).hexdigest()[:10]
            rep.failures.append(
                FailureReport(
                    pool=str(trace.expect["pool"]),
                    invariant=str(trace.expect["invariant"]),
                    message=str(trace.meta.get("message", res.error)),
                    fault=spec.fault_label,
                    mode=mode,
                    shard=spec.index,
                    phase=phase,
                    examples_before=examples_before + (res.passed_before_failure or 0),
                    seconds=time.monotonic() - t0,
                    shrunk=res.shrunk,
                    first=first,
                    trace_ops=len(trace.ops),
                    trace_file=Path(path).name or f"{spec.machine_name(mode)}-{digest}.json",
                    trace_path=path,
                    trace_json=text,
                )
            )

    def round_over(res: Any) -> bool:
        """Whether the shard ends after this round (recording why)."""
        if res.found and spec.stop_on_first:
            hooks.request_stop()
            rep.stop_reason = "failure"
            return True
        if res.stopped:
            rep.stop_reason = "budget" if spec.deadline is not None and time.time() >= spec.deadline else "stop"
            return True
        return False

    mode = spec.modes[0]
    try:
        for mode in spec.replay if db is not None else ():
            shrink = spec.shrink and not hooks.failure_claimed()
            res = campaign(mode, 0, 10, shrink, replay_only=True)
            record(res, mode, "replay", shrink)
            if round_over(res):
                break
        rnd = 0
        while spec.generate and not rep.stop_reason:
            left = None if spec.max_examples is None else spec.max_examples - rep.examples
            if left is not None and left <= 0:
                rep.stop_reason = "examples"
                break
            if stop_now():
                rep.stop_reason = "budget" if spec.deadline is not None and time.time() >= spec.deadline else "stop"
                break
            mode = spec.modes[rnd % len(spec.modes)]
            chunk = FAST_CHUNK if mode == "fast" else NUMERIC_CHUNK
            chunk = chunk if left is None else max(1, min(chunk, left))
            shrink = spec.shrink and not hooks.failure_claimed()
            res = campaign(mode, rnd, chunk, shrink, replay_only=False)
            record(res, mode, "generate", shrink)
            rnd += 1
            if round_over(res):
                break
    except KeyboardInterrupt:
        stats = live.get("stats", {})
        _merge_stats(rep, stats, stats.get("examples", 0), stats.get("ops", 0))
        rep.stop_reason = "interrupted"
    rep.seconds = time.monotonic() - t0
    send(mode, {}, done=True)
    return rep


# -- waves and merging ------------------------------------------------------------------------------
def waves(specs: list[ShardSpec]) -> tuple[list[ShardSpec], list[ShardSpec]]:
    """Split parallel shards into a replay wave (each shard with saved examples to replay, doing
    only that) and a generate wave (every shard, replaying nothing), so that the database's
    failures are replayed before any shard generates new examples."""
    replay = [dataclasses.replace(s, generate=False) for s in specs if s.replay and s.db.strip().lower() != "none"]
    generate = [dataclasses.replace(s, replay=()) for s in specs]
    return replay, generate


def combine(reports: list[ShardReport]) -> list[ShardReport]:
    """One report per shard index (a shard ran in both waves): counts and sets added up,
    the later wave's stop reason kept unless the first ended the campaign."""
    by: dict[int, ShardReport] = {}
    for r in reports:
        if r.shard not in by:
            by[r.shard] = r
            continue
        t = by[r.shard]
        t.absorb(r)
        t.seconds += r.seconds
        t.stop_reason = r.stop_reason or t.stop_reason
    return [by[k] for k in sorted(by)]


# -- merging ---------------------------------------------------------------------------------------
def pick_failures(reports: list[ShardReport]) -> list[tuple[FailureReport, int]]:
    """The failures deduplicated by ``(pool, invariant, fault)``: for each key the campaign's
    first (shrunk) one if it is among them, else a shrunk one, else the earliest; with how
    many times the key was found. Ordered by when each key was first found."""
    groups: dict[tuple[str, str, str], list[FailureReport]] = {}
    for f in sorted((f for r in reports for f in r.failures), key=lambda f: f.seconds):
        groups.setdefault(f.key, []).append(f)
    out = []
    for fs in groups.values():
        best = min(fs, key=lambda f: (not f.first, not f.shrunk, f.seconds))
        out.append((best, len(fs)))
    return out


def merge(reports: list[ShardReport]) -> ShardReport:
    """All shards as one report (shard index -1): sums, unions of states and transitions,
    summed coverage counters, every round and failure."""
    total = ShardReport(shard=-1)
    for r in sorted(reports, key=lambda r: r.shard):
        total.absorb(r)
        total.seconds = max(total.seconds, r.seconds)
    reasons = {r.stop_reason for r in reports}
    total.stop_reason = next((x for x in ("interrupted", "failure", "stop", "budget", "examples") if x in reasons), "")
    return total


# -- planning ------------------------------------------------------------------------------------
def plan_shards(
    *,
    workers: int,
    seed: int,
    modes: list[str],
    faults: frozenset[str],
    strict: int,
    policy: frozenset[str] | None,
    max_examples: int | None,
    deadline: float | None,
    shrink: bool,
    stop_on_first: bool,
    db: str,
    checkers: list[str],
) -> list[ShardSpec]:
    """Split a campaign into ``workers`` shards (fewer if the example budget is smaller).

    * seeds: shard i's stream is offset by ``i * SEED_STRIDE`` (shard 0 = the one-worker run);
    * modes: the mode list rotated by i, so the numeric rounds of different shards interleave;
    * faults: with one worker, all of them together (as always); with several, a slice each,
      round-robin over the sorted names (``len(faults) < workers``: one fault each, in turn),
      so every fault gets its own config set-up (`FAULT_SETUPS`) and its own hunter;
    * examples: the budget split as evenly as possible; the deadline is shared;
    * replay: each distinct machine (mode, faults, strict, policy) is replayed by the first
      shard that runs it.
    """
    n = workers if max_examples is None else max(1, min(workers, max_examples))
    names = sorted(faults)
    specs: list[ShardSpec] = []
    seen: set[str] = set()
    for i in range(n):
        if n == 1 or not names:
            mine = frozenset(names)
        elif len(names) < n:
            mine = frozenset({names[i % len(names)]})
        else:
            mine = frozenset(names[i::n])
        rot = i % len(modes)
        shard_modes = tuple(modes[rot:] + modes[:rot])
        share = None if max_examples is None else max_examples // n + (1 if i < max_examples % n else 0)
        spec = ShardSpec(
            index=i,
            seed=seed,
            modes=shard_modes,
            faults=mine,
            strict=strict,
            policy=policy,
            max_examples=share,
            deadline=deadline,
            shrink=shrink,
            stop_on_first=stop_on_first,
            db=db,
            checkers=tuple(checkers),
        )
        replay = []
        for m in dict.fromkeys(shard_modes):
            if spec.machine_name(m) not in seen:
                seen.add(spec.machine_name(m))
                replay.append(m)
        specs.append(ShardSpec(**{**spec.__dict__, "replay": tuple(replay)}))
    return specs
