"""Soak: a long run of seeded random traffic, checked after every op, that must end with
zero violations and zero leaked tokens, rows or slots.

The traffic goes through `lorainv.testing.harness.Harness` (engine and reference model in
lockstep, every checker after every op) with the engine at strict level 2 on the dummy
network: 64 adapters (``gen:<rank>:<seed>``, zipf popularity) over 4 LoRA slots with overlap
loading, ~20% of requests aborted at a random later point, a small KV pool (retraction
pressure) with shared prompt prefixes (prefix cache), streaming sessions, pins, adapter
unload/reload churn and injected load faults (``FailTransfers``).

By default all ops run on one engine; ended requests are forgotten past
``max_finished_requests`` (by the engine and the reference model alike), so the per-op check
cost stays flat. ``--episode-ops N`` splits the run into episodes on fresh harnesses instead.
At the end of each episode the harness drains to idle (liveness + idle leak check), then
every session is closed and every adapter unloaded; what is still held is a leak:

* tokens: ``total - available - evictable`` (the prefix cache's evictable tokens are free
  memory; nothing else may hold any);
* rows: ``req_to_token`` rows not free; slots: LoRA slots held by anything but the base model.

Run ``lorainv bench soak [--quick] [--ops N] [--seed S] [--out DIR_OR_JSON]``; writes
``bench/results/soak.json`` (``--quick``: a temporary directory) and prints a table. Exit 1 on
any violation or leak.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorainv import __version__
from lorainv import ops as O
from lorainv.config import RuntimeConfig
from lorainv.errors import Violation
from lorainv.testing.harness import Harness

from . import common

RESULTS = common.RESULTS_DIR / "soak.json"
FULL_OPS = 100_000
QUICK_OPS = 5_000
EPISODE_OPS = 0  # one engine for the whole run
NUM_ADAPTERS = 64
RANKS = (1, 2, 4, 8, 16)
SESSIONS = ("s0", "s1", "s2", "s3")
ABORT_FRACTION = 0.2
MAX_LIVE = 24
PREFIXES = (tuple(range(3, 19)), tuple(range(40, 52)), (7, 7, 7, 7, 7, 7, 7, 7))


def soak_config(seed: int, faults: frozenset[str] = frozenset()) -> RuntimeConfig:
    return RuntimeConfig(
        network="dummy",
        strict_mem_check=2,
        max_loras_per_batch=4,
        max_lora_rank=max(RANKS),
        enable_lora_overlap_loading=True,
        max_total_tokens=384,  # ~8 requests' worth: retraction and cache eviction happen often
        page_size=2,
        chunked_prefill_size=48,
        max_running_requests=16,
        max_sessions=len(SESSIONS),
        max_load_retries=1,
        lora_drain_wait_threshold=0.5,
        max_finished_requests=64,  # ended requests are forgotten: the per-op check cost stays flat
        device="sim",
        seed=seed,
        faults=faults,
    )


def adapter_names() -> dict[str, str]:
    return {f"g{i:02d}": f"gen:{RANKS[i % len(RANKS)]}:{i + 1}" for i in range(NUM_ADAPTERS)}


@dataclass
class Peak:
    kv_in_use: int = 0  # total - available: requests, sessions and the prefix cache
    kv_held: int = 0  # total - available - evictable: what requests and sessions hold
    slots: int = 0  # occupied LoRA slots (the base model included)
    rows: int = 0  # req_to_token rows in use
    live_requests: int = 0
    loads_in_flight: int = 0
    pinned_bytes: int = 0  # pinned host cache (all TP ranks); bounded by the registered adapters


@dataclass
class Soak:
    """The traffic generator: picks each op from the engine's current state."""

    h: Harness
    rng: random.Random
    sources: dict[str, str]
    n_rid: int = 0
    aborts_due: list[tuple[int, str]] = field(default_factory=list)
    doomed: set[str] = field(default_factory=set)  # the ~20% of requests to abort
    unloaded: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.names = sorted(self.sources)
        self.weights = [1.0 / (i + 1) for i in range(len(self.names))]  # zipf popularity

    # -- state views ------------------------------------------------------------------------
    def live(self) -> list[Any]:
        return [r for r in self.h.engine.requests.values() if r.state.live]

    def pick_adapter(self) -> str | None:
        reg = self.h.engine.registry
        if self.rng.random() < 0.12:
            return None
        for _ in range(4):
            name = self.rng.choices(self.names, self.weights)[0]
            if name in reg:
                return name
        return None

    def prompt(self) -> tuple[int, ...]:
        """Shared prefixes (prefix-cache hits), short prompts, and long ones that prefill in
        several chunks (so aborts and retractions land mid-prefill)."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.45:
            tail = tuple(rng.randrange(256) for _ in range(rng.randint(1, 12)))
            return PREFIXES[rng.randrange(len(PREFIXES))] + tail
        n = rng.randint(1, 40) if roll < 0.85 else rng.randint(60, 120)
        return tuple(rng.randrange(256) for _ in range(n))

    # -- the next op ------------------------------------------------------------------------
    def next_op(self, i: int) -> O.Op:
        rng, eng = self.rng, self.h.engine
        staged = eng.scheduler.staged
        if staged is not None and staged.rid in self.doomed and rng.random() < 0.5:
            self.doomed.discard(staged.rid)  # a doomed request caught mid chunked prefill: abort it now
            return O.Abort(staged.rid)
        while self.aborts_due and self.aborts_due[0][0] <= i:
            _, rid = self.aborts_due.pop(0)
            if rid in self.doomed and eng.requests[rid].state.live:
                self.doomed.discard(rid)
                return O.Abort(rid)
        if self.unloaded and rng.random() < 0.3:
            name = self.unloaded.pop(0)
            return O.LoadAdapter(name, self.sources[name])
        x = rng.random()
        if x < 0.22 and len(self.live()) < MAX_LIVE:
            return self.add_request(i)
        if x < 0.34:
            return O.CompleteTransfers(rng.choice([None, None, 1, 2, 4, 8]))
        if x < 0.36 and eng.device.pending() > 0:
            return O.FailTransfers(1)
        if x < 0.39:
            return O.AdvanceClock(rng.choice([0.1, 0.25, 1.0]))
        if x < 0.45:
            return self.session_op(i)
        if x < 0.465:
            return self.adapter_churn()
        return O.Step()

    def add_request(self, i: int, session: str | None = None, adapter: Any = "pick") -> O.Op:
        self.n_rid += 1
        rid = f"r{self.n_rid}"
        if self.rng.random() < ABORT_FRACTION:
            self.aborts_due.append((i + self.rng.randint(0, 80), rid))
            self.aborts_due.sort()
            self.doomed.add(rid)
        prompt = self.prompt()
        if adapter == "pick":  # shared prefixes mostly on the base model, so the cache gets hits
            shared = any(prompt[: len(pre)] == pre for pre in PREFIXES)
            adapter = None if shared and self.rng.random() < 0.6 else self.pick_adapter()
        return O.AddRequest(rid, prompt, adapter, self.rng.randint(1, 32), session)

    def session_op(self, i: int) -> O.Op:
        eng, rng = self.h.engine, self.rng
        open_ = sorted(eng.sessions.slots)
        busy = {r.session_id for r in self.live() if r.session_id is not None}
        idle = [s for s in open_ if s not in busy]
        closed = [s for s in SESSIONS if s not in open_]
        roll = rng.random()
        if closed and (roll < 0.25 or not open_):
            return O.OpenSession(rng.choice(closed))
        if open_ and roll < 0.35:
            return O.CloseSession(rng.choice(open_))
        if idle and len(self.live()) < MAX_LIVE:
            sid = rng.choice(idle)
            slot = eng.sessions.slots[sid]
            adapter = slot.adapter if slot.tokens else self.pick_adapter()
            if adapter is not None and adapter not in eng.registry:
                return O.CloseSession(sid)  # its adapter was unloaded: start the session over
            return self.add_request(i, sid, adapter)
        return O.Step()

    def adapter_churn(self) -> O.Op:
        eng, rng = self.h.engine, self.rng
        roll = rng.random()
        pinned = sorted(eng.pool.pinned)
        if pinned and roll < 0.3:
            return O.UnpinAdapter(rng.choice(pinned))
        resident = sorted(u for u in eng.pool.uid_to_slot if u is not None and u not in pinned)
        if resident and roll < 0.5 and not pinned:
            return O.PinAdapter(rng.choice(resident))
        users = {r.adapter for r in self.live()}
        held = {s.adapter for s in eng.sessions.slots.values() if s.tokens}
        loading = eng.loader.in_flight() if eng.loader is not None else set()
        free = [n for n in eng.registry if n not in users and n not in held and n not in loading]
        if free:
            name = rng.choice(sorted(free))
            self.unloaded.append(name)
            return O.UnloadAdapter(name)
        return O.Step()


def observe_peak(h: Harness, peak: Peak) -> None:
    eng = h.engine
    total = eng.allocator.size
    avail = eng.allocator.available_size()
    peak.kv_in_use = max(peak.kv_in_use, total - avail)
    peak.kv_held = max(peak.kv_held, total - avail - eng.cache.evictable_size())
    peak.slots = max(peak.slots, eng.pool.num_slots - len(eng.pool.free_slots()))
    peak.rows = max(peak.rows, eng.rows.size - len(eng.rows.free_rows()))
    peak.live_requests = max(peak.live_requests, sum(1 for r in eng.requests.values() if r.state.live))
    peak.pinned_bytes = max(peak.pinned_bytes, eng.pool.host_cache.nbytes())
    if eng.loader is not None:
        peak.loads_in_flight = max(peak.loads_in_flight, len(eng.loader.tracked()))


def teardown(h: Harness) -> tuple[list[Violation], dict[str, int]]:
    """Drain (liveness + idle leak check), close every session, unload every adapter; then
    measure what is still held."""
    violations = h.finish()
    if violations:
        return violations, {}
    eng = h.engine
    for op in [O.CloseSession(s) for s in sorted(eng.sessions.slots)] + [
        O.UnloadAdapter(n) for n in sorted(eng.registry)
    ]:
        rec = h.apply(op)
        if rec.violations:
            return rec.violations, {}
        if any(e.kind == "Rejected" for e in rec.events):
            return [Violation("soak", "teardown", f"{op} refused at teardown: {rec.events}")], {}
    snap = eng.snapshot()
    leaks = {
        "tokens": snap.total_tokens - snap.available - snap.evictable,
        "protected_tokens": snap.protected,
        "session_tokens": snap.session_held,
        "request_tokens": snap.held_by_requests,
        "rows": snap.rows_total - len(snap.free_rows),
        "slots": sum(1 for u in snap.lora.slot_to_uid if u is not None and u != "<EMPTY>"),
        "loads_in_flight": len(snap.lora.loads),
        "registered": len(snap.lora.registered),
        "sessions": len(snap.sessions),
        "pinned_entries": len(snap.pinned.entries),
    }
    return [], leaks


def episode(n_ops: int, seed: int, counts: Counter[str], peak: Peak, faults: frozenset[str]) -> dict[str, Any]:
    """``n_ops`` ops on a fresh harness (the 64 adapters are registered first), then the
    teardown leak measurement."""
    cfg = soak_config(seed, faults)
    h = Harness(cfg)
    sources = adapter_names()
    soak = Soak(h, random.Random(seed), sources)
    violations: list[Violation] = []
    failed_at: int | None = None
    setup = [O.LoadAdapter(n, s) for n, s in sources.items()]
    for i in range(n_ops):
        op = setup[i] if i < len(setup) else soak.next_op(i)
        rec = h.apply(op)
        counts["op:" + op.kind] += 1
        counts.update(e.kind for e in rec.events)
        for e in rec.events:
            if e.kind == "Rejected":
                counts["rejected:" + e.error] += 1  # type: ignore[attr-defined]
            elif e.kind == "Finished":
                counts["finished:" + e.reason] += 1  # type: ignore[attr-defined]
        observe_peak(h, peak)
        if rec.violations:
            violations, failed_at = rec.violations, i
            break
    leaks: dict[str, int] = {}
    if not violations:
        violations, leaks = teardown(h)
    return {
        "seed": seed,
        "ops": len(h.records),
        "violations": [str(v) for v in violations],
        "failed_at_op": failed_at,
        "leaks": leaks,
        "rows_total": h.engine.rows.size,
        "config": cfg.to_dict(),
    }


def run(n_ops: int, seed: int, episode_ops: int = 0, faults: frozenset[str] = frozenset()) -> dict[str, Any]:
    """``n_ops`` ops in episodes of ``episode_ops`` (0: one episode), each on a fresh harness."""
    size = n_ops if episode_ops <= 0 else episode_ops
    sizes = [size] * (n_ops // size)
    rest = n_ops - sum(sizes)
    if rest:
        if sizes and rest <= NUM_ADAPTERS:
            sizes[-1] += rest  # too short to hold the setup: fold into the last episode
        else:
            sizes.append(rest)
    counts: Counter[str] = Counter()
    peak = Peak()
    episodes = []
    t0 = time.perf_counter()
    for k, n in enumerate(sizes):
        ep = episode(n, seed * 1000 + k, counts, peak, faults)
        episodes.append(ep)
        if ep["violations"]:
            break
    seconds = time.perf_counter() - t0
    applied = sum(e["ops"] for e in episodes)
    bad = next((e for e in episodes if e["violations"]), None)
    leaks: Counter[str] = Counter()
    for e in episodes:
        leaks.update(e["leaks"])
    if bad is not None:
        leaks.clear()
    requests = counts["op:AddRequest"] - counts["rejected:RequestError"]
    return {
        "ops": n_ops,
        "ops_applied": applied,
        "episodes": len(episodes),
        "episode_ops": size,
        "seed": seed,
        "seconds": round(seconds, 3),
        "ops_per_s": round(applied / max(seconds, 1e-9), 1),
        "violations": 0 if bad is None else len(bad["violations"]),
        "first_violation": None if bad is None else bad["violations"][:5],
        "failed_at": None if bad is None else {"episode_seed": bad["seed"], "op": bad["failed_at_op"]},
        "peak": peak.__dict__,
        "capacity": {
            "kv_tokens": episodes[0]["config"]["max_total_tokens"],
            "slots": episodes[0]["config"]["max_loras_per_batch"],
            "rows": episodes[0]["rows_total"],
        },
        "leaks": dict(leaks) if bad is None else {},
        "leaked_tokens": None if bad is not None else leaks["tokens"],
        "leaked_slots": None if bad is not None else leaks["slots"],
        "leaked_rows": None if bad is not None else leaks["rows"],
        "requests": requests,
        "aborted_by_user": counts["Aborted"],
        "abort_fraction": round(counts["Aborted"] / max(requests, 1), 3),
        "counts": dict(sorted(counts.items())),
        "config": episodes[0]["config"],
        "adapters": NUM_ADAPTERS,
        "faults": sorted(faults),
    }


def table(r: dict[str, Any]) -> str:
    c, p, cap, leaks = r["counts"], r["peak"], r["capacity"], r["leaks"]
    rows = [
        ("ops (with teardowns)", f"{r['ops_applied']:,} in {r['episodes']} episode(s)"),
        ("time", f"{r['seconds']:.1f}s ({r['ops_per_s']:,.0f} ops/s)"),
        ("violations", r["violations"]),
        ("requests", f"{r['requests']:,}"),
        ("finished length/abort", f"{c.get('finished:length', 0):,}/{c.get('finished:abort', 0):,}"),
        ("user aborts", f"{r['aborted_by_user']:,} ({r['abort_fraction']:.0%} of requests)"),
        ("retractions", c.get("Retracted", 0)),
        ("prefix hits", c.get("PrefixHit", 0)),
        ("session saves/restores", f"{c.get('SessionSaved', 0)}/{c.get('SessionRestored', 0)}"),
        ("loads ok/failed", f"{c.get('LoadCompleted', 0)}/{c.get('LoadFailed', 0)}"),
        ("evictions", c.get("Evicted", 0)),
        ("rejected ops", sum(v for k, v in c.items() if k.startswith("rejected:"))),
        ("peak KV in use", f"{p['kv_in_use']}/{cap['kv_tokens']} tokens ({p['kv_held']} held by requests+sessions)"),
        ("peak slots", f"{p['slots']}/{cap['slots']}"),
        ("peak rows", f"{p['rows']}/{cap['rows']}"),
        ("peak live requests", p["live_requests"]),
        ("peak pinned host bytes", f"{p.get('pinned_bytes', 0):,}"),
        ("leaked tokens", leaks.get("tokens", "n/a")),
        ("leaked rows", leaks.get("rows", "n/a")),
        ("leaked slots", leaks.get("slots", "n/a")),
        ("leaked pinned entries", leaks.get("pinned_entries", "n/a")),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    lines = [f"lorainv soak — seed {r['seed']}, {r['adapters']} adapters over {cap['slots']} slots, strict level 2"]
    lines.append("-" * 72)
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    if r["first_violation"]:
        lines.append(f"FIRST VIOLATION at {r['failed_at']}:")
        lines += [f"  {v}" for v in r["first_violation"]]
    return "\n".join(lines)


def leaked(r: dict[str, Any]) -> bool:
    return not r["leaks"] or any(r["leaks"].values())


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"{QUICK_OPS:,} ops (default {FULL_OPS:,})")
    p.add_argument("--ops", type=int, default=None, help="number of ops (overrides --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--episode-ops",
        type=int,
        default=EPISODE_OPS,
        help=f"ops per fresh engine (default {EPISODE_OPS:,}; 0: one engine for the whole run)",
    )
    p.add_argument("--faults", default="", help="comma-separated faults to enable (proves the soak's power)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"a directory or a .json file (default {RESULTS}; with --quick, {common.quick_dir()})",
    )
    a = p.parse_args(list(argv) if argv is not None else None)
    n = a.ops if a.ops is not None else (QUICK_OPS if a.quick else FULL_OPS)
    # every tensor here is tiny: intra-op threads only add hand-off latency (~1 ms per op on a
    # busy 2-core machine); the engine's results do not depend on the thread count
    torch.set_num_threads(1)
    if n <= NUM_ADAPTERS or 0 < a.episode_ops <= NUM_ADAPTERS:
        p.error(f"--ops and --episode-ops must be > {NUM_ADAPTERS} (the adapters are registered first)")
    faults = frozenset(f.strip() for f in a.faults.split(",") if f.strip())
    result = run(n, a.seed, a.episode_ops, faults)
    result.update(version=__version__, python=platform.python_version(), quick=a.quick, machine=common.machine())
    where = a.out if a.out is not None else (common.quick_dir() if a.quick else RESULTS)
    out = where if where.suffix == ".json" else where / "soak.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(out)
    print(table(result))
    bad = result["violations"] > 0 or leaked(result)
    print(f"\n{'FAILED' if bad else 'clean'}: wrote {out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
