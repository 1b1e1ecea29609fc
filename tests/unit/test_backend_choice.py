"""Choosing a LoRA backend: a Triton backend on a machine that cannot run it is a `ConfigError`
that says how to run it (``TRITON_INTERPRET=1``), never a raw driver traceback."""

from __future__ import annotations

import pytest
import torch

from lorainv.config import RuntimeConfig
from lorainv.errors import ConfigError
from lorainv.impl.backends import get_backend
from lorainv.impl.engine import Engine


def test_triton_without_gpu_or_interpreter_names_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match=r"TRITON_INTERPRET=1"):
        get_backend("triton")
    with pytest.raises(ConfigError, match=r"TRITON_INTERPRET=1"):
        Engine(RuntimeConfig(lora_backend="triton"))


def test_triton_under_the_interpreter_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert type(get_backend("triton")).__name__ == "TritonBackend"


def test_unknown_backend_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not known"):
        get_backend("cutlass")
