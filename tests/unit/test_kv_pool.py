"""`TokenAllocator` (exact indices, vLLM style) and `ReqToTokenPool`; a no-alias/no-loss property."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorainv.errors import PoolError
from lorainv.impl.kv_pool import ReqToTokenPool, TokenAllocator


def _l(a: np.ndarray | None) -> list[int]:
    assert a is not None
    return [int(x) for x in a]


def _alloc(pool: TokenAllocator, n: int) -> list[int]:
    return _l(pool.alloc(n))


def _snapshot(pool: TokenAllocator) -> tuple[list[int], int]:
    return _l(pool.free_indices()), pool.available_size()


# -- TokenAllocator: exact indices ---------------------------------------------------------


def test_page_size_1_exact_indices() -> None:
    pool = TokenAllocator(8, page_size=1)
    assert pool.num_pages == 8
    assert pool.buffer_len == 9
    assert pool.available_size() == 8
    assert _l(pool.free_indices()) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert _alloc(pool, 3) == [1, 2, 3]
    assert _alloc(pool, 2) == [4, 5]
    pool.free([2, 4])
    assert _l(pool.free_indices()) == [2, 4, 6, 7, 8]
    assert pool.available_size() == 5
    assert _alloc(pool, 3) == [2, 4, 6]  # lowest free first, not contiguous
    assert _alloc(pool, 2) == [7, 8]
    assert pool.available_size() == 0
    assert pool.alloc(1) is None
    pool.free(np.array([8, 1, 5]))
    assert _l(pool.free_indices()) == [1, 5, 8]


def test_page_size_2_exact_indices() -> None:
    pool = TokenAllocator(8, page_size=2)
    assert pool.num_pages == 4
    assert pool.buffer_len == 10
    assert _l(pool.free_indices()) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert _alloc(pool, 2) == [2, 3]
    assert _alloc(pool, 4) == [4, 5, 6, 7]
    pool.free([2, 3])
    assert _l(pool.free_indices()) == [2, 3, 8, 9]
    assert _alloc(pool, 4) == [2, 3, 8, 9]
    assert pool.available_size() == 0
    pool.free([6, 7, 4, 5])  # order within the free call does not matter
    assert _l(pool.free_indices()) == [4, 5, 6, 7]


def test_page_size_4_exact_indices() -> None:
    pool = TokenAllocator(16, page_size=4)
    assert pool.buffer_len == 20
    assert _alloc(pool, 4) == [4, 5, 6, 7]
    assert _alloc(pool, 8) == [8, 9, 10, 11, 12, 13, 14, 15]
    pool.free(list(range(4, 8)))
    assert _l(pool.free_indices()) == [4, 5, 6, 7, 16, 17, 18, 19]
    assert _alloc(pool, 8) == [4, 5, 6, 7, 16, 17, 18, 19]
    assert _l(pool.free_indices()) == []


@pytest.mark.parametrize("page_size", [1, 2, 4])
def test_index_zero_is_never_handed_out(page_size: int) -> None:
    pool = TokenAllocator(4 * page_size, page_size=page_size)
    got = _alloc(pool, 4 * page_size)
    assert min(got) == page_size
    assert 0 not in got
    assert sorted(got) == list(range(page_size, 5 * page_size))
    assert pool.is_free(0) is False


def test_is_free_and_can_alloc() -> None:
    pool = TokenAllocator(4, page_size=2)
    assert [pool.is_free(i) for i in range(-1, 7)] == [False, False, False, True, True, True, True, False]
    pool.alloc(2)
    assert [pool.is_free(i) for i in range(2, 6)] == [False, False, True, True]
    assert pool.can_alloc(2) is True
    assert pool.can_alloc(3) is False


def test_pages_for() -> None:
    pool = TokenAllocator(16, page_size=4)
    assert [pool.pages_for(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_alloc_accepts_numpy_int() -> None:
    pool = TokenAllocator(4)
    assert _alloc(pool, np.int64(2)) == [1, 2]  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [0, -1, -4, True, 2.0, "2", None])
def test_alloc_invalid_size(n: object) -> None:
    pool = TokenAllocator(8, page_size=2)
    before = _snapshot(pool)
    with pytest.raises(ValueError, match="alloc size must be a positive int"):
        pool.alloc(n)  # type: ignore[arg-type]
    assert _snapshot(pool) == before


@pytest.mark.parametrize("page_size, n", [(2, 1), (2, 3), (4, 6), (4, 2)])
def test_alloc_non_multiple_of_page(page_size: int, n: int) -> None:
    pool = TokenAllocator(16, page_size=page_size)
    before = _snapshot(pool)
    with pytest.raises(ValueError, match=f"not a multiple of page_size={page_size}"):
        pool.alloc(n)
    assert _snapshot(pool) == before


@pytest.mark.parametrize("page_size", [1, 2, 4])
def test_alloc_beyond_capacity_is_none_and_no_partial(page_size: int) -> None:
    pool = TokenAllocator(4 * page_size, page_size=page_size)
    pool.alloc(page_size)
    before = _snapshot(pool)
    assert before[1] == 3 * page_size
    assert pool.alloc(4 * page_size) is None
    assert pool.alloc(100 * page_size) is None
    assert _snapshot(pool) == before
    assert len(_alloc(pool, 3 * page_size)) == 3 * page_size  # exactly the rest still fits


@pytest.mark.parametrize(
    "page_size, bad, match",
    [
        (1, [0], "outside the usable pool: \\[0\\]"),  # padding
        (1, [9], "outside the usable pool: \\[9\\]"),  # beyond the buffer
        (1, [-1], "outside the usable pool"),
        (1, [3], "double free"),  # never allocated (free)
        (1, [1, 1], "same index twice"),
        (1, [1, 3], "double free"),  # one allocated, one free: nothing changes
        (2, [0, 1], "outside the usable pool"),  # padding page
        (2, [2], "whole pages"),  # partial page
        (2, [2, 3, 4], "whole pages"),  # one page and a half
        (2, [2, 2], "whole pages"),  # same index twice covering a 2-count
        (2, [6, 7], "double free"),  # free page
        (2, [2, 3, 6, 7], "double free"),  # allocated page + free page
    ],
)
def test_bad_free_raises_and_changes_nothing(page_size: int, bad: list[int], match: str) -> None:
    pool = TokenAllocator(8, page_size=page_size)
    held = _alloc(pool, 2 * page_size)
    assert held == ([1, 2] if page_size == 1 else [2, 3, 4, 5])
    before = _snapshot(pool)
    with pytest.raises(PoolError, match=match):
        pool.free(bad)
    assert _snapshot(pool) == before


def test_double_free_after_valid_free() -> None:
    pool = TokenAllocator(4)
    got = pool.alloc(2)
    assert got is not None
    pool.free(got)
    before = _snapshot(pool)
    assert before == ([1, 2, 3, 4], 4)
    with pytest.raises(PoolError, match=r"double free of token indices starting at \[1, 2\]"):
        pool.free(got)
    assert _snapshot(pool) == before


def test_free_empty_is_noop() -> None:
    pool = TokenAllocator(4, page_size=2)
    pool.alloc(2)
    before = _snapshot(pool)
    pool.free([])
    pool.free(np.zeros(0, dtype=np.int64))
    assert _snapshot(pool) == before


@pytest.mark.parametrize("size, page_size", [(0, 1), (3, 2), (2, 4), (8, 0), (-4, 1)])
def test_bad_construction(size: int, page_size: int) -> None:
    with pytest.raises(ValueError, match="must be a positive multiple of page_size"):
        TokenAllocator(size, page_size=page_size)


# -- ReqToTokenPool ------------------------------------------------------------------------


def test_req_to_token_alloc_lowest_row_and_none_when_full() -> None:
    rows = ReqToTokenPool(3, max_context_len=4)
    assert rows.available_size() == 3
    assert [rows.alloc(), rows.alloc(), rows.alloc()] == [0, 1, 2]
    assert rows.alloc() is None
    assert rows.available_size() == 0
    rows.free(1)
    assert rows.free_rows() == [1]
    assert rows.alloc() == 1
    rows.free(2)
    rows.free(0)
    assert rows.free_rows() == [0, 2]
    assert rows.alloc() == 0


def test_req_to_token_double_and_foreign_free() -> None:
    rows = ReqToTokenPool(2, max_context_len=4)
    row = rows.alloc()
    assert row == 0
    rows.free(row)
    with pytest.raises(PoolError, match="double free of req_to_token row 0"):
        rows.free(0)
    with pytest.raises(PoolError, match="double free of req_to_token row 1"):
        rows.free(1)  # never allocated
    for bad in (-1, 2):
        with pytest.raises(PoolError, match=f"row {bad} is outside req_to_token"):
            rows.free(bad)
    assert rows.free_rows() == [0, 1]


def test_req_to_token_write_read() -> None:
    rows = ReqToTokenPool(2, max_context_len=6)
    row = rows.alloc()
    assert row == 0
    rows.write(row, 0, np.array([7, 8, 9]))
    rows.write(row, 3, np.array([20, 21]))
    assert rows.read(row, 0, 5).tolist() == [7, 8, 9, 20, 21]
    assert rows.read(row, 1, 3).tolist() == [8, 9]
    assert rows.read(1, 0, 6).tolist() == [0] * 6  # other row untouched
    out = rows.read(row, 0, 2)
    out[0] = 99  # a copy, not a view
    assert rows.read(row, 0, 1).tolist() == [7]
    with pytest.raises(PoolError, match="7 positions exceed max_context_len"):
        rows.write(row, 4, np.array([1, 2, 3]))
    assert rows.read(row, 0, 6).tolist() == [7, 8, 9, 20, 21, 0]
    rows.write(row, 5, np.array([5]))  # exactly to the end is fine
    assert rows.read(row, 5, 6).tolist() == [5]


@pytest.mark.parametrize("rows, ctx", [(0, 4), (2, 0)])
def test_req_to_token_bad_construction(rows: int, ctx: int) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        ReqToTokenPool(rows, ctx)


# -- property: random alloc/free never aliases and never loses an index --------------------


@dataclass(frozen=True)
class Alloc:
    pages: int


@dataclass(frozen=True)
class Free:
    pick: int  # which held block (modulo the number held)


@dataclass(frozen=True)
class BadFree:
    pick: int  # free an already-freed block, or the padding page when none was freed


def actions(max_pages: int, max_size: int) -> st.SearchStrategy[list[object]]:
    """Allocations of 1 to ``max_pages`` pages, frees and bad frees."""
    return st.lists(
        st.one_of(
            st.builds(Alloc, st.integers(1, max_pages)),
            st.builds(Free, st.integers(0, 1000)),
            st.builds(BadFree, st.integers(0, 1000)),
        ),
        min_size=8,
        max_size=max_size,
    )


@settings(derandomize=True, max_examples=100, deadline=None)
@given(page_size=st.sampled_from([1, 2, 4]), num_pages=st.integers(2, 12), actions=actions(4, 60))
def test_random_alloc_free_never_aliases_or_loses(page_size: int, num_pages: int, actions: list[object]) -> None:
    _run_against_model(page_size, num_pages, actions)


@settings(derandomize=True, max_examples=100, deadline=None)
@given(page_size=st.sampled_from([1, 3]), num_pages=st.integers(60, 900), actions=actions(160, 40))
def test_big_pools_still_hand_out_the_lowest_free_pages(page_size: int, num_pages: int, actions: list[object]) -> None:
    """Pools of many pages: the search for the lowest free pages runs over several doubling
    windows from the first page that may be free; the result must be what the model says."""
    _run_against_model(page_size, num_pages, actions)


def _run_against_model(page_size: int, num_pages: int, actions: list[object]) -> None:
    pool = TokenAllocator(num_pages * page_size, page_size=page_size)
    usable = set(range(page_size, (num_pages + 1) * page_size))
    held: list[list[int]] = []
    freed: list[list[int]] = []
    model_free_pages = set(range(1, num_pages + 1))

    for action in actions:
        if isinstance(action, Alloc):
            n = action.pages * page_size
            got = pool.alloc(n)
            if len(model_free_pages) < action.pages:
                assert got is None
            else:
                expect_pages = sorted(model_free_pages)[: action.pages]
                expect = [p * page_size + i for p in expect_pages for i in range(page_size)]
                assert _l(got) == expect  # lowest free pages, in order
                model_free_pages -= set(expect_pages)
                held.append(expect)
        elif isinstance(action, Free) and held:
            block = held.pop(action.pick % len(held))
            pool.free(block)
            model_free_pages |= {i // page_size for i in block}
            freed.append(block)
        elif isinstance(action, BadFree):
            block = freed[action.pick % len(freed)] if freed else list(range(page_size))
            if any(set(block) & set(h) for h in held):
                continue  # that block was re-allocated: freeing it is legal
            before = _snapshot(pool)
            with pytest.raises(PoolError):
                pool.free(block)
            assert _snapshot(pool) == before

        allocated = [i for block in held for i in block]
        free = _l(pool.free_indices())
        assert len(allocated) == len(set(allocated)), "an index is held twice"
        assert set(allocated).isdisjoint(free), "an index is both held and free"
        assert set(allocated) | set(free) == usable, "an index was lost"
        assert free == sorted(free)
        assert pool.available_size() == len(free) == len(model_free_pages) * page_size
        assert 0 not in allocated
        assert all(not pool.is_free(i) for i in allocated)

    for block in held:
        pool.free(block)
    assert pool.available_size() == num_pages * page_size
    assert set(_l(pool.free_indices())) == usable


def test_page_size_3_free_indices_and_available() -> None:
    pool = TokenAllocator(9, page_size=3)  # pages 1..3: indices 3..11
    assert _l(pool.free_indices()) == [3, 4, 5, 6, 7, 8, 9, 10, 11] and pool.available_size() == 9
    assert _alloc(pool, 3) == [3, 4, 5]
    assert _alloc(pool, 3) == [6, 7, 8]
    pool.free([3, 4, 5])
    assert _l(pool.free_indices()) == [3, 4, 5, 9, 10, 11] and pool.available_size() == 6


def test_lowest_free_pages_spread_over_several_search_windows() -> None:
    """Free pages one in ten: the 100 lowest span 1,000 pages, past the first search window."""
    pool = TokenAllocator(1200, page_size=1)
    blocks = [_alloc(pool, 1) for _ in range(1200)]
    assert pool.available_size() == 0 and pool.alloc(1) is None
    for b in blocks[::10]:
        pool.free(b)
    want = [b[0] for b in blocks[::10]][:100]
    assert want[-1] == 991
    assert _alloc(pool, 100) == want
    assert _alloc(pool, 20) == [b[0] for b in blocks[::10]][100:]
    assert pool.alloc(1) is None
