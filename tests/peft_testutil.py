"""Helpers for the tests that compare with Hugging Face transformers + PEFT (importable from
any test module: pytest puts ``tests/`` on ``sys.path`` through the root conftest)."""

from __future__ import annotations

from typing import Any

import torch


def peft_logits(pm: Any, adapter: str | None, tokens: list[int]) -> torch.Tensor:
    """PeftModel's ``[len(tokens), vocab]`` logits with one adapter (or none) active."""
    ids = torch.tensor([tokens])
    with torch.no_grad():
        if adapter is None:
            with pm.disable_adapter():
                return pm(input_ids=ids, use_cache=False).logits[0]
        pm.set_adapter(adapter)
        return pm(input_ids=ids, use_cache=False).logits[0]
