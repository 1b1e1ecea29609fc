"""Prefix cache: sizes match the tree, locks match the requests that borrow from it."""

from __future__ import annotations

from collections import Counter

import numpy as np

from lorainv.checkers.base import register, shown
from lorainv.errors import Violation
from lorainv.snapshot import PrefixNodeSnap, ReqSnap, Snapshot


@register("prefix")
class PrefixChecker:
    """``evictable + protected == Σ node sizes``; ``protected == Σ locked node sizes``;
    each node's lock count equals the live requests whose borrowed prefix runs through it;
    a request's protected prefix is exactly the indices on its node's path (P3), and the tokens
    on that path are the first tokens it asked for, under its own adapter (P4)."""

    def check(self, snap: Snapshot) -> list[Violation]:
        out: list[Violation] = []
        nodes = {n.id: n for n in snap.prefix_nodes}
        size = sum(len(n.indices) for n in nodes.values())
        locked = sum(len(n.indices) for n in nodes.values() if n.lock_ref > 0)
        if snap.evictable + snap.protected != size:
            out.append(
                Violation(
                    "prefix",
                    "P1",
                    f"evictable {snap.evictable} + protected {snap.protected} != tree tokens {size}",
                )
            )
        if snap.protected != locked:
            out.append(Violation("prefix", "P1", f"protected {snap.protected} != locked node tokens {locked}"))
        if any(len(n.indices) % snap.page_size for n in nodes.values()):
            bad = [n.id for n in nodes.values() if len(n.indices) % snap.page_size]
            out.append(Violation("prefix", "P2", "prefix nodes not page aligned", shown(bad)))
        expected: Counter[int] = Counter()
        for r in snap.live():
            node = r.cache_node
            path: list[int] = []
            while node is not None:
                if node not in nodes:
                    out.append(Violation("prefix", "P3", f"request {r.rid} locks a node not in the tree", (node,)))
                    break
                expected[node] += 1
                path.append(node)
                node = nodes[node].parent
            if r.cache_len:
                parts = [nodes[i].indices for i in reversed(path) if i in nodes]
                held = np.concatenate(parts) if parts else np.zeros(0, np.int64)
                if not np.array_equal(held, r.indices[: r.cache_len]):
                    out.append(
                        Violation("prefix", "P3", f"request {r.rid}'s protected prefix is not its node path", (r.rid,))
                    )
            if path:
                out.extend(_borrowed_tokens(r, [nodes[i] for i in reversed(path) if i in nodes]))
        bad_keys = [n.id for n in nodes.values() if len(n.key) != len(n.indices)]
        if bad_keys:
            out.append(
                Violation("prefix", "P2", "prefix nodes whose token key and indices differ in length", shown(bad_keys))
            )
        wrong = [(i, n.lock_ref, expected[i]) for i, n in nodes.items() if n.lock_ref != expected[i]]
        if wrong:
            i, have, want = wrong[0]
            out.append(
                Violation(
                    "prefix",
                    "P3",
                    f"lock refs do not match borrowing requests (node {i}: lock_ref {have}, live borrowers {want})",
                    shown(w[0] for w in wrong),
                )
            )
        return out


def _borrowed_tokens(r: ReqSnap, path: list[PrefixNodeSnap]) -> list[Violation]:
    """P4: the KV a request borrows was computed for its own first tokens, with its own adapter."""
    out: list[Violation] = []
    keys = tuple(t for n in path for t in n.key)
    if keys != tuple(r.fill[: len(keys)]) or len(keys) != r.cache_len:
        out.append(
            Violation(
                "prefix",
                "P4",
                f"request {r.rid} borrows cached KV of tokens {list(keys[:8])}... ({len(keys)} tokens) "
                f"for its first {r.cache_len} tokens {list(r.fill[:8])}...",
                (r.rid,),
            )
        )
    others = sorted({repr(n.namespace) for n in path if n.namespace != r.adapter})
    if others:
        out.append(
            Violation(
                "prefix",
                "P4",
                f"request {r.rid} on {r.adapter!r} borrows KV cached under {', '.join(others)}",
                (r.rid,),
            )
        )
    return out
