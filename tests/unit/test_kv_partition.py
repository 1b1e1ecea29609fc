"""K3's fast path: the claims partition ``[page_size, n)`` exactly, tested with Python lists for
tiny pools and one bincount for the rest; both answers must agree with the definition."""

from __future__ import annotations

import numpy as np
import pytest

from lorainv.checkers.kv import _partition


@pytest.mark.parametrize("n", [40, 5000])  # below and above the 64-token switch
def test_partition_both_paths(n: int) -> None:
    ps = 2
    idx = np.arange(ps, n, dtype=np.int64)
    rng = np.random.default_rng(0)
    rng.shuffle(idx)
    parts = np.array_split(idx, 7)
    assert _partition(list(parts), ps, n) is True
    dup = [*parts[:-1], np.concatenate([parts[-1][:-1], parts[0][:1]])]  # one index twice, one missing
    assert _partition(dup, ps, n) is False
    pad = [*parts[:-1], np.concatenate([parts[-1][:-1], [0]])]  # the padding index claimed
    assert _partition(pad, ps, n) is False
    out = [*parts[:-1], np.concatenate([parts[-1][:-1], [n]])]  # past the pool
    assert _partition(out, ps, n) is False
    assert _partition(list(parts[:-1]), ps, n) is False  # a claim missing


@pytest.mark.parametrize("n", [40, 5000])
def test_partition_refuses_a_negative_index(n: int) -> None:
    """A negative index is never a token (numpy would read it from the end of a mask)."""
    ps = 2
    parts = np.array_split(np.arange(ps, n, dtype=np.int64), 3)
    neg = [*parts[:-1], np.concatenate([parts[-1][:-1], [-1]])]
    assert _partition(neg, ps, n) is False
