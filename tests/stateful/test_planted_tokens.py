"""Fast mode sees meaning: each bug class below, planted into the runtime with monkeypatch, is
found by the fast fuzz campaign (the rounds ``lorainv fuzz --fast --max-examples 400 --seed 0``
runs), and the clean runtime passes the same budget. None of these bugs touches a pool invariant:
they are found because the fingerprint network's tokens are compared with the token oracle."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

from lorainv.impl import engine as engine_mod
from lorainv.impl.batch import ForwardBatch, LoraBatchInfo
from lorainv.impl.engine import Engine
from lorainv.impl.prefix_cache import PrefixCache
from lorainv.testing.campaign import CampaignResult, run_campaign

BUDGET, SEED = 400, 0


def fuzz_fast(max_examples: int = BUDGET, seed: int = SEED, **kw: Any) -> CampaignResult | None:
    """The fast rounds of ``lorainv fuzz --fast --max-examples N --seed S`` (see cli.cmd_fuzz: rounds
    of 25 examples, round ``k`` seeded ``S * 1000 + k``), without shrinking; the first finding or None."""
    done, rnd = 0, 0
    while done < max_examples:
        chunk = min(25, max_examples - done)
        res = run_campaign(
            max_examples=chunk, seed=seed * 1000 + rnd, network="dummy", shrink=False, name="fuzz-fast", **kw
        )
        if res.found:
            return res
        done += res.examples
        rnd += 1
    return None


def corrupt_every_token(mp: pytest.MonkeyPatch) -> None:
    emit = Engine._emit_token

    def corrupted(self: Engine, r: Any, token: int, ev: list[Any]) -> None:
        emit(self, r, (int(token) + 1) % self.network.vocab_size, ev)

    mp.setattr(Engine, "_emit_token", corrupted)


def prefix_match_compares_first_page_only(mp: pytest.MonkeyPatch) -> None:
    """A cached edge matches as soon as its first page does: another prompt's KV is reused."""

    def first_page(self: PrefixCache, a: tuple[int, ...], b: Sequence[int]) -> int:
        ps = self.page_size
        if len(a) < ps or len(b) < ps or tuple(a[:ps]) != tuple(b[:ps]):
            return 0
        return self._align(min(len(a), len(b)))

    mp.setattr(PrefixCache, "_common", first_page)


def prefix_namespace_ignored(mp: pytest.MonkeyPatch) -> None:
    """Every adapter shares the base model's tree: KV computed with another adapter is reused."""
    root = PrefixCache._root
    mp.setattr(PrefixCache, "_root", lambda self, namespace: root(self, None))


def _patch_forward_batch(mp: pytest.MonkeyPatch, change: Callable[[ForwardBatch], None]) -> None:
    def make(*args: Any, **kw: Any) -> ForwardBatch:
        fb = ForwardBatch(*args, **kw)
        change(fb)
        return fb

    mp.setattr(engine_mod, "ForwardBatch", make)


def kv_position_off_by_one(mp: pytest.MonkeyPatch) -> None:
    """Every new token's KV is computed for the next position."""

    def shift(fb: ForwardBatch) -> None:
        fb.positions = fb.positions + 1

    _patch_forward_batch(mp, shift)


def segment_slot_mapping_wrong(mp: pytest.MonkeyPatch) -> None:
    """A batch with several segments reads each segment's weights from the next segment's slot."""
    build = engine_mod.build_lora_batch_info

    def rotated(*args: Any, **kw: Any) -> LoraBatchInfo:
        info = build(*args, **kw)
        if info.num_segments > 1:
            info.weight_indices = torch.roll(info.weight_indices, 1)
        return info

    mp.setattr(engine_mod, "build_lora_batch_info", rotated)


PLANTS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "every output token corrupted": corrupt_every_token,
    "prefix match compares only the first page": prefix_match_compares_first_page_only,
    "prefix namespace ignored": prefix_namespace_ignored,
    "KV position off by one": kv_position_off_by_one,
    "segment to slot mapping wrong": segment_slot_mapping_wrong,
}

T1 = {"pool": "tokens", "invariant": "T1"}
EXPECTED: dict[str, list[dict[str, str]]] = {bug: [T1] for bug in PLANTS}
# the prefix checker's P4 (borrowed KV keyed by other tokens or another adapter) may see these first
for _bug in ("prefix namespace ignored", "prefix match compares only the first page"):
    EXPECTED[_bug].append({"pool": "prefix", "invariant": "P4"})
# L9 compares the segment metadata with the batch's slots, on the op that formed the batch
EXPECTED["segment to slot mapping wrong"].append({"pool": "lora", "invariant": "L9"})


@pytest.mark.parametrize("bug", sorted(PLANTS))
def test_planted_bug_is_found_by_fast_fuzz(bug: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("LORAINV_TRACE_DIR", str(tmp_path))
    PLANTS[bug](monkeypatch)
    res = fuzz_fast()
    assert res is not None, f"{bug}: fast fuzz ran clean for {BUDGET} examples"
    assert res.trace is not None and res.trace.expect is not None
    # the token oracle finds each; a pool checker may see a symptom on the same op first
    assert res.trace.expect in EXPECTED[bug], (bug, res.trace.expect, res.error)


@pytest.mark.parametrize("bug", ["prefix namespace ignored", "prefix match compares only the first page"])
def test_token_oracle_alone_finds_the_prefix_bugs(bug: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """With the prefix checker's P4 silenced, the wrong KV still shows as a wrong token."""
    from lorainv.checkers import prefix

    monkeypatch.setenv("LORAINV_TRACE_DIR", str(tmp_path))
    monkeypatch.setattr(prefix, "_borrowed_tokens", lambda r, path: [])
    PLANTS[bug](monkeypatch)
    res = fuzz_fast()
    assert res is not None and res.trace is not None, f"{bug}: fast fuzz ran clean without P4"
    assert res.trace.expect == T1, (bug, res.trace.expect, res.error)


@pytest.mark.slow
def test_clean_runtime_passes_the_same_budget(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("LORAINV_TRACE_DIR", str(tmp_path))
    res = fuzz_fast()
    assert res is None, f"clean runtime failed: {res.error if res else ''}"
