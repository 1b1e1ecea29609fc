"""Shared pytest setup for the whole suite. (pytest puts this directory on sys.path, so test
modules can import small helpers kept here, such as ``lora_testutil``.)"""

from __future__ import annotations

import os

import pytest
import torch

# Triton kernels run on CPU only under the interpreter, which must be chosen before any kernel
# module is imported (``triton.jit`` reads it at decoration time). Keep a GPU run native.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The suite runs in xdist workers on a 2-core machine; intra-op threads in each worker only
# fight each other over the tiny tensors used here (measured: small ops 3-100x slower).
torch.set_num_threads(1)


def _import_local_modules() -> None:
    """Every local module a test may load, loaded in every worker before any test runs: the
    derandomized campaigns' examples then do not depend on which tests a worker ran first
    (`lorainv.testing.campaign.import_all_lorainv` says why)."""
    import importlib
    import pkgutil

    from lorainv.testing.campaign import import_all_lorainv

    import_all_lorainv()
    bench = importlib.import_module("lorainv_bench")
    for info in pkgutil.iter_modules(bench.__path__, "lorainv_bench."):
        importlib.import_module(info.name)


_import_local_modules()


def pytest_configure(config: pytest.Config) -> None:
    """lorainv's own suite runs under ``lorainv-dev`` unless a profile was asked for (the plugin
    itself never loads one by default; ``ci/gate`` passes ``--hypothesis-profile=lorainv-ci``)."""
    from hypothesis import settings

    if config.getoption("--hypothesis-profile", default=None) is None and not os.environ.get(
        "LORAINV_HYPOTHESIS_PROFILE"
    ):
        settings.load_profile("lorainv-dev")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` first (a stable sort keeps the rest in order): with ``-n 2`` a
    long test that starts last leaves the other worker idle until it ends."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
