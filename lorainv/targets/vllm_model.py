"""A reference model for the vLLM target: request lifecycle and KV blocks from events alone.

lorainv's `ReferenceModel` does not apply to vLLM (it models LoRA slots, sessions and a
prefix cache of token pages that vLLM does not have, and lorainv's prefill-or-decode rounds).
This one keeps the part that is the same idea -- trace validation of the lifecycle, then a
refinement check of memory -- in vLLM's terms. Its own state per request: the tokens it must
fill (prompt + outputs), the tokens it has computed (``kv``), its outputs and its state.

Rules each event must satisfy (pool ``model``, invariant ``refinement``):

* `Queued`: a new id; its adapter is registered.
* `Retracted`: the request ran, ``output_len`` is its output count; it then holds nothing.
* `PrefixHit`: a waiting request; whole blocks, fewer than its fill.
* `BatchFormed`: a prefill batch takes waiting/prefilling requests, a decode batch decoding
  ones, each on its own adapter; ``num_segments`` counts runs of equal adapters; the step's
  distinct adapters (base excluded, as vLLM counts) are at most ``max_loras``; a request is
  in one batch per step; the step's requests are at most ``max_num_seqs``.
* `Scheduled`: a chunk of a request in this step's prefill batch; ``done`` exactly when its
  computed tokens reach its fill; the step's tokens (chunks + one per decode) fit the budget.
* `Decoded`: a decoding request of this step, under its ``max_tokens``.
* `Finished("length")`: exactly when it has all its tokens -- and a request that has them
  must finish in the same op. `Aborted`: its state is the reported one.
* `Idle`: only when nothing is waiting or running (vLLM with nothing running always admits
  the head request: the target refuses requests larger than the KV cache).

Memory (`VllmRefinementChecker`): a running request holds ``ceil(kv / block_size)`` blocks,
a waiting or ended one none; the live set and each state match the snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lorainv import events as E
from lorainv.errors import Violation
from lorainv.ops import LoadAdapter, Op

LIVE = ("waiting", "prefilling", "decoding")


@dataclass
class MReq:
    adapter: str | None
    fill: int
    max_new: int
    state: str = "waiting"
    kv: int = 0
    out: int = 0


@dataclass
class VllmModel:
    """``observe(op, events)`` validates and applies (mutates the model only)."""

    block_size: int
    max_loras: int
    max_num_batched_tokens: int
    max_num_seqs: int
    reqs: dict[str, MReq] = field(default_factory=dict)
    registered: set[str] = field(default_factory=set)
    violations: list[Violation] = field(default_factory=list)

    @classmethod
    def for_target(cls, target: Any) -> VllmModel:
        return cls(target.block_size, target.max_loras, target.max_num_batched_tokens, target.max_num_seqs)

    def live(self) -> set[str]:
        return {rid for rid, r in self.reqs.items() if r.state in LIVE}

    def blocks(self, rid: str) -> int:
        r = self.reqs[rid]
        return -(-r.kv // self.block_size) if r.state in ("prefilling", "decoding") else 0

    def observe(self, op: Op, events: list[E.Event]) -> list[Violation]:
        new: list[Violation] = []
        self._step: dict[str, str] = {}  # rid -> batch mode, this op
        self._adapters: set[str] = set()
        self._tokens = 0
        for ev in events:
            try:
                self._on(op, ev)
            except _Refused as e:
                new.append(Violation("model", "refinement", f"{op.kind}: {ev} not allowed: {e}", _rid(ev)))
                break
        if not new:
            due = sorted(rid for rid, r in self.reqs.items() if r.state == "decoding" and r.out >= r.max_new)
            if due:
                new.append(Violation("model", "refinement", f"{op.kind}: all tokens out but not finished", tuple(due)))
        self.violations += new
        return new

    def _req(self, rid: str, *states: str) -> MReq:
        r = self.reqs.get(rid)
        if r is None:
            raise _Refused(f"unknown request {rid}")
        if states and r.state not in states:
            raise _Refused(f"{rid} is {r.state}, expected {'/'.join(states)}")
        return r

    def _on(self, op: Op, ev: E.Event) -> None:
        bs = self.block_size
        if isinstance(ev, E.AdapterRegistered):
            if ev.name in self.registered or not (isinstance(op, LoadAdapter) and op.name == ev.name):
                raise _Refused(f"adapter {ev.name} registered twice or by another op")
            self.registered.add(ev.name)
        elif isinstance(ev, E.AdapterUnregistered):
            if any(r.adapter == ev.name and r.state in LIVE for r in self.reqs.values()):
                raise _Refused(f"adapter {ev.name} unregistered while live requests use it")
            self.registered.discard(ev.name)
        elif isinstance(ev, E.Queued):
            if ev.rid in self.reqs or (ev.adapter is not None and ev.adapter not in self.registered):
                raise _Refused("id reused or adapter not registered")
            self.reqs[ev.rid] = MReq(ev.adapter, ev.prompt_len, ev.max_new_tokens)
        elif isinstance(ev, E.Retracted):
            r = self._req(ev.rid, "prefilling", "decoding")
            if ev.output_len != r.out or ev.reason != "kv":
                raise _Refused(f"retracted with {ev.output_len} outputs ({ev.reason}); model has {r.out}")
            r.state, r.kv = "waiting", 0
        elif isinstance(ev, E.PrefixHit):
            r = self._req(ev.rid, "waiting")
            if ev.source != "cache" or ev.tokens % bs or not 0 < ev.tokens < r.fill:
                raise _Refused(f"hit of {ev.tokens} tokens for a fill of {r.fill}")
            r.kv = ev.tokens
        elif isinstance(ev, E.BatchFormed):
            want = ("decoding",) if ev.mode == "decode" else ("waiting", "prefilling")
            for rid, a in zip(ev.rids, ev.adapters):
                r = self._req(rid, *want)
                if r.adapter != a or rid in self._step:
                    raise _Refused(f"{rid} on {a!r} (its adapter {r.adapter!r}) or twice in one step")
                self._step[rid] = ev.mode
            runs = sum(1 for i, a in enumerate(ev.adapters) if i == 0 or ev.adapters[i - 1] != a)
            if ev.num_segments != runs or len(ev.rids) != len(ev.adapters):
                raise _Refused(f"{ev.num_segments} segments for {runs} runs")
            self._adapters |= {a for a in ev.adapters if a is not None}
            if len(self._adapters) > self.max_loras:
                raise _Refused(f"{len(self._adapters)} adapters in one step > max_loras={self.max_loras}")
            if len(self._step) > self.max_num_seqs:
                raise _Refused(f"{len(self._step)} requests in one step > max_num_seqs={self.max_num_seqs}")
            if ev.mode == "decode":
                for rid in ev.rids:
                    self.reqs[rid].kv += 1
                self._tokens += len(ev.rids)
        elif isinstance(ev, E.Scheduled):
            r = self._req(ev.rid, "waiting", "prefilling")
            if self._step.get(ev.rid) != "prefill" or ev.chunk_tokens < 1:
                raise _Refused("a chunk outside this step's prefill batch")
            r.kv += ev.chunk_tokens
            self._tokens += ev.chunk_tokens
            if r.kv > r.fill or ev.done != (r.kv == r.fill):
                raise _Refused(f"chunk reaches {r.kv} of {r.fill} tokens but done={ev.done}")
            if self._tokens > self.max_num_batched_tokens:
                raise _Refused(f"{self._tokens} tokens in one step > {self.max_num_batched_tokens}")
            r.state = "decoding" if ev.done else "prefilling"
        elif isinstance(ev, E.Decoded):
            r = self._req(ev.rid, "decoding")
            if ev.rid not in self._step or r.out >= r.max_new:
                raise _Refused("a token outside this step or past max_tokens")
            r.out += 1
            r.fill += 1
        elif isinstance(ev, E.Finished):
            r = self._req(ev.rid, *LIVE)
            if ev.reason != "length" or r.out != r.max_new:
                raise _Refused(f"finished ({ev.reason}) with {r.out} of {r.max_new} tokens")
            r.state, r.kv = "finished", 0
        elif isinstance(ev, E.Aborted):
            r = self._req(ev.rid, *LIVE)
            if ev.state != r.state:
                raise _Refused(f"aborted in state {ev.state}; model has {r.state}")
            r.state, r.kv = "aborted", 0
        elif isinstance(ev, E.Idle):
            busy = sorted(self.live())
            if busy:
                raise _Refused(f"idle while {busy[:8]} wait or run")
        elif isinstance(ev, E.Rejected):
            return
        else:
            raise _Refused(f"no rule for {ev.kind} on the vllm target")


class _Refused(Exception):
    pass


def _rid(ev: E.Event) -> tuple[Any, ...]:
    return (ev.rid,) if hasattr(ev, "rid") else ()


_STATUS = {"WAITING": "waiting", "PREEMPTED": "waiting", "RUNNING": "running"}


class VllmRefinementChecker:
    """vLLM's own request records must hold what `VllmModel` predicts from the events: the
    same live requests; waiting ones (vLLM: WAITING/PREEMPTED) hold no blocks and no computed
    tokens; running ones (RUNNING) have ``num_computed_tokens == kv`` and hold
    ``ceil(kv / block_size)`` blocks; ended ones have a finished status.

    Assumes: vLLM allocates exactly the blocks the computed tokens need (no lookahead slots,
    no speculative tokens) and frees all of a request's blocks when it is preempted or ends.
    """

    name = "vllm_refinement"

    def __init__(self, model: VllmModel) -> None:
        self.model = model

    def check(self, snap: Any) -> list[Violation]:
        m = self.model
        out: list[Violation] = []
        live = {r.rid for r in snap.requests if r.status in _STATUS}
        if live != m.live():
            diff = tuple(sorted(live ^ m.live()))
            out.append(Violation("refinement", "live", "vLLM's live requests differ from the model", diff))
        held = {rid: len([b for b in bl if b != snap.null_block]) for rid, bl in snap.req_blocks}
        for r in snap.requests:
            want = m.reqs.get(r.rid)
            if want is None or r.rid not in live or want.state not in LIVE:
                continue
            coarse = "waiting" if want.state == "waiting" else "running"
            if _STATUS[r.status] != coarse:
                out.append(
                    Violation("refinement", "state", f"{r.rid} is {r.status}, model says {want.state}", (r.rid,))
                )
                continue
            computed = r.num_computed if coarse == "running" else 0
            if r.num_computed != computed or computed != want.kv or held.get(r.rid, 0) != m.blocks(r.rid):
                out.append(
                    Violation(
                        "refinement",
                        "held",
                        f"{r.rid} ({r.status}) computed {r.num_computed} tokens in {held.get(r.rid, 0)} blocks; "
                        f"the model predicts {want.kv} tokens in {m.blocks(r.rid)} blocks",
                        (r.rid,),
                    )
                )
        return out
