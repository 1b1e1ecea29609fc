"""The fingerprint network (fast mode) against the token oracle on real engine runs.

Clean runs: every decoded token equals the oracle's, through chunked prefill, retraction, prefix
hits, session turns, tensor parallelism, pages of 2 and overlapped loads. Planted bugs (monkeypatch,
one at a time): each one that breaks what a request reads — KV contents, positions, prefix reuse,
the slot read, its transfer, the segment→slot map — makes a decoded token differ (tokens/T1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch

from lorainv import ops as O
from lorainv.config import RuntimeConfig
from lorainv.errors import Violation
from lorainv.impl import engine as engine_mod
from lorainv.impl.batch import ForwardBatch, LoraBatchInfo
from lorainv.impl.fingerprint_net import FingerprintNetwork
from lorainv.impl.kv_pool import ReqToTokenPool
from lorainv.impl.lora_pool import LoraPool
from lorainv.impl.overlap_loader import OverlapLoader
from lorainv.impl.prefix_cache import PrefixCache
from lorainv.testing.harness import Harness

A0, A1 = "gen:4:11", "gen:2:12"


def config(**kw: Any) -> RuntimeConfig:
    base: dict[str, Any] = {"network": "dummy", "device": "cpu", "max_lora_rank": 8, "max_total_tokens": 64}
    return RuntimeConfig(**{**base, **kw})


def run(cfg: RuntimeConfig, ops: Sequence[O.Op]) -> tuple[Harness, list[Violation]]:
    """Apply ``ops`` then drain to idle; every violation of the run, in order."""
    h = Harness(cfg)
    assert h.tokens is not None, "fast mode must judge tokens"
    found: list[Violation] = []
    for op in ops:
        found += h.apply(op).violations
    found += h.finish()
    return h, found


def events(h: Harness, kind: str) -> list[Any]:
    return [e for r in h.records for e in r.events if e.kind == kind]


def loads(*names: str) -> list[O.Op]:
    return [O.LoadAdapter(n, {"a0": A0, "a1": A1}[n]) for n in names]


def steps(n: int) -> list[O.Op]:
    return [O.Step() for _ in range(n)]


def assert_clean(h: Harness, found: list[Violation]) -> None:
    assert not found, [str(v) for v in found]
    decoded = events(h, "Decoded")
    assert decoded, "the scenario decoded nothing"
    assert h.tokens is not None and h.tokens.checked == len(decoded) and h.tokens.unchecked == 0


# -- scenarios: (config, ops, an event kind that must occur) -----------------------------------------
PROMPT = (3, 1, 4, 1, 5, 9, 2, 6)

SCENARIOS: dict[str, tuple[RuntimeConfig, list[O.Op], str]] = {
    "chunked prefill": (
        config(chunked_prefill_size=3),
        [*loads("a0"), O.AddRequest("r1", PROMPT, "a0", 4), O.AddRequest("r2", PROMPT[:5], None, 3)],
        "Scheduled",
    ),
    "retraction": (
        config(max_total_tokens=16, chunked_prefill_size=8),
        [*loads("a0", "a1"), *(O.AddRequest(f"r{i}", PROMPT[: 3 + i], ("a0", "a1", None)[i], 6) for i in range(3))],
        "Retracted",
    ),
    "prefix hit": (
        config(),
        [
            *loads("a0"),
            O.AddRequest("r1", PROMPT, "a0", 3),
            *steps(6),
            O.AddRequest("r2", (*PROMPT, 7, 7), "a0", 3),
        ],
        "PrefixHit",
    ),
    "session turns": (
        config(max_sessions=2),
        [
            *loads("a1"),
            O.OpenSession("s"),
            O.AddRequest("t1", PROMPT[:4], "a1", 3, "s"),
            *steps(6),
            O.AddRequest("t2", (8, 8), "a1", 3, "s"),
            *steps(6),
            O.AddRequest("t3", (2,), "a1", 2, "s"),
        ],
        "SessionRestored",
    ),
    "tp_size 2": (
        config(tp_size=2, max_loras_per_batch=2),
        [*loads("a0", "a1"), O.AddRequest("r1", PROMPT, "a0", 3), O.AddRequest("r2", PROMPT, "a1", 3)],
        "BatchFormed",
    ),
    "page size 2": (
        config(page_size=2, chunked_prefill_size=3),
        [
            *loads("a0"),
            O.AddRequest("r1", PROMPT[:5], "a0", 3),
            *steps(8),
            O.AddRequest("r2", PROMPT, "a0", 2),
            O.OpenSession("s"),
            O.AddRequest("t1", (1, 2, 3), None, 2, "s"),
            *steps(8),
            O.AddRequest("t2", (4,), None, 2, "s"),
        ],
        "PrefixHit",
    ),
    "overlapped loads": (
        config(device="sim", enable_lora_overlap_loading=True, max_loras_per_batch=2),
        [*loads("a0", "a1"), O.AddRequest("r1", PROMPT, "a0", 2), O.AddRequest("r2", PROMPT, "a1", 2), *steps(2)],
        "LoadStarted",
    ),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_network_and_oracle_agree(name: str) -> None:
    cfg, ops, must_see = SCENARIOS[name]
    h, found = run(cfg, ops)
    assert_clean(h, found)
    assert events(h, must_see), f"{name}: no {must_see} event, the scenario missed its point"


def test_tokens_span_a_wide_vocabulary() -> None:
    """The network emits tokens over the whole 1024-id range, so collisions of a bug are rare."""
    h, found = run(config(), [*loads("a0"), *(O.AddRequest(f"r{i}", (i, i + 1), "a0", 8) for i in range(12))])
    assert_clean(h, found)
    toks = {e.token for e in events(h, "Decoded")}
    assert FingerprintNetwork.vocab_size == 1024
    assert max(toks) >= 256 and len(toks) >= 60


def test_kv_cells_hold_fingerprints_at_their_positions() -> None:
    """The KV store is written through the paging: the cells a request's row names are exactly the
    ones the forward wrote, and cells never handed out keep the never-written mark."""
    h, found = run(config(enable_prefix_cache=False), [*loads("a0"), O.AddRequest("r1", PROMPT, "a0", 3)])
    assert_clean(h, found)
    kv = h.engine.kv.numpy()
    written = int((kv != -1).sum())
    assert written == len(PROMPT) + 3 - 1  # the last output's KV is never computed
    assert kv[0] == -1  # index 0 is padding


# -- planted bugs --------------------------------------------------------------------------------
def _wrap_forward_batch(mp: pytest.MonkeyPatch, change: Callable[[ForwardBatch], None]) -> None:
    def make(*args: Any, **kw: Any) -> ForwardBatch:
        fb = ForwardBatch(*args, **kw)
        change(fb)
        return fb

    mp.setattr(engine_mod, "ForwardBatch", make)


def _wrap_batch_info(mp: pytest.MonkeyPatch, change: Callable[[LoraBatchInfo], None]) -> None:
    build = engine_mod.build_lora_batch_info

    def make(*args: Any, **kw: Any) -> LoraBatchInfo:
        info = build(*args, **kw)
        change(info)
        return info

    mp.setattr(engine_mod, "build_lora_batch_info", make)


def plant_prefix_wrong_tokens(mp: pytest.MonkeyPatch) -> None:
    """Prefix match compares only the first page: another prompt's KV is reused."""

    def first_page(self: PrefixCache, a: tuple[int, ...], b: Sequence[int]) -> int:
        ps = self.page_size
        same = len(a) >= ps and len(b) >= ps and tuple(a[:ps]) == tuple(b[:ps])
        return self._align(min(len(a), len(b))) if same else 0

    mp.setattr(PrefixCache, "_common", first_page)


