"""Checkers for the vLLM target: they read a `lorainv.targets.vllm_snapshot.VllmSnapshot`.

They restate lorainv's own invariants for a block pool: K1 (accounting), K3 (exact
ownership), R3 (an ended request holds nothing), L2 (adapters per batch), the chunk budget,
P-namespacing of the prefix cache and liveness (the harness's drain). Each checker's
docstring says what it assumes about the engine. They are not registered with
`lorainv.checkers.base.register` (that registry is lorainv's snapshot type); a target that
shares these assumptions returns them from ``checkers()`` via `vllm_checkers`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from lorainv.checkers.base import Checker, shown
from lorainv.errors import Violation
from lorainv.targets.vllm_snapshot import VllmSnapshot


def _holders(snap: VllmSnapshot) -> dict[int, list[str]]:
    """Block id -> the live requests whose block lists contain it (null block excluded)."""
    live = {r.rid for r in snap.live()}
    out: dict[int, list[str]] = {}
    for rid, blocks in snap.req_blocks:
        if rid in live:
            for b in blocks:
                if b != snap.null_block:
                    out.setdefault(b, []).append(rid)
    return out


class BlockAccountingChecker:
    """VB1: every block but the null block is exactly one of free (ref 0, in the free queue
    once) or held (ref > 0, not in the queue): free + held = total, and the queue's own
    counter equals its length. Cached-evictable blocks are the free ones that keep a hash.

    Assumes: one free queue holds every unreferenced block, including cached ones (vLLM's
    design: eviction takes from the queue's head), and block 0 is a null block outside it.
    """

    name = "vllm_accounting"

    def check(self, snap: VllmSnapshot) -> list[Violation]:
        out: list[Violation] = []
        total = snap.num_blocks - 1
        q = snap.free_queue
        dup = [b for b, n in Counter(q).items() if n > 1]
        if dup:
            out.append(Violation("vllm_blocks", "VB1", "blocks in the free queue twice", shown(sorted(dup))))
        if len(q) != snap.free_count:
            out.append(
                Violation("vllm_blocks", "VB1", f"free queue has {len(q)} blocks, its counter says {snap.free_count}")
            )
        in_q = set(q)
        if snap.null_block in in_q:
            out.append(Violation("vllm_blocks", "VB1", "the null block is in the free queue", (snap.null_block,)))
        held = {b.id for b in snap.blocks if b.ref_cnt > 0 and b.id != snap.null_block}
        both = sorted(held & in_q)
        if both:
            out.append(Violation("vllm_blocks", "VB1", "referenced blocks in the free queue", shown(both)))
        lost = sorted(b.id for b in snap.blocks if b.id != snap.null_block and b.id not in held and b.id not in in_q)
        if lost:
            out.append(Violation("vllm_blocks", "VB1", "blocks neither free nor referenced (leaked)", shown(lost)))
        neg = [b.id for b in snap.blocks if b.ref_cnt < 0]
        if neg:
            out.append(Violation("vllm_blocks", "VB1", "negative ref counts", shown(neg)))
        free = len(in_q - held - {snap.null_block})
        if free + len(held) != total and not out:
            evictable = sum(1 for b in snap.blocks if b.id in in_q and b.hash is not None)
            out.append(
                Violation(
                    "vllm_blocks",
                    "VB1",
                    f"free {free} (of which cached-evictable {evictable}) + held {len(held)} != total {total}",
                )
            )
        return out


class RefCountChecker:
    """VB2: each block's ref count equals the number of live requests holding it; VB3: a
    block held by two live requests is a cached (hashed) block -- sharing happens only
    through prefix hits -- and nothing but live requests holds blocks.

    Assumes: no other holder than requests (no KV connector, no copy-on-write retention, no
    deferred frees: all off in the target's configuration).
    """

    name = "vllm_refcount"

    def check(self, snap: VllmSnapshot) -> list[Violation]:
        out: list[Violation] = []
        holders = _holders(snap)
        bad = [
            (b.id, b.ref_cnt, len(holders.get(b.id, ())))
            for b in snap.blocks
            if b.id != snap.null_block and b.ref_cnt != len(holders.get(b.id, ()))
        ]
        if bad:
            msg = ", ".join(f"block {b} ref {r} held by {h}" for b, r, h in bad[:8])
            out.append(Violation("vllm_blocks", "VB2", f"ref counts differ from live holders: {msg}", shown(bad)))
        hashed = {b.id for b in snap.blocks if b.hash is not None}
        shared = sorted((b, tuple(rs)) for b, rs in holders.items() if len(rs) > 1 and b not in hashed)
        if shared:
            out.append(Violation("vllm_blocks", "VB3", "an unhashed block is held by several requests", shown(shared)))
        return out


class PrefixProvenanceChecker:
    """VB4: a hashed block a live request holds at position ``i`` was filled under the same
    adapter weights, the same cache salt and the same tokens ``0 .. (i+1)*block_size`` as
    that request's own: a prefix hit never crosses adapters, weights or salts. VB5: the
    prefix-cache map and the blocks' own hashes agree both ways (an entry's block carries
    that hash; a hashed block is in the map under it).

    Assumes: KV depends on the weights and the whole token prefix only (a causal model with
    deterministic kernels), so a block is reusable exactly when those agree; the target
    records each block's filler when vLLM hashes it (in ``schedule()``).
    """

    name = "vllm_prefix"

    def check(self, snap: VllmSnapshot) -> list[Violation]:
        out: list[Violation] = []
        bs = snap.block_size
        prov = {p.block: p for p in snap.provenance}
        hashes = {b.id: b.hash for b in snap.blocks}
        reqs = {r.rid: r for r in snap.requests}
        live = {r.rid for r in snap.live()}
        # the blocks live requests hold now, and the blocks each request of the last step held
        # while it ran (a request that ends in its step frees them before any snapshot)
        holdings = [(rid, bl) for rid, bl in snap.req_blocks if rid in live] + list(snap.step_holdings)
        crossed: set[tuple[str, int]] = set()
        msgs: list[str] = []
        for rid, blocks in holdings:
            r = reqs.get(rid)
            if r is None:
                continue
            for i, b in enumerate(blocks):
                h = hashes.get(b)
                if h is None or b == snap.null_block or (rid, b) in crossed:
                    continue
                p = prov.get(b)
                if p is None or p.hash != h:
                    crossed.add((rid, b))
                    msgs.append(f"{rid} block {b}: hashed outside any step the target saw")
                    continue
                want = r.tokens[: (i + 1) * bs]
                why = []
                if p.weights != r.weights:
                    why.append(f"adapter weights {p.weights!r} != {r.weights!r}")
                if p.salt != r.salt:
                    why.append(f"cache salt {p.salt!r} != {r.salt!r}")
                if p.tokens != want:
                    why.append("token prefix differs")
                if why:
                    crossed.add((rid, b))
                    msgs.append(f"{rid} block {b} (position {i}): " + ", ".join(why))
        if crossed:
            msg = "prefix hit crosses: " + "; ".join(msgs[:4])
            out.append(Violation("vllm_blocks", "VB4", msg, shown(sorted(crossed))))
        wrong = [(h, b) for h, b in snap.cached if hashes.get(b) != h]
        if wrong:
            out.append(Violation("vllm_blocks", "VB5", "cache map entries whose block lost its hash", shown(wrong)))
        mapped = set(snap.cached)
        orphans = sorted(b for b, h in hashes.items() if h is not None and (h, b) not in mapped)
        if orphans:
            out.append(Violation("vllm_blocks", "VB5", "hashed blocks missing from the cache map", shown(orphans)))
        return out


class StepBudgetChecker:
    """VS1: the last step scheduled at most ``max_num_batched_tokens`` tokens over at most
    ``max_num_seqs`` requests, each at least one token; VS2: at most ``max_loras`` distinct
    adapters in the step, and among the running requests.

    Assumes: the budgets are hard limits per step (no speculative tokens, no encoder inputs).
    """

    name = "vllm_budget"

    def check(self, snap: VllmSnapshot) -> list[Violation]:
        out: list[Violation] = []
        total = sum(n for _, n in snap.last_scheduled)
        if total > snap.max_num_batched_tokens:
            out.append(
                Violation(
                    "vllm_sched", "VS1", f"{total} tokens scheduled > budget {snap.max_num_batched_tokens}", (total,)
                )
            )
        if len(snap.last_scheduled) > snap.max_num_seqs:
            out.append(Violation("vllm_sched", "VS1", f"{len(snap.last_scheduled)} requests > max_num_seqs"))
        zero = [rid for rid, n in snap.last_scheduled if n < 1]
        if zero:
            out.append(Violation("vllm_sched", "VS1", "requests scheduled with no tokens", tuple(zero)))
        if len(snap.last_loras) > snap.max_loras:
            out.append(
                Violation(
                    "vllm_sched",
                    "VS2",
                    f"{len(snap.last_loras)} adapters in one step > max_loras={snap.max_loras}",
                    snap.last_loras,
                )
            )
        by_rid = {r.rid: r for r in snap.requests}
        running = {by_rid[rid].lora_int_id for rid in snap.running if rid in by_rid} - {0}
        if len(running) > snap.max_loras:
            out.append(
                Violation("vllm_sched", "VS2", f"{len(running)} adapters running > max_loras", tuple(sorted(running)))
            )
        return out


class EndedHoldNothingChecker:
    """VR1: a finished or aborted request holds no block and is gone from the scheduler's
    tables; a waiting (never admitted or preempted) request holds nothing; VR2: outputs stay
    within ``max_tokens``; VR3: idle means every block but the null one is free.

    Assumes: the engine frees a request's blocks when it ends or is preempted (recompute
    preemption, no swapping), and keeps no ended request in its queues.
    """

    name = "vllm_requests"

    def check(self, snap: VllmSnapshot) -> list[Violation]:
        out: list[Violation] = []
        by_rid = {r.rid: r for r in snap.requests}
        holding = {rid for rid, blocks in snap.req_blocks if blocks}
        ended = {r.rid for r in snap.requests if not r.live}
        held_ended = sorted(ended & holding)
        if held_ended:
            states = ", ".join(f"{rid} {by_rid[rid].state}" for rid in held_ended[:8])
            out.append(
                Violation("vllm_requests", "VR1", f"ended requests still hold blocks: {states}", tuple(held_ended))
            )
        tabled = sorted(ended & (set(snap.vllm_requests) | set(snap.running) | set(snap.waiting)))
        if tabled:
            out.append(Violation("vllm_requests", "VR1", "ended requests still in the scheduler", tuple(tabled)))
        waiting = sorted(r.rid for r in snap.live() if r.state == "waiting" and r.rid in holding)
        if waiting:
            out.append(Violation("vllm_requests", "VR1", "waiting requests hold blocks", tuple(waiting)))
        over = [r.rid for r in snap.requests if r.output_len > r.max_tokens]
        if over:
            out.append(Violation("vllm_requests", "VR2", "outputs past max_tokens", tuple(over)))
        if snap.idle:
            busy = sorted(b.id for b in snap.blocks if b.ref_cnt and b.id != snap.null_block)
            if busy or snap.live():
                out.append(Violation("vllm_requests", "VR3", "idle but blocks are held or requests live", shown(busy)))
        return out


VLLM_CHECKERS: dict[str, Callable[[], Any]] = {
    c.name: c
    for c in (
        BlockAccountingChecker,
        RefCountChecker,
        PrefixProvenanceChecker,
        StepBudgetChecker,
        EndedHoldNothingChecker,
    )
}


def vllm_checkers() -> list[Checker]:
    """A fresh instance of every checker above."""
    return [f() for f in VLLM_CHECKERS.values()]
