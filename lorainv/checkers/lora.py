"""LoRA slot pool: L1 maps, L2 admission bound, L3 batch readiness, L4 pins, L5 victims, L6 hygiene,
L9 the last batch's segment metadata."""

from __future__ import annotations

from itertools import groupby
from typing import Any

from lorainv.checkers.base import register, shown
from lorainv.errors import Violation
from lorainv.snapshot import EMPTY_NAME, SegmentsSnap, Snapshot


@register("lora")
class LoraChecker:
    def check(self, snap: Snapshot) -> list[Violation]:
        lo = snap.lora
        out: list[Violation] = []
        u2s = dict(lo.uid_to_slot)
        # L1: inverse bijection over occupied slots; occupied + free == P
        for uid, slot in u2s.items():
            if not 0 <= slot < lo.num_slots or lo.slot_to_uid[slot] != uid:
                have = lo.slot_to_uid[slot] if 0 <= slot < lo.num_slots else "out of range"
                out.append(
                    Violation("lora", "L1", f"uid_to_slot[{uid!r}] = {slot} but slot {slot} holds {have!r}", (uid,))
                )
        for slot, uid in enumerate(lo.slot_to_uid):
            if uid != EMPTY_NAME and u2s.get(uid) != slot:
                out.append(
                    Violation("lora", "L1", f"slot {slot} maps to {uid!r} but uid_to_slot = {u2s.get(uid)}", (slot,))
                )
        occupied = sum(1 for u in lo.slot_to_uid if u != EMPTY_NAME)
        if occupied != len(u2s) or len(lo.slot_to_uid) != lo.num_slots:
            out.append(Violation("lora", "L1", f"occupied {occupied} != mapped {len(u2s)} (P={lo.num_slots})"))
        # L2: running ∪ staged ∪ in flight within P
        live = [r for r in snap.live() if r.state in ("prefilling", "decoding")]
        active = {r.adapter for r in live} | {ld.uid for ld in lo.loads}
        if len(active) > snap.max_loras_per_batch:
            out.append(
                Violation(
                    "lora",
                    "L2",
                    f"{len(active)} distinct adapters among running, staged and loading > max_loras_per_batch="
                    f"{snap.max_loras_per_batch}",
                    shown(sorted(active, key=repr)),
                )
            )
        if len(set(lo.last_batch)) > snap.max_loras_per_batch:
            batch = sorted(set(lo.last_batch), key=repr)
            out.append(Violation("lora", "L2", "a batch used more adapters than slots", shown(batch)))
        # L3: what runs is resident and ready; the batch read the right slots
        for r in live:
            if r.adapter not in u2s or r.adapter not in lo.ready:
                state = "not resident" if r.adapter not in u2s else "not loaded/waited"
                out.append(Violation("lora", "L3", f"{r.rid} runs on adapter {r.adapter!r} that is {state}", (r.rid,)))
        for uid, slot in zip(lo.last_batch, lo.last_batch_slots):
            if u2s.get(uid) != slot:
                out.append(
                    Violation("lora", "L3", f"batch read slot {slot} for {uid!r}, which maps to {u2s.get(uid)}", (uid,))
                )
        out += _segments(lo.last_batch_slots, lo.last_batch_lens, lo.segments)
        # L4: pins resident, at most P-1
        for name in sorted(lo.pinned):
            if name not in u2s:
                out.append(Violation("lora", "L4", f"pinned adapter {name!r} is not resident", (name,)))
        if len(lo.pinned) > max(lo.num_slots - 1, 0):
            out.append(Violation("lora", "L4", f"{len(lo.pinned)} pinned > P-1", shown(sorted(lo.pinned))))
        # L5: eviction victims are never in the protected (in-batch) set nor pinned
        for victim, slot, protected in lo.evictions:
            if victim in protected or victim in lo.pinned:
                why = "in the current batch" if victim in protected else "pinned"
                out.append(Violation("lora", "L5", f"evicted {victim!r} from slot {slot} while {why}", (victim,)))
        # L6: every readable slot holds exactly what its adapter's registered tensors call for
        for c in lo.contents:
            if c.held == c.want:
                continue
            want = dict(c.want)
            held = dict(c.held)
            bad = [region for region, digest in c.held if want.get(region) != digest]
            bad += [region for region in want if region not in held]
            if bad:
                where = f"slot {c.slot}" + (f" on tp rank {c.tp_rank}" if c.tp_rank else "")
                out.append(
                    Violation(
                        "lora",
                        "L6",
                        f"{where} of {c.uid!r} differs from its registered weights in {len(bad)} region(s): "
                        + ", ".join(bad[:6]),
                        (c.uid, c.slot),
                    )
                )
        # L6: with tensor parallelism every rank keeps its own copy of each readable slot
        tp = range(snap.pinned.tp_size)
        seen: dict[tuple[Any, int], set[int]] = {}
        for c in lo.contents:
            seen.setdefault((c.uid, c.slot), set()).add(c.tp_rank)
        for (uid, slot), on in seen.items():
            if on != set(tp):
                where = f"slot {slot} of {uid!r} is held on tp ranks {sorted(on)}, not on each of {list(tp)}"
                out.append(Violation("lora", "L6", where, (uid, slot)))
        ranks = dict(lo.registered)
        for uid, slot in u2s.items():
            want_rank = 0 if uid is None else ranks.get(uid)
            if not 0 <= slot < len(lo.ranks):  # already an L1 violation
                continue
            if want_rank is not None and lo.ranks[slot] != want_rank and uid not in {ld.uid for ld in lo.loads}:
                out.append(
                    Violation("lora", "L6", f"slot {slot} rank {lo.ranks[slot]} != {uid!r} rank {want_rank}", (slot,))
                )
        return out


def _segments(slots: tuple[int, ...], lens: tuple[int, ...], seg: SegmentsSnap | None) -> list[Violation]:
    """`_segments_of`, memoized: a pure function of plain values, asked again on every op while
    the last batch stays the same (every op between two steps)."""
    key = (slots, lens, seg)
    hit = _SEGMENTS_MEMO.get(key)
    if hit is None:
        if len(_SEGMENTS_MEMO) >= 256:
            _SEGMENTS_MEMO.pop(next(iter(_SEGMENTS_MEMO)))
        hit = _SEGMENTS_MEMO[key] = tuple(_segments_of(slots, lens, seg))
    return list(hit)


_SEGMENTS_MEMO: dict[tuple[Any, ...], tuple[Violation, ...]] = {}


def _segments_of(slots: tuple[int, ...], lens: tuple[int, ...], seg: SegmentsSnap | None) -> list[Violation]:
    """L9: the segments the kernels read are the runs of consecutive requests that read one
    slot: one segment per run, its slot, its token count, and offsets that start at 0 and add
    up those counts."""
    if seg is None or len(lens) != len(slots):
        return []
    runs = [(slot, sum(n for _, n in grp)) for slot, grp in groupby(zip(slots, lens), key=lambda p: p[0])]
    want_slots = tuple(slot for slot, _ in runs)
    want_lens = tuple(n for _, n in runs)
    offsets = [0]
    for n in want_lens:
        offsets.append(offsets[-1] + n)
    have = (seg.weight_indices, seg.seg_lens, seg.seg_indptr)
    want = (want_slots, want_lens, tuple(offsets))
    if have == want:
        return []
    names = ("weight_indices", "seg_lens", "seg_indptr")
    diff = "; ".join(f"{k} {h} != {w}" for k, h, w in zip(names, have, want) if h != w)
    return [Violation("lora", "L9", f"batch segments over slots {slots}: {diff}", (len(runs),))]
