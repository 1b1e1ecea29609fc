"""Issue 13: a LoRA delta scaled x2 passed ``--numeric`` while the numeric check re-ran the same
engine alone; so did any numeric bug that does not depend on batch composition. Two such bugs
are planted here (monkeypatch, in the test only) and must be found by the campaign that
``lorainv fuzz --numeric --seed 0`` runs (`run_campaign` with ``network="tiny", numeric=True``):

* ``lora_x2``: the LoRA backend adds ``2 s (x A^T) B^T`` (the issue's example);
* ``gqa_tiled``: the paged attention maps query head ``j`` to key/value head ``j % kv_heads``
  (``repeat``) instead of ``j // (heads / kv_heads)`` (``repeat_interleave``). Measured: the old
  check ran clean on 50 examples of seeds 0 and 1 with it.

The same budget runs clean without a plant, and the saved trace replays to the same violation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lorainv.impl import llama
from lorainv.impl.backends.base import LoraBackend
from lorainv.testing.campaign import run_campaign
from lorainv.trace import load, replay

# Measured (old generator and H4's): seed 0 finds lora_x2 by the 10th example and gqa_tiled by
# the 10th; 20 keeps a margin. Without shrinking, the clean run of 20 costs a few seconds.
BUDGET = 20


def plant_lora_x2(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every backend adds ``2 * s * (x A^T) B^T`` instead of ``s * (x A^T) B^T``."""
    real = LoraBackend.apply

    def doubled(self: LoraBackend, x: Any, base_out: Any, A: Any, B: Any, info: Any, out_sizes: Any) -> Any:
        return real(self, x, base_out, A, B, dataclasses.replace(info, scalings=info.scalings * 2), out_sizes)

    monkeypatch.setattr(LoraBackend, "apply", doubled)


def plant_gqa_tiled(monkeypatch: pytest.MonkeyPatch) -> None:
    """The paged forward's attention with key/value heads tiled instead of grouped."""

    def tiled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int) -> torch.Tensor:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat(1, rep, 1), v.repeat(1, rep, 1)  # the bug
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
        q_pos = q_start + torch.arange(q.shape[0])
        future = torch.arange(k.shape[0])[None, :] > q_pos[:, None]
        probs = torch.softmax(scores.masked_fill(future[None], float("-inf")), dim=-1)
        return torch.einsum("hqk,khd->qhd", probs, v)

    monkeypatch.setattr(llama, "_attend", tiled)


PLANTS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {"lora_x2": plant_lora_x2, "gqa_tiled": plant_gqa_tiled}


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_planted_numeric_bug_is_found(plant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAINV_TRACE_DIR", str(tmp_path))
    PLANTS[plant](monkeypatch)
    res = run_campaign(network="tiny", numeric=True, max_examples=BUDGET, seed=0, shrink=False, name=f"planted-{plant}")
    assert res.found, f"{plant} ran clean for {BUDGET} numeric examples"
    assert res.trace is not None and res.trace_path is not None
    assert res.trace.expect is not None and res.trace.expect["pool"] == "numerics", res.trace.meta
    again = replay(load(res.trace_path))
    assert again.matches(res.trace.expect), again.violations
    monkeypatch.undo()  # the same trace on the clean engine: nothing to report
    assert replay(load(res.trace_path)).violations == []


def test_same_budget_is_clean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAINV_TRACE_DIR", str(tmp_path))
    res = run_campaign(network="tiny", numeric=True, max_examples=BUDGET, seed=0, shrink=False, name="clean-x2")
    assert not res.found, res.error
    assert res.examples >= BUDGET // 2
