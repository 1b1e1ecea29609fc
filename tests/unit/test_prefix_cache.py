"""`PrefixCache`: exact matches, splits, namespaces, page alignment, locks, LRU eviction;
a property keeping the accounting identity and exact index ownership under random use."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorainv.impl.kv_pool import TokenAllocator
from lorainv.impl.prefix_cache import Node, PrefixCache


def _l(a: np.ndarray | None) -> list[int]:
    assert a is not None
    return [int(x) for x in a]


def _setup(size: int = 32, page_size: int = 1, enabled: bool = True) -> tuple[TokenAllocator, PrefixCache]:
    alloc = TokenAllocator(size, page_size=page_size)
    return alloc, PrefixCache(alloc, page_size=page_size, enabled=enabled)


def _put(alloc: TokenAllocator, cache: PrefixCache, ns: Hashable, tokens: list[int]) -> tuple[list[int], int]:
    """Allocate KV for ``tokens``, insert it, free the part that was already cached (as a request does)."""
    idx = alloc.alloc(len(tokens))
    assert idx is not None
    pos = cache.insert(ns, tokens, idx)
    if pos:
        alloc.free(idx[:pos])
    return _l(idx), pos


def _match(cache: PrefixCache, ns: Hashable, tokens: list[int]) -> list[int]:
    return _l(cache.match_prefix(ns, tokens).indices)


def _keys(cache: PrefixCache) -> list[tuple[int, ...]]:
    return [n.key for n in cache.iter_nodes()]


def _sizes(cache: PrefixCache) -> tuple[int, int, int]:
    return cache.evictable_size(), cache.protected_size(), cache.total_size()


def _evict_one_step(alloc: TokenAllocator, cache: PrefixCache, n: int = 1) -> list[int]:
    """Evict and return exactly the indices that became free, ascending."""
    before = set(_l(alloc.free_indices()))
    freed = cache.evict(n)
    newly = sorted(set(_l(alloc.free_indices())) - before)
    assert freed == len(newly)
    return newly


# -- matching and splitting ----------------------------------------------------------------


def test_exact_match_lengths() -> None:
    alloc, cache = _setup()
    idx, pos = _put(alloc, cache, None, [10, 11, 12, 13])
    assert (idx, pos) == ([1, 2, 3, 4], 0)
    assert _sizes(cache) == (4, 0, 4)
    assert _match(cache, None, [10, 11, 12, 13, 14]) == [1, 2, 3, 4]
    assert _match(cache, None, [10, 11, 12, 13]) == [1, 2, 3, 4]
    assert _match(cache, None, [10, 11, 9]) == [1, 2]
    assert _match(cache, None, [10]) == [1]
    assert _match(cache, None, [11, 12]) == []
    assert _match(cache, None, []) == []
    assert cache.match_prefix(None, [10, 11]).length == 2


def test_match_splits_a_node_without_changing_sizes() -> None:
    alloc, cache = _setup()
    _put(alloc, cache, None, [1, 2, 3, 4])
    assert _keys(cache) == [(1, 2, 3, 4)]
    assert _match(cache, None, [1, 2, 9]) == [1, 2]
    assert _keys(cache) == [(1, 2), (3, 4)]
    assert _match(cache, None, [1, 2, 3]) == [1, 2, 3]
    assert _keys(cache) == [(1, 2), (3,), (4,)]
    assert _sizes(cache) == (4, 0, 4)
    values = [_l(n.value) for n in cache.iter_nodes()]
    assert values == [[1, 2], [3], [4]]


def test_insert_splits_and_returns_cached_length() -> None:
    alloc, cache = _setup()
    _put(alloc, cache, None, [1, 2, 3, 4])
    idx, pos = _put(alloc, cache, None, [1, 2, 5, 6])
    assert (idx, pos) == ([5, 6, 7, 8], 2)
    assert _keys(cache) == [(1, 2), (3, 4), (5, 6)]
    assert [_l(n.value) for n in cache.iter_nodes()] == [[1, 2], [3, 4], [7, 8]]
    assert _sizes(cache) == (6, 0, 6)
    assert _l(alloc.free_indices()) == [5, 6, *range(9, 33)]  # the duplicate part went back
    assert _match(cache, None, [1, 2, 5, 6, 7]) == [1, 2, 7, 8]


def test_insert_of_cached_or_extended_sequence() -> None:
    alloc, cache = _setup()
    _put(alloc, cache, None, [1, 2, 3, 4])
    idx, pos = _put(alloc, cache, None, [1, 2, 3, 4])
    assert (idx, pos) == ([5, 6, 7, 8], 4)
    assert _sizes(cache) == (4, 0, 4)
    idx, pos = _put(alloc, cache, None, [1, 2, 3, 4, 5, 6])
    assert (idx, pos) == ([5, 6, 7, 8, 9, 10], 4)
    assert _keys(cache) == [(1, 2, 3, 4), (5, 6)]
    assert _match(cache, None, [1, 2, 3, 4, 5, 6]) == [1, 2, 3, 4, 9, 10]
    assert cache.insert(None, [], np.zeros(0, dtype=np.int64)) == 0


def test_namespaces_are_isolated() -> None:
    alloc, cache = _setup()
    _put(alloc, cache, "a", [1, 2, 3])
    assert _match(cache, "b", [1, 2, 3]) == []
    assert _match(cache, None, [1, 2, 3]) == []
    idx, pos = _put(alloc, cache, "b", [1, 2, 3])
    assert (idx, pos) == ([4, 5, 6], 0)  # not shared with 'a'
    idx, pos = _put(alloc, cache, None, [1, 2])
    assert (idx, pos) == ([7, 8], 0)
    assert _match(cache, "a", [1, 2, 3]) == [1, 2, 3]
    assert _match(cache, "b", [1, 2, 3]) == [4, 5, 6]
    assert _match(cache, None, [1, 2, 3]) == [7, 8]
    assert [n.namespace for n in cache.iter_nodes()] == ["a", "b", None]
    assert _sizes(cache) == (8, 0, 8)


def test_page_alignment_page_size_2() -> None:
    alloc, cache = _setup(size=16, page_size=2)
    tokens = [5, 6, 7, 8, 9]
    kv = alloc.alloc(6)  # a 5-token request holds 3 whole pages
    assert _l(kv) == [2, 3, 4, 5, 6, 7]
    assert kv is not None
    with pytest.raises(ValueError, match="page-aligned"):
        cache.insert(None, tokens, kv[:5])  # a partial page is never inserted
    with pytest.raises(ValueError, match="equal length"):
        cache.insert(None, tokens[:4], kv)
    assert _sizes(cache) == (0, 0, 0)
    aligned = len(tokens) - len(tokens) % 2
    assert cache.insert(None, tokens[:aligned], kv[:aligned]) == 0  # the 5-token request caches 4
    alloc.free(kv[aligned:])
    assert _sizes(cache) == (4, 0, 4)
    assert _match(cache, None, tokens) == [2, 3, 4, 5]
    assert _match(cache, None, [5, 6, 7]) == [2, 3]  # 3 tokens: one whole page
    assert _match(cache, None, [5]) == []
    assert _match(cache, None, [5, 6, 7, 99, 1, 1]) == [2, 3]  # diverges inside page 2: aligned down
    assert _keys(cache) == [(5, 6), (7, 8)]


def test_page_size_2_divergence_inside_a_page_makes_sibling_pages() -> None:
    alloc, cache = _setup(size=16, page_size=2)
    _put(alloc, cache, None, [1, 2, 3, 4])
    idx, pos = _put(alloc, cache, None, [1, 2, 3, 9])
    assert (idx, pos) == ([6, 7, 8, 9], 2)
    assert _keys(cache) == [(1, 2), (3, 4), (3, 9)]
    assert _match(cache, None, [1, 2, 3, 9]) == [2, 3, 8, 9]
    assert _match(cache, None, [1, 2, 3, 4]) == [2, 3, 4, 5]
    assert all(len(n.key) % 2 == 0 for n in cache.iter_nodes())


def test_disabled_cache_matches_nothing_and_keeps_nothing() -> None:
    alloc, cache = _setup(enabled=False)
    idx = alloc.alloc(3)
    assert idx is not None
    assert cache.insert(None, [1, 2, 3], idx) == 0
    assert _match(cache, None, [1, 2, 3]) == []
    assert _sizes(cache) == (0, 0, 0)
    assert list(cache.iter_nodes()) == []
    assert cache.evict(10) == 0
    assert alloc.available_size() == 29  # the caller still owns its indices


# -- locks ---------------------------------------------------------------------------------


def test_lock_refs_move_sizes_between_evictable_and_protected() -> None:
    alloc, cache = _setup()
    _put(alloc, cache, None, [1, 2, 3, 4])
    short = cache.match_prefix(None, [1, 2])
    cache.inc_lock_ref(short.node)
    assert _sizes(cache) == (2, 2, 4)
    full = cache.match_prefix(None, [1, 2, 3, 4])
    cache.inc_lock_ref(full.node)
    assert _sizes(cache) == (0, 4, 4)
    assert [n.lock_ref for n in cache.iter_nodes()] == [2, 1]
    cache.inc_lock_ref(full.node)  # a second lock on a locked path moves nothing
    assert _sizes(cache) == (0, 4, 4)
    cache.dec_lock_ref(full.node)
    cache.dec_lock_ref(full.node)
    assert _sizes(cache) == (2, 2, 4)
    cache.dec_lock_ref(short.node)
    assert _sizes(cache) == (4, 0, 4)
    assert [n.lock_ref for n in cache.iter_nodes()] == [0, 0]
    with pytest.raises(ValueError, match="unbalanced dec_lock_ref"):
        cache.dec_lock_ref(short.node)
    assert _sizes(cache) == (4, 0, 4)


def test_lock_of_empty_match_is_noop() -> None:
    alloc, cache = _setup()
    _put(alloc, cache, None, [1, 2])
    miss = cache.match_prefix(None, [7])
    cache.inc_lock_ref(miss.node)
    cache.dec_lock_ref(miss.node)
    assert _sizes(cache) == (2, 0, 2)


def test_split_of_locked_node_keeps_accounting() -> None:
    alloc, cache = _setup()
    _put(alloc, cache, None, [1, 2, 3, 4])
    m = cache.match_prefix(None, [1, 2, 3, 4])
    cache.inc_lock_ref(m.node)
    _match(cache, None, [1, 2, 9])  # splits the locked node
    assert _keys(cache) == [(1, 2), (3, 4)]
    assert [n.lock_ref for n in cache.iter_nodes()] == [1, 1]
    assert _sizes(cache) == (0, 4, 4)
    cache.dec_lock_ref(m.node)
    assert _sizes(cache) == (4, 0, 4)


# -- eviction ------------------------------------------------------------------------------


def test_evict_order_is_lru_of_leaves() -> None:
    alloc, cache = _setup()
    _put(alloc, cache, None, [1, 1])  # [1, 2]
    _put(alloc, cache, None, [2, 2])  # [3, 4]
    _put(alloc, cache, "x", [3, 3])  # [5, 6]
    _match(cache, None, [2, 2, 7])  # touches [2, 2]: now the most recent
    assert _evict_one_step(alloc, cache) == [1, 2]
    assert _evict_one_step(alloc, cache) == [5, 6]
    assert _evict_one_step(alloc, cache) == [3, 4]
    assert _evict_one_step(alloc, cache) == []
    assert _sizes(cache) == (0, 0, 0)
    assert alloc.available_size() == 32


def test_evict_stops_once_enough_is_freed() -> None:
    alloc, cache = _setup()
    _put(alloc, cache, None, [1, 1, 1])  # [1, 2, 3]
    _put(alloc, cache, None, [2])  # [4]
    _put(alloc, cache, None, [3, 3])  # [5, 6]
    assert cache.evict(2) == 3  # a whole leaf of 3 covers 2
    assert _keys(cache) == [(2,), (3, 3)]
    assert cache.evict(2) == 3  # [2] (1 token) is not enough: [3, 3] goes too
    assert cache.evict(0) == 0
    assert _sizes(cache) == (0, 0, 0)


def test_locked_nodes_are_never_evicted() -> None:
    alloc, cache = _setup()
    _put(alloc, cache, None, [1, 2, 3])  # [1, 2, 3]
    _put(alloc, cache, None, [1, 2, 4])  # [6] new; [4, 5] were freed
    m = cache.match_prefix(None, [1, 2, 4])
    cache.inc_lock_ref(m.node)
    assert _sizes(cache) == (1, 3, 4)
    assert _evict_one_step(alloc, cache, 100) == [3]
    assert _keys(cache) == [(1, 2), (4,)]
    assert cache.evict(100) == 0
    assert _sizes(cache) == (0, 3, 3)
    cache.dec_lock_ref(m.node)
    assert _evict_one_step(alloc, cache, 100) == [1, 2, 6]
    assert alloc.available_size() == 32


def test_parent_becomes_evictable_after_its_children_go() -> None:
    alloc, cache = _setup()
    _put(alloc, cache, None, [1, 2, 3])  # [1, 2, 3]
    _put(alloc, cache, None, [1, 2, 4])  # [6]
    assert _keys(cache) == [(1, 2), (3,), (4,)]
    assert _evict_one_step(alloc, cache) == [3]  # oldest leaf
    assert _keys(cache) == [(1, 2), (4,)]
    assert _evict_one_step(alloc, cache) == [6]  # the parent is not a leaf until now
    assert _keys(cache) == [(1, 2)]
    assert _evict_one_step(alloc, cache) == [1, 2]
    assert list(cache.iter_nodes()) == []


def test_evict_all_in_one_call_goes_children_first(monkeypatch: pytest.MonkeyPatch) -> None:
    alloc, cache = _setup()
    _put(alloc, cache, None, [1, 2, 3])
    _put(alloc, cache, None, [1, 2, 4])
    order: list[list[int]] = []
    real_free = alloc.free

    def recording_free(idx: np.ndarray) -> None:
        order.append(_l(np.asarray(idx)))
        real_free(idx)

    monkeypatch.setattr(alloc, "free", recording_free)
    assert cache.evict(100) == 4
    assert order == [[3], [6], [1, 2]]


# -- property ------------------------------------------------------------------------------

NAMESPACES = [None, "a", "b"]
# shared stems plus a short random tail, so that matches, splits and locked paths are common
STEMS = [[0, 0], [0, 1, 0, 1], [1, 1, 1, 1, 2, 2]]
TOKENS = st.builds(lambda stem, tail: stem + tail, st.sampled_from(STEMS), st.lists(st.integers(0, 2), max_size=4))


@dataclass(frozen=True)
class Insert:
    ns: str | None
    tokens: list[int]


@dataclass(frozen=True)
class MatchOp:
    ns: str | None
    tokens: list[int]


@dataclass(frozen=True)
class Lock:
    ns: str | None
    tokens: list[int]


@dataclass(frozen=True)
class Unlock:
    pick: int


@dataclass(frozen=True)
class Evict:
    n: int


@dataclass(frozen=True)
class Hold:
    pages: int


@dataclass(frozen=True)
class Release:
    pick: int


NS = st.sampled_from(NAMESPACES)  # None first: shrinks towards the base model
ACTIONS = st.lists(
    st.one_of(
        st.builds(Insert, NS, TOKENS),
        st.builds(MatchOp, NS, TOKENS),
        st.builds(Lock, NS, TOKENS),
        st.builds(Unlock, st.integers(0, 100)),
        st.builds(Evict, st.integers(0, 4)),
        st.builds(Hold, st.integers(1, 3)),
        st.builds(Release, st.integers(0, 100)),
    ),
    min_size=10,
    max_size=60,
)

Key = tuple[Hashable, tuple[int, ...]]


class Harness:
    """The cache plus a shadow of it, page by page.

    ``shadow[(namespace, prefix)]`` (``prefix`` a whole number of pages) holds the token
    indices of the prefix's last page: the radix tree's content flattened to pages.
    """

    def __init__(self, page_size: int, num_pages: int) -> None:
        self.ps = page_size
        self.alloc = TokenAllocator(num_pages * page_size, page_size=page_size)
        self.cache = PrefixCache(self.alloc, page_size=page_size)
        self.usable = set(range(page_size, (num_pages + 1) * page_size))
        self.shadow: dict[Key, tuple[int, ...]] = {}
        self.locks: list[tuple[Node, Hashable, tuple[int, ...]]] = []
        self.held: list[list[int]] = []

    def aligned(self, tokens: list[int]) -> list[int]:
        return tokens[: len(tokens) - len(tokens) % self.ps]

    def expected_match(self, ns: Hashable, tokens: list[int]) -> list[int]:
        out: list[int] = []
        for end in range(self.ps, len(tokens) + 1, self.ps):
            page = self.shadow.get((ns, tuple(tokens[:end])))
            if page is None:
                break
            out.extend(page)
        return out

    def locked_keys(self) -> set[Key]:
        return {(ns, path[:end]) for _, ns, path in self.locks for end in range(self.ps, len(path) + 1, self.ps)}

    def obtain(self, n: int) -> list[int] | None:
        got = self.alloc.alloc(n)
        if got is None:
            self.evict(n - self.alloc.available_size())
            got = self.alloc.alloc(n)
        return None if got is None else _l(got)

    def evict(self, n: int) -> None:
        evictable = self.cache.evictable_size()
        before = set(_l(self.alloc.free_indices()))
        freed = self.cache.evict(n)
        newly = set(_l(self.alloc.free_indices())) - before
        assert freed == len(newly)
        assert min(n, evictable) <= freed <= evictable
        if freed < n:
            assert self.cache.evictable_size() == 0
        removed = {k for k, page in self.shadow.items() if newly & set(page)}
        assert all(set(self.shadow[k]) <= newly for k in removed), "a page was freed in part"
        assert len(removed) * self.ps == freed
        assert not removed & self.locked_keys(), "a locked prefix was evicted"
        for k in removed:
            del self.shadow[k]

    def apply(self, action: object) -> None:
        if isinstance(action, Insert):
            tokens = self.aligned(action.tokens)
            if not tokens:
                return
            idx = self.obtain(len(tokens))  # may evict first
            if idx is None:
                return
            expect = len(self.expected_match(action.ns, tokens))
            pos = self.cache.insert(action.ns, tokens, np.array(idx))
            assert pos == expect
            if pos:
                self.alloc.free(idx[:pos])
            for end in range(pos + self.ps, len(tokens) + 1, self.ps):
                self.shadow[(action.ns, tuple(tokens[:end]))] = tuple(idx[end - self.ps : end])
        elif isinstance(action, (MatchOp, Lock)):
            m = self.cache.match_prefix(action.ns, action.tokens)
            assert _l(m.indices) == self.expected_match(action.ns, action.tokens)
            if isinstance(action, Lock):
                self.cache.inc_lock_ref(m.node)
                self.locks.append((m.node, action.ns, tuple(action.tokens[: m.length])))
        elif isinstance(action, Unlock) and self.locks:
            node, _, _ = self.locks.pop(action.pick % len(self.locks))
            self.cache.dec_lock_ref(node)
        elif isinstance(action, Evict):
            self.evict(action.n)
        elif isinstance(action, Hold):
            got = self.obtain(action.pages * self.ps)
            if got is not None:
                self.held.append(got)
        elif isinstance(action, Release) and self.held:
            self.alloc.free(self.held.pop(action.pick % len(self.held)))

    def path_of(self, node: Node) -> tuple[int, ...]:
        keys: list[tuple[int, ...]] = []
        n: Node | None = node
        while n is not None:
            keys.append(n.key)
            n = n.parent
        return tuple(t for k in reversed(keys) for t in k)

    def check(self) -> None:
        cache, alloc = self.cache, self.alloc
        nodes = list(cache.iter_nodes())
        assert cache.evictable_size() + cache.protected_size() == sum(len(n.key) for n in nodes)
        assert cache.total_size() == sum(len(n.key) for n in nodes)
        assert cache.protected_size() == sum(len(n.key) for n in nodes if n.lock_ref > 0)
        assert cache.protected_size() == len(self.locked_keys()) * self.ps
        for n in nodes:
            assert len(n.key) == len(n.value) > 0
            assert len(n.key) % self.ps == 0
            path = self.path_of(n)
            locks_through = sum(1 for _, ns, p in self.locks if ns == n.namespace and p[: len(path)] == path)
            assert n.lock_ref == locks_through
        cached = [int(i) for n in nodes for i in n.value]
        assert len(cached) == len(set(cached)), "a cached index appears twice"
        assert set(cached) == {i for page in self.shadow.values() for i in page}
        assert all(not alloc.is_free(i) for i in cached)
        free = _l(alloc.free_indices())
        held = [i for block in self.held for i in block]
        assert len(cached) + len(free) + len(held) == len(self.usable), "an index is owned twice or lost"
        assert set(cached) | set(free) | set(held) == self.usable
        for ns, prefix in self.shadow:
            if len(prefix) > self.ps:
                assert (ns, prefix[: -self.ps]) in self.shadow, "the cache is not prefix-closed"

    def drain(self) -> None:
        while self.locks:
            node, _, _ = self.locks.pop()
            self.cache.dec_lock_ref(node)
        self.evict(len(self.usable))
        assert self.cache.total_size() == 0
        assert self.shadow == {}
        for block in self.held:
            self.alloc.free(block)
        assert self.alloc.available_size() == len(self.usable)


@settings(derandomize=True, max_examples=100, deadline=None)
@given(page_size=st.sampled_from([1, 2]), actions=ACTIONS)
def test_random_use_keeps_accounting_and_ownership(page_size: int, actions: list[object]) -> None:
    h = Harness(page_size, num_pages=32 // page_size)
    for action in actions:
        h.apply(action)
        h.check()
    h.drain()
