"""Devices: streams, events, async host-to-device copies and pinned memory.

The runtime issues the same calls on both implementations:

* `SimDevice` (CPU, deterministic). Copies issued on a side stream stay *pending* until
  ``complete(n)`` / ``complete_all()`` (the ``CompleteTransfers`` op) or, when the device has a
  ``latency_steps`` L, until the L-th ``poll()`` after the copy was issued (the engine polls
  once per step, so a copy lands L steps later). ``latency_steps=None`` (device ``sim``) never
  lands a copy by itself: its driver (the fuzzer, a trace) chooses when; device ``sim-auto``
  (the default) has ``transfer_latency_steps``, ``cpu`` has 1. While pending, the destination reads as NaN
  (poison) and ``event.query()`` is False. ``wait_event(stream, ev)`` orders the stream after
  the event: pending copies up to ``ev`` are completed first, as a GPU stream would block,
  so the current stream can never read the data early *if it waits*. A forward that skips
  the wait reads NaN. Copies on the current stream are synchronous.
* `TorchCudaDevice` wraps ``torch.cuda`` streams, events and pinned memory.

Invariant (Sim): every issued copy is in exactly one of pending / completed / failed, in
issue order per stream; an event is done once every copy issued before it on its stream is
done, and ``failed`` if any of those copies failed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from lorainv.errors import ConfigError


class Stream(Protocol):
    name: str


class DeviceEvent(Protocol):
    def query(self) -> bool: ...

    @property
    def failed(self) -> bool: ...


class Device(Protocol):
    name: str
    torch_device: torch.device
    # a copy lands by itself within this many ``poll()`` calls; None: no such promise (a driver
    # lands copies, or the hardware gives no bound)
    latency_steps: int | None

    def current_stream(self) -> Any: ...
    def new_stream(self, name: str) -> Any: ...
    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, stream: Any) -> None: ...
    def record_event(self, stream: Any) -> Any: ...
    def wait_event(self, stream: Any, event: Any) -> None: ...
    def pin(self, t: torch.Tensor) -> torch.Tensor: ...
    def poll(self) -> None: ...
    def pending(self) -> int: ...
    def injected_failures(self) -> tuple[int, int]: ...


@dataclass(eq=False)
class SimStream:
    name: str
    waited: list[int] = field(default_factory=list)  # seq numbers of events this stream waited on


@dataclass(eq=False)
class _Copy:
    seq: int
    dst: torch.Tensor
    src: torch.Tensor
    stream: SimStream
    due: int | None  # the poll tick at which it lands by itself; None: only when driven
    state: str = "pending"  # pending | done | failed


@dataclass(eq=False)
class SimEvent:
    """Done when every copy issued on ``stream`` before it is done (or failed)."""

    seq: int
    stream: SimStream
    _copies: list[_Copy]

    def query(self) -> bool:
        return all(c.state != "pending" for c in self._copies)

    @property
    def failed(self) -> bool:
        return any(c.state == "failed" for c in self._copies)


class TransferError(OSError):
    """A simulated I/O error in the middle of a host-to-device copy."""


class SimDevice:
    """Deterministic simulated device on CPU; see the module docstring."""

    name = "sim"

    def __init__(self, auto_complete: bool = False, latency_steps: int | None = None) -> None:
        """``latency_steps``: a side-stream copy lands at the ``latency_steps``-th `poll` after
        it was issued (None: only `complete` or a wait lands it). ``auto_complete=True`` is
        ``latency_steps=1``: every pending copy lands at the next `poll`."""
        if latency_steps is None and auto_complete:
            latency_steps = 1
        if latency_steps is not None and (
            isinstance(latency_steps, bool) or not isinstance(latency_steps, int) or latency_steps < 1
        ):
            raise ConfigError(f"latency_steps must be None or an int >= 1, got {latency_steps!r}")
        self.torch_device = torch.device("cpu")
        self.latency_steps = latency_steps
        self.tick = 0  # polls so far
        self._current = SimStream("current")
        self._pending: deque[_Copy] = deque()
        self._seq = 0
        self._fail_next = 0
        self.completed = 0
        self.failed = 0
        self.pinned_bytes = 0

    @property
    def auto_complete(self) -> bool:
        """Does a pending copy land by itself (at some later `poll`)?"""
        return self.latency_steps is not None

    def current_stream(self) -> SimStream:
        return self._current

    def new_stream(self, name: str) -> SimStream:
        return SimStream(name)

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, stream: SimStream) -> None:
        if dst.shape != src.shape:
            raise ValueError(f"copy shape mismatch: dst {tuple(dst.shape)} src {tuple(src.shape)}")
        self._seq += 1
        if stream is self._current:
            dst.copy_(src)
            return
        due = None if self.latency_steps is None else self.tick + self.latency_steps
        c = _Copy(self._seq, dst, src, stream, due)
        if dst.is_floating_point():
            dst.fill_(float("nan"))  # poison: readable before completion means a missing wait
        self._pending.append(c)

    def record_event(self, stream: SimStream) -> SimEvent:
        self._seq += 1
        mine = [c for c in self._pending if c.stream is stream]
        return SimEvent(self._seq, stream, mine)

    def wait_event(self, stream: SimStream, event: SimEvent) -> None:
        """Order ``stream`` after ``event``: the copies it covers complete before anything later."""
        for c in event._copies:
            if c.state == "pending":
                self._finish(c)
        stream.waited.append(event.seq)

    def fail_next(self, n: int = 1) -> None:
        """Fault hook: the next ``n`` copies to complete fail with `TransferError` instead."""
        if n < 0:
            raise ValueError("n must be >= 0")
        self._fail_next += n

    def _finish(self, c: _Copy) -> None:
        self._pending.remove(c)
        if self._fail_next > 0:
            self._fail_next -= 1
            c.state = "failed"
            self.failed += 1
            return
        c.dst.copy_(c.src.to(c.dst.dtype))
        c.state = "done"
        self.completed += 1

    def complete(self, n: int | None = None) -> tuple[int, int]:
        """Complete the oldest ``n`` pending copies (all when None). Returns (done, failed)."""
        k = len(self._pending) if n is None else max(0, min(n, len(self._pending)))
        d0, f0 = self.completed, self.failed
        for _ in range(k):
            self._finish(self._pending[0])
        return self.completed - d0, self.failed - f0

    def complete_all(self) -> tuple[int, int]:
        return self.complete(None)

    def poll(self) -> None:
        """Called by the runtime once per step (mutates): advances the tick and lands, in issue
        order, every pending copy that is due by now."""
        self.tick += 1
        if self.latency_steps is None:
            return
        for c in [c for c in self._pending if c.due is not None and c.due <= self.tick]:
            self._finish(c)

    def injected_failures(self) -> tuple[int, int]:
        """``(copies failed so far, failures still armed)``; every ``fail_next(n)`` adds n to
        their sum (pure)."""
        return self.failed, self._fail_next

    def pending(self) -> int:
        return len(self._pending)

    def pin(self, t: torch.Tensor) -> torch.Tensor:
        """Pinning is a no-op on CPU; the bytes are counted so caching is observable."""
        self.pinned_bytes += t.numel() * t.element_size()
        return t


class TorchCudaDevice:
    """Real GPU device: ``torch.cuda`` streams and events, pinned host memory."""

    name = "cuda"

    def __init__(self) -> None:
        if not torch.cuda.is_available():
            raise ConfigError("device='cuda' but CUDA is not available; use device='sim-auto' (the default) or 'cpu'")
        self.torch_device = torch.device("cuda")
        self.auto_complete = True
        self.latency_steps: int | None = None  # the hardware lands copies; no step bound is promised

    def current_stream(self) -> Any:
        return torch.cuda.current_stream()

    def new_stream(self, name: str) -> Any:
        return torch.cuda.Stream()

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, stream: Any) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def record_event(self, stream: Any) -> Any:
        ev = torch.cuda.Event()
        ev.record(stream)
        return _CudaEvent(ev)

    def wait_event(self, stream: Any, event: Any) -> None:
        stream.wait_event(event.ev)

    def pin(self, t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory()

    def poll(self) -> None:
        return None

    def injected_failures(self) -> tuple[int, int]:
        return (0, 0)  # fault injection is refused on a real device

    def pending(self) -> int:
        return 0

    def fail_next(self, n: int = 1) -> None:
        raise ConfigError("transfer fault injection is only available on the simulated device")

    def complete(self, n: int | None = None) -> tuple[int, int]:
        torch.cuda.synchronize()
        return (0, 0)

    def complete_all(self) -> tuple[int, int]:
        return self.complete(None)


@dataclass
class _CudaEvent:
    ev: Any

    def query(self) -> bool:
        return bool(self.ev.query())

    @property
    def failed(self) -> bool:
        return False


def make_device(kind: str, latency_steps: int = 2) -> Any:
    """``sim-auto``: SimDevice that lands a copy ``latency_steps`` steps after issue (the
    default device); ``sim``: copies land only when driven (``complete``); ``cpu``: SimDevice
    that lands copies at the next step; ``cuda``: real GPU."""
    if kind == "sim-auto":
        return SimDevice(latency_steps=latency_steps)
    if kind == "sim":
        return SimDevice(auto_complete=False)
    if kind == "cpu":
        return SimDevice(auto_complete=True)
    if kind == "cuda":
        return TorchCudaDevice()
    raise ConfigError(f"device={kind!r} is not allowed; choose one of ['sim-auto', 'sim', 'cpu', 'cuda']")
