"""LoRA backends by name. The Triton backend is imported lazily, so that importing lorainv never
imports triton (``TRITON_INTERPRET`` must be set before the kernels are defined)."""

from __future__ import annotations

import os

from lorainv.errors import ConfigError
from lorainv.impl.backends.base import LoraBackend

BACKEND_NAMES = ("torch_native", "triton")


def get_backend(name: str) -> LoraBackend:
    """Return a backend instance by registry name (``torch_native`` or ``triton``)."""
    if name == "torch_native":
        from lorainv.impl.backends.torch_native import TorchNativeBackend

        return TorchNativeBackend()
    if name == "triton":
        import torch

        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError(
                "lora_backend='triton' needs a CUDA GPU, or TRITON_INTERPRET=1 in the environment (set before "
                "lorainv is imported) to run its kernels on the CPU interpreter; or use lora_backend='torch_native'"
            )
        try:
            from lorainv.impl.backends.triton_backend import TritonBackend
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ConfigError(f"lora_backend='triton' needs the triton package ({e}); install lorainv[triton]") from e
        return TritonBackend()
    raise ConfigError(f"lora_backend={name!r} is not known; choose one of {list(BACKEND_NAMES)}")


__all__ = ["BACKEND_NAMES", "LoraBackend", "get_backend"]
