"""KV memory: a paged token allocator and the per-request ``req_to_token`` rows.

`TokenAllocator` hands out token indices a page at a time. Page ``p`` covers indices
``[p*page_size, (p+1)*page_size)``; page 0 is reserved, so index 0 (padding) is never
handed out. Usable pages are ``1 .. size // page_size``.

Invariants:
* every usable page is either free or allocated, never both (``_free`` mask);
* ``alloc(n)`` returns exactly ``n`` indices (whole pages, lowest free pages first) or
  ``None`` — never a partial result;
* every page below ``_first_free`` is allocated (where the search for the lowest free pages
  starts; ``alloc`` raises it past what it took, ``free`` lowers it to what it returned);
* ``free`` of an index that is not allocated (double free, foreign or padding index)
  raises `PoolError` and changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lorainv.errors import PoolError


class TokenAllocator:
    """Paged token-index allocator. ``size`` usable tokens, a multiple of ``page_size``."""

    def __init__(self, size: int, page_size: int = 1) -> None:
        if page_size < 1 or size < page_size or size % page_size:
            raise ValueError(f"size={size} must be a positive multiple of page_size={page_size}")
        self.size = size
        self.page_size = page_size
        self.num_pages = size // page_size
        self._free = np.ones(self.num_pages + 1, dtype=bool)
        self._free[0] = False  # page 0 holds the padding index
        # every page below this one is allocated: the search for the lowest free pages starts
        # here (a hint only; alloc and free keep it a lower bound of the first free page)
        self._first_free = 1

    @property
    def buffer_len(self) -> int:
        """Length of a KV buffer indexed by these token indices (padding page included)."""
        return (self.num_pages + 1) * self.page_size

    def available_size(self) -> int:
        return int(np.count_nonzero(self._free)) * self.page_size

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def can_alloc(self, n: int) -> bool:
        return n <= self.available_size()

    def alloc(self, n: int) -> np.ndarray | None:
        """``n`` indices (``n`` a positive multiple of ``page_size``), or None if there is no room."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
            raise ValueError(f"alloc size must be a positive int, got {n!r}")
        if n % self.page_size:
            raise ValueError(f"alloc size {n} is not a multiple of page_size={self.page_size}")
        k = n // self.page_size
        pages = self._lowest_free(k)
        if len(pages) < k:
            return None
        self._free[pages] = False
        self._first_free = int(pages[-1]) + 1  # the k lowest free pages are taken: none lower is free
        return (pages[:, None] * self.page_size + np.arange(self.page_size)[None, :]).reshape(-1)

    def _lowest_free(self, k: int) -> np.ndarray:
        """The ``k`` lowest free pages (fewer when fewer are free), ascending. Scans windows that
        double from ``_first_free`` on, so an allocation near the start of the free space costs
        O(k), not O(pool): decode allocates a page per request per round."""
        start, window = self._first_free, max(64, 4 * k)
        found: list[np.ndarray] = []
        got = 0
        while start < len(self._free) and got < k:
            part = np.flatnonzero(self._free[start : start + window])[: k - got] + start
            found.append(part)
            got += len(part)
            start += window
            window *= 2
        if len(found) == 1:
            return found[0]
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)

    def _pages_of(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            return idx
        if idx.min() < self.page_size or idx.max() >= self.buffer_len:
            bad = idx[(idx < self.page_size) | (idx >= self.buffer_len)]
            raise PoolError(f"free of indices outside the usable pool: {bad[:8].tolist()}")
        pages = np.unique(idx // self.page_size)
        if self.page_size > 1:
            counts = np.bincount(idx // self.page_size, minlength=self.num_pages + 1)[pages]
            if (counts != self.page_size).any() or len(np.unique(idx)) != len(idx):
                raise PoolError(f"free must cover whole pages exactly once; pages {pages[:8].tolist()}")
        elif len(pages) != len(idx):
            raise PoolError("free got the same index twice")
        return pages

    def free(self, indices: Sequence[int] | np.ndarray) -> None:
        """Return whole pages. Raises `PoolError` (pool unchanged) on a double or foreign free."""
        pages = self._pages_of(indices)
        if pages.size == 0:
            return
        already = pages[self._free[pages]]
        if already.size:
            first = already[: min(8, already.size)] * self.page_size
            raise PoolError(f"double free of token indices starting at {first.tolist()}")
        self._free[pages] = True
        self._first_free = min(self._first_free, int(pages[0]))  # pages come sorted (np.unique)

    def free_indices(self) -> np.ndarray:
        """All free token indices, ascending (for snapshots)."""
        if self.page_size == 1:
            return np.flatnonzero(self._free)
        return np.flatnonzero(np.repeat(self._free, self.page_size))  # index i is free iff page i // ps is

    def is_free(self, index: int) -> bool:
        return bool(self._free[index // self.page_size]) if 0 <= index < self.buffer_len else False


class ReqToTokenPool:
    """Rows mapping each request's positions to token indices: ``req_to_token[row, pos]``.

    Invariant: every row is free or held by exactly one owner (a request or a session
    slot; the engine tracks which); ``free`` of a free row raises `PoolError`.
    """

    def __init__(self, rows: int, max_context_len: int, device: torch.device | str = "cpu") -> None:
        if rows < 1 or max_context_len < 1:
            raise ValueError("rows and max_context_len must be positive")
        self.size = rows
        self.max_context_len = max_context_len
        self.req_to_token = torch.zeros(rows, max_context_len, dtype=torch.long, device=device)
        self._free = np.ones(rows, dtype=bool)

    def available_size(self) -> int:
        return int(np.count_nonzero(self._free))

    def alloc(self) -> int | None:
        """The lowest free row, or None when every row is taken."""
        free = np.flatnonzero(self._free)
        if free.size == 0:
            return None
        row = int(free[0])
        self._free[row] = False
        return row

    def free(self, row: int) -> None:
        if not 0 <= row < self.size:
            raise PoolError(f"row {row} is outside req_to_token (size {self.size})")
        if self._free[row]:
            raise PoolError(f"double free of req_to_token row {row}")
        self._free[row] = True

    def free_rows(self) -> list[int]:
        return np.flatnonzero(self._free).tolist()

    def write(self, row: int, start: int, indices: np.ndarray) -> None:
        if start + len(indices) > self.max_context_len:
            raise PoolError(f"row {row}: {start + len(indices)} positions exceed max_context_len")
        self.req_to_token[row, start : start + len(indices)] = torch.as_tensor(indices, dtype=torch.long)

    def read(self, row: int, start: int, end: int) -> np.ndarray:
        return self.req_to_token[row, start:end].cpu().numpy().copy()