def plant_prefix_wrong_adapter(mp: pytest.MonkeyPatch) -> None:
    root = PrefixCache._root
    mp.setattr(PrefixCache, "_root", lambda self, namespace: root(self, None))


def plant_kv_written_at_wrong_position(mp: pytest.MonkeyPatch) -> None:
    def swap(fb: ForwardBatch) -> None:
        fb.out_cache_loc = torch.flip(fb.out_cache_loc, [0])

    _wrap_forward_batch(mp, swap)


def plant_kv_read_at_wrong_position(mp: pytest.MonkeyPatch) -> None:
    """The req_to_token row maps each position to another position's cell."""
    write = ReqToTokenPool.write

    def reversed_write(self: ReqToTokenPool, row: int, start: int, indices: np.ndarray) -> None:
        write(self, row, start, np.asarray(indices)[::-1].copy())

    mp.setattr(ReqToTokenPool, "write", reversed_write)


def plant_wrong_slot(mp: pytest.MonkeyPatch) -> None:
    def shift(info: LoraBatchInfo) -> None:
        info.weight_indices = (info.weight_indices + 1) % int(info.ranks.shape[0])

    _wrap_batch_info(mp, shift)


def plant_segment_wrong_slot(mp: pytest.MonkeyPatch) -> None:
    def rotate(info: LoraBatchInfo) -> None:
        if info.num_segments > 1:
            info.weight_indices = torch.roll(info.weight_indices, 1)

    _wrap_batch_info(mp, rotate)


