"""`VllmSnapshot`: a frozen, plain-data view of vLLM's block pool and scheduler, read by the
checkers of `lorainv.checkers.vllm_blocks`.

`take_vllm_snapshot` only reads: it walks the free queue's links, reads every block's
``ref_cnt`` and hash, the prefix-cache map, every manager's ``req_to_blocks`` (with ``.get``,
never indexing the defaultdict) and the requests; it calls no vLLM method that allocates,
touches or evicts. This module imports no vLLM code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BlockSnap:
    id: int
    ref_cnt: int
    hash: str | None  # hex of vLLM's block hash (with group id); None while unhashed


@dataclass(frozen=True)
class VReqSnap:
    """One request the target queued: lorainv's state name and vLLM's status and sizes."""

    rid: str
    state: str  # waiting / prefilling / decoding / finished / aborted (the target's bookkeeping)
    status: str  # vLLM's RequestStatus name
    lora_int_id: int  # 0: the base model
    weights: str | None  # the source the lora_int_id stands for; None: the base model
    salt: str | None
    num_tokens: int
    num_computed: int
    output_len: int
    max_tokens: int
    tokens: tuple[int, ...]  # prompt + outputs, as vLLM holds them (() once ended, unless in the last step)

    @property
    def live(self) -> bool:
        return self.state in ("waiting", "prefilling", "decoding")


@dataclass(frozen=True)
class Provenance:
    """Who filled a hashed block, as the target recorded when it first saw the hash."""

    block: int
    hash: str
    weights: str | None
    salt: str | None
    tokens: tuple[int, ...]  # the tokens from position 0 to the block's end


@dataclass(frozen=True)
class VllmSnapshot:
    step: int
    block_size: int
    num_blocks: int  # including the null block
    null_block: int
    free_queue: tuple[int, ...]  # block ids in the free queue's order (eviction order)
    free_count: int  # the queue's own counter
    blocks: tuple[BlockSnap, ...]  # every block, by id
    cached: tuple[tuple[str, int], ...]  # the prefix-cache map: (hash, block id)
    req_blocks: tuple[tuple[str, tuple[int, ...]], ...]  # every req_to_blocks entry, every manager
    requests: tuple[VReqSnap, ...]  # every request the target queued
    vllm_requests: tuple[str, ...]  # ids in the scheduler's request table
    running: tuple[str, ...]
    waiting: tuple[str, ...]
    last_scheduled: tuple[tuple[str, int], ...]  # (rid, tokens) of the last step
    last_loras: tuple[int, ...]  # distinct lora_int_ids scheduled in the last step
    provenance: tuple[Provenance, ...]
    step_holdings: tuple[tuple[str, tuple[int, ...]], ...]  # (rid, blocks) of the last step's
    # scheduled requests, read between schedule() and update_from_output()
    max_loras: int
    max_num_batched_tokens: int
    max_num_seqs: int
    idle: bool

    def live(self) -> tuple[VReqSnap, ...]:
        return tuple(r for r in self.requests if r.live)


_LIVE = ("waiting", "prefilling", "decoding")


def _hex(h: Any) -> str | None:
    if h is None:
        return None
    return h.hex() if isinstance(h, (bytes, bytearray)) else repr(h)


def take_vllm_snapshot(target: Any) -> VllmSnapshot:
    """Read ``target``'s scheduler (a `lorainv.targets.vllm.VllmTarget`); changes nothing."""
    sched = target.scheduler
    pool = sched.kv_cache_manager.block_pool
    q = pool.free_block_queue
    free: list[int] = []
    cur = q.fake_free_list_head.next_free_block
    limit = len(pool.blocks) + 1  # a cycle in the links would otherwise never end
    while cur is not None and cur is not q.fake_free_list_tail and len(free) <= limit:
        free.append(cur.block_id)
        cur = cur.next_free_block
    cached: list[tuple[str, int]] = []
    for key, val in pool.cached_block_hash_to_block._cache.items():
        for blk in val.values() if isinstance(val, dict) else (val,):
            cached.append((_hex(key) or "", blk.block_id))
    req_blocks: list[tuple[str, tuple[int, ...]]] = []
    for mgr in sched.kv_cache_manager.coordinator.single_type_managers:
        for rid, blocks in mgr.req_to_blocks.items():
            req_blocks.append((rid, tuple(b.block_id for b in blocks)))
    reqs = []
    in_step = {rid for rid, _ in target.step_holdings}
    for t in target.tracked.values():
        r = t.req
        lr = r.lora_request
        reqs.append(
            VReqSnap(
                rid=t.rid,
                state=t.state,
                status=r.status.name,
                lora_int_id=0 if lr is None else lr.lora_int_id,
                weights=None if lr is None else target.identities.get(lr.lora_int_id),
                salt=t.salt,  # the salt the op asked for (vLLM's copy may differ if broken)
                num_tokens=r.num_tokens,
                num_computed=r.num_computed_tokens,
                output_len=len(r.output_token_ids),
                max_tokens=r.max_tokens,
                # tokens only where a checker compares them: live requests and the last step's
                tokens=tuple(r.all_token_ids) if t.state in _LIVE or t.rid in in_step else (),
            )
        )
    prov = tuple(Provenance(b, _hex(h) or "", w, s, toks) for b, (h, w, s, toks) in sorted(target.provenance.items()))
    return VllmSnapshot(
        step=target.steps,
        block_size=target.block_size,
        num_blocks=len(pool.blocks),
        null_block=pool.null_block.block_id,
        free_queue=tuple(free),
        free_count=q.num_free_blocks,
        blocks=tuple(BlockSnap(b.block_id, b.ref_cnt, _hex(b.block_hash)) for b in pool.blocks),
        cached=tuple(cached),
        req_blocks=tuple(req_blocks),
        requests=tuple(reqs),
        vllm_requests=tuple(sched.requests),
        running=tuple(r.request_id for r in sched.running),
        waiting=tuple(r.request_id for r in (*sched.waiting, *sched.kv_holding_waiting)),
        last_scheduled=target.last_scheduled,
        last_loras=target.last_loras,
        provenance=prov,
        step_holdings=target.step_holdings,
        max_loras=target.max_loras,
        max_num_batched_tokens=target.max_num_batched_tokens,
        max_num_seqs=target.max_num_seqs,
        idle=target.is_idle(),
    )
