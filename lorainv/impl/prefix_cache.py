"""A page-aligned radix tree over token ids, one tree per adapter namespace.

The same tokens under different adapters produce different KV, so they never share a
node: each namespace (adapter name, ``None`` for the base model) has its own root.

Invariants:
* every node except a root holds ``len(key) == len(value)`` tokens, a multiple of
  ``page_size``, and its token indices belong to the cache alone;
* ``evictable_size() + protected_size() == total_size()`` where protected nodes are those
  with ``lock_ref > 0``; a node's lock count is the number of locked descendants-or-self
  paths through it, so a locked node's ancestors are locked too;
* ``evict`` only removes unlocked leaves, least recently used first (a logical clock, never
  wall time), and frees their indices to the allocator.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from lorainv.impl.kv_pool import TokenAllocator

_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass(eq=False)
class Node:
    id: int
    namespace: Hashable
    key: tuple[int, ...]
    value: np.ndarray
    parent: Node | None
    children: dict[tuple[int, ...], Node] = field(default_factory=dict)
    lock_ref: int = 0
    last_access: int = 0

    @property
    def is_root(self) -> bool:
        return self.parent is None


@dataclass(frozen=True)
class Match:
    """``indices`` of the longest cached page-aligned prefix; lock ``node`` to keep them."""

    indices: np.ndarray
    node: Node

    @property
    def length(self) -> int:
        return len(self.indices)


class PrefixCache:
    """Radix prefix cache; see the module docstring for its invariants."""

    def __init__(self, allocator: TokenAllocator, page_size: int = 1, enabled: bool = True) -> None:
        self.allocator = allocator
        self.page_size = page_size
        self.enabled = enabled
        self._ids = itertools.count(1)
        self._tick = 0
        self._roots: dict[Hashable, Node] = {}
        self._evictable = 0
        self._protected = 0

    # -- queries -------------------------------------------------------------------------
    def evictable_size(self) -> int:
        return self._evictable

    def protected_size(self) -> int:
        return self._protected

    def total_size(self) -> int:
        return self._evictable + self._protected

    def _root(self, namespace: Hashable) -> Node:
        root = self._roots.get(namespace)
        if root is None:
            root = Node(next(self._ids), namespace, (), _EMPTY, None, lock_ref=1)
            self._roots[namespace] = root
        return root

    def _align(self, n: int) -> int:
        return n - n % self.page_size

    def _common(self, a: tuple[int, ...], b: Sequence[int]) -> int:
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        return self._align(n)

    def _split(self, child: Node, at: int) -> Node:
        """Split ``child`` so that a new parent holds its first ``at`` tokens."""
        assert child.parent is not None and 0 < at < len(child.key)
        mid = Node(
            next(self._ids),
            child.namespace,
            child.key[:at],
            child.value[:at],
            child.parent,
            lock_ref=child.lock_ref,
            last_access=child.last_access,
        )
        child.parent.children[mid.key[: self.page_size]] = mid
        child.key, child.value, child.parent = child.key[at:], child.value[at:], mid
        mid.children[child.key[: self.page_size]] = child
        return mid

    def _walk(self, namespace: Hashable, tokens: Sequence[int]) -> tuple[Node, int, list[np.ndarray]]:
        """Descend along ``tokens``; split at a partial page-aligned match. Returns (node, matched, values)."""
        self._tick += 1
        node = self._root(namespace)
        node.last_access = self._tick
        pos, values = 0, []
        while pos < len(tokens):
            child = node.children.get(tuple(tokens[pos : pos + self.page_size]))
            if child is None:
                break
            n = self._common(child.key, tokens[pos:])
            if n == 0:
                break
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = self._tick
            values.append(child.value)
            pos += n
            node = child
        return node, pos, values

    def match_prefix(self, namespace: Hashable, tokens: Sequence[int]) -> Match:
        """Longest cached page-aligned prefix of ``tokens`` in ``namespace``.

        Takes no lock, but mutates the tree: it splits the node where the match ends inside an
        edge (same tokens and indices, one more node), creates the namespace's root on first
        use, and refreshes the LRU access tick of every node on the matched path.
        """
        if not self.enabled:
            return Match(_EMPTY, self._root(namespace))
        usable = self._align(len(tokens))
        node, _, values = self._walk(namespace, list(tokens[:usable]))
        return Match(np.concatenate(values) if values else _EMPTY, node)

    def insert(self, namespace: Hashable, tokens: Sequence[int], indices: np.ndarray) -> int:
        """Insert a page-aligned ``tokens -> indices``; returns how many leading tokens were
        already cached (the caller still owns, and must free, those of its own indices)."""
        if len(tokens) != len(indices) or len(tokens) % self.page_size:
            raise ValueError("insert needs page-aligned tokens and indices of equal length")
        if not self.enabled or not len(tokens):
            return 0
        tokens = list(tokens)
        node, pos, _ = self._walk(namespace, tokens)
        if pos < len(tokens):
            leaf = Node(
                next(self._ids),
                namespace,
                tuple(tokens[pos:]),
                np.asarray(indices[pos:], dtype=np.int64).copy(),
                node,
                last_access=self._tick,
            )
            node.children[leaf.key[: self.page_size]] = leaf
            self._evictable += len(leaf.key)
        return pos

    # -- locks ---------------------------------------------------------------------------
    def inc_lock_ref(self, node: Node) -> None:
        """Protect ``node`` and its ancestors from eviction."""
        while node.parent is not None:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def dec_lock_ref(self, node: Node) -> None:
        while node.parent is not None:
            if node.lock_ref <= 0:
                raise ValueError(f"unbalanced dec_lock_ref on prefix node {node.id}")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._protected -= len(node.key)
                self._evictable += len(node.key)
            node = node.parent

    # -- eviction ------------------------------------------------------------------------
    def evict(self, num_tokens: int) -> int:
        """Free at least ``num_tokens`` tokens (fewer if not possible) from unlocked leaves, LRU first."""
        heap = [(n.last_access, n.id, n) for n in self.iter_nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_tokens:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.key[: self.page_size]]
            self.allocator.free(leaf.value)
            self._evictable -= len(leaf.key)
            freed += len(leaf.key)
            if parent.parent is not None and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, parent.id, parent))
        return freed

    def drop_namespace(self, namespace: Hashable) -> int:
        """Free every node of ``namespace`` and forget it; returns the tokens freed.

        For an adapter being unloaded: a later adapter of the same name has other weights, so
        KV cached under the old one must never match again. Raises ``ValueError`` (nothing
        changed) when a node of the namespace is locked by a live request.
        """
        root = self._roots.get(namespace)
        if root is None:
            return 0
        nodes: list[Node] = []
        stack = list(root.children.values())
        while stack:
            n = stack.pop()
            nodes.append(n)
            stack.extend(n.children.values())
        if any(n.lock_ref for n in nodes):
            raise ValueError(f"prefix-cache namespace {namespace!r} is locked by a live request")
        freed = sum(len(n.key) for n in nodes)
        for n in nodes:
            self.allocator.free(n.value)
        self._evictable -= freed
        del self._roots[namespace]
        return freed

    def iter_nodes(self) -> Iterator[Node]:
        """Every non-root node, depth first, namespaces in insertion order."""
        stack = [c for r in reversed(list(self._roots.values())) for c in reversed(list(r.children.values()))]
        while stack:
            n = stack.pop()
            yield n
            stack.extend(reversed(list(n.children.values())))