def plant_stale_slot(mp: pytest.MonkeyPatch) -> None:
    """Loading an adapter maps it and sets its rank, but leaves the slot's old weights in place."""
    write = LoraPool._write_slot

    def skip(self: LoraPool, slot: int, adapter: Any, stream: Any) -> None:
        if adapter is None:
            write(self, slot, adapter, stream)

    mp.setattr(LoraPool, "_write_slot", skip)


def plant_read_before_transfer(mp: pytest.MonkeyPatch) -> None:
    """A slot counts as ready as soon as it is mapped: the forward reads the pending (poisoned) copy."""
    mp.setattr(OverlapLoader, "is_ready", lambda self, uid: uid in self.pool.uid_to_slot)


TWO_ADAPTERS = [*loads("a0", "a1"), O.AddRequest("r1", PROMPT, "a0", 3), O.AddRequest("r2", PROMPT[:5], "a1", 3)]
PLANTS: dict[str, tuple[Callable[[pytest.MonkeyPatch], None], RuntimeConfig, list[O.Op]]] = {
    "prefix of the wrong tokens": (
        plant_prefix_wrong_tokens,
        config(),
        [*loads("a0"), O.AddRequest("r1", PROMPT, "a0", 2), *steps(4), O.AddRequest("r2", (3, 7, 7, 7, 7), "a0", 2)],
    ),
    "prefix of the wrong adapter": (
        plant_prefix_wrong_adapter,
        config(),
        [*loads("a0", "a1"), O.AddRequest("r1", PROMPT, "a0", 2), *steps(4), O.AddRequest("r2", PROMPT, "a1", 2)],
    ),
    "KV written at a wrong position": (plant_kv_written_at_wrong_position, config(), TWO_ADAPTERS),
    "KV read at a wrong position": (plant_kv_read_at_wrong_position, config(), TWO_ADAPTERS),
    "read of the wrong slot": (plant_wrong_slot, config(max_loras_per_batch=3), TWO_ADAPTERS),
    "segment mapped to the wrong slot": (plant_segment_wrong_slot, config(max_loras_per_batch=3), TWO_ADAPTERS),
    "stale slot": (
        plant_stale_slot,
        config(max_loras_per_batch=1),
        [*loads("a0", "a1"), O.AddRequest("r1", PROMPT, "a0", 2), *steps(4), O.AddRequest("r2", PROMPT, "a1", 2)],
    ),
    "slot read before its transfer": (
        plant_read_before_transfer,
        config(device="sim", enable_lora_overlap_loading=True),
        [*loads("a0"), O.AddRequest("r1", PROMPT, "a0", 2), *steps(3)],
    ),
}


@pytest.mark.parametrize("name", sorted(PLANTS))
def test_planted_bug_changes_a_token(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    plant, cfg, ops = PLANTS[name]
    clean, found = run(cfg, ops)
    assert_clean(clean, found)
    plant(monkeypatch)
    _, found = run(cfg, ops)
    tokens = [v for v in found if v.pool == "tokens"]
    assert tokens, f"{name}: no token changed; violations: {[str(v) for v in found]}"
    assert tokens[0].invariant == "T1" and "expected" in tokens[0].message
