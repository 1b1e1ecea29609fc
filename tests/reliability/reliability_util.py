"""Helpers shared by the reliability tests: snapshot → plain data, a live engine with
requests in every state, and a guard that turns a hang into a test failure."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
from collections.abc import Iterator
from typing import Any

import numpy as np

from lorainv import Engine, RuntimeConfig
from lorainv.snapshot import Snapshot

# Per-op diagnostics, reset at the start of *every* op (also a refused one) by `Engine._do`:
# they describe the last op, not the pools, so they are left out of "state unchanged".
DIAGNOSTIC_FIELDS = frozenset(
    {"step", "now", "last_batch", "last_batch_slots", "last_batch_lens", "segments", "evictions"}
)


def plain(x: Any) -> Any:
    """Any snapshot value as nested tuples/dicts of ints, floats, strings and None (``==``-comparable)."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x) if f.name not in DIAGNOSTIC_FIELDS}
    if isinstance(x, np.ndarray):
        return tuple(x.tolist())
    if isinstance(x, (frozenset, set)):
        return tuple(sorted((plain(v) for v in x), key=repr))
    if isinstance(x, (list, tuple)):
        return tuple(plain(v) for v in x)
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, np.generic):
        return x.item()
    return x


def state_of(engine: Engine) -> dict[str, Any]:
    """The whole snapshot as plain data: free indices, requests, sessions, LoRA maps, registry ..."""
    snap: Snapshot = engine.snapshot()
    out = plain(snap)
    assert {"free_indices", "requests", "sessions", "lora"} <= set(out)
    assert {"uid_to_slot", "slot_to_uid", "registered", "pinned", "loads"} <= set(out["lora"])
    return out


def live_config(network: str = "dummy", **kw: Any) -> RuntimeConfig:
    base: dict[str, Any] = {
        "network": network,
        "strict_mem_check": 2,
        "enable_lora_overlap_loading": True,
        "max_loras_per_batch": 3,
        "chunked_prefill_size": 4,
        "max_total_tokens": 256,
        "max_running_requests": 8,
        "max_sessions": 3,
        "max_lora_rank": 16,
    }
    base.update(kw)
    return RuntimeConfig(**base)


def live_engine(network: str = "dummy", **kw: Any) -> Engine:
    """An engine with requests in flight in every state: ``ra`` (adapter ``a``) and ``r0``
    (base model) decoding,
    ``rbase`` mid chunked prefill, ``rb`` waiting on adapter ``b`` whose load is in flight
    (copies pending), and ``rs`` a waiting session turn; one more session is open and idle."""
    e = Engine(live_config(network, **kw))
    e.load_adapter("a", "gen:4:1")
    e.load_adapter("b", "gen:2:2")
    e.open_session("s")
    e.open_session("t")
    e.add_request([1, 2, 3], "a", 8, rid="ra")
    e.add_request([3, 1], None, 8, rid="r0")
    e.step()  # starts the loads of a and of the base model
    e.complete_transfers()
    e.step()  # prefill ra and r0 -> decoding
    e.add_request([4, 5], "b", 4, rid="rb")
    e.add_request([5, 6, 7, 8, 9, 10, 11, 12, 13, 14], None, 4, rid="rbase")
    e.add_request([9, 9], None, 3, "s", rid="rs")
    e.step()  # b's load starts (copies left pending); rbase's first chunk
    states = {rid: e.status(rid) for rid in ("ra", "r0", "rbase", "rb", "rs")}
    assert states["ra"] == states["r0"] == "decoding", states
    assert states["rbase"] == "prefilling", states
    assert states["rb"] == "waiting" and e.loader is not None and e.loader.in_flight() == {"b"}, states
    assert e.device.pending() > 0
    assert not e.check()
    return e


class Hang(AssertionError):
    pass


@contextlib.contextmanager
def no_hang(seconds: int = 10) -> Iterator[None]:
    """Fail (instead of blocking forever) if the body takes longer than ``seconds``.

    SIGALRM interrupts a blocking ``open`` of a FIFO; the handler's exception propagates.
    """

    def boom(signum: int, frame: Any) -> None:
        raise Hang(f"blocked for more than {seconds}s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
