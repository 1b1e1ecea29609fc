"""Request lifecycle: states are valid, ended requests hold nothing, exactly one staged
chunk, outputs within their budget."""

from __future__ import annotations

from lorainv.checkers.base import register
from lorainv.errors import Violation
from lorainv.snapshot import Snapshot

STATES = {"waiting", "prefilling", "decoding", "finished", "aborted"}


@register("requests")
class RequestChecker:
    def check(self, snap: Snapshot) -> list[Violation]:
        out: list[Violation] = []
        prefilling = [r.rid for r in snap.requests if r.state == "prefilling"]
        if len(prefilling) > 1 or (prefilling and snap.staged != prefilling[0]) or (snap.staged and not prefilling):
            out.append(
                Violation("requests", "R1", f"staged {snap.staged} vs prefilling {prefilling}", tuple(prefilling))
            )
        for r in snap.requests:
            if r.state not in STATES:
                out.append(Violation("requests", "R1", f"{r.rid} in unknown state {r.state!r}", (r.rid,)))
            if r.output_len > r.max_new_tokens:
                out.append(
                    Violation("requests", "R2", f"{r.rid} produced {r.output_len} > {r.max_new_tokens}", (r.rid,))
                )
            if r.state in ("finished", "aborted") and (len(r.indices) or r.row is not None or r.cache_node):
                out.append(Violation("requests", "R3", f"{r.rid} is {r.state} but still holds memory", (r.rid,)))
            if r.state == "decoding" and r.kv_len != r.fill_len - 1:
                out.append(
                    Violation("requests", "R4", f"{r.rid} decoding with kv {r.kv_len}, fill {r.fill_len}", (r.rid,))
                )
        if snap.idle and snap.live():
            out.append(Violation("requests", "R5", "idle with live requests", tuple(r.rid for r in snap.live())))
        return out
