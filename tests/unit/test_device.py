"""`SimDevice` streams/events/poisoned async copies, `make_device`, and the clocks."""

from __future__ import annotations

import math

import pytest
import torch

from lorainv.errors import ConfigError
from lorainv.impl.clock import MonotonicClock, SimClock
from lorainv.impl.device import SimDevice, SimStream, TorchCudaDevice, make_device


def _src(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _dst(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.float32)


def _is_nan(t: torch.Tensor) -> bool:
    return bool(torch.isnan(t).all())


@pytest.fixture
def dev() -> SimDevice:
    return SimDevice()


@pytest.fixture
def side(dev: SimDevice) -> SimStream:
    return dev.new_stream("load")


def test_side_stream_copy_is_pending_and_poisoned(dev: SimDevice, side: SimStream) -> None:
    dst = _dst(3)
    dev.copy_async(dst, _src(1, 2, 3), side)
    ev = dev.record_event(side)
    assert dev.pending() == 1
    assert _is_nan(dst)
    assert ev.query() is False
    assert ev.failed is False
    assert (dev.completed, dev.failed) == (0, 0)


def test_poll_without_auto_complete_does_nothing(dev: SimDevice, side: SimStream) -> None:
    dst = _dst(2)
    dev.copy_async(dst, _src(1, 2), side)
    dev.poll()
    assert dev.pending() == 1
    assert _is_nan(dst)


def test_complete_n_is_fifo(dev: SimDevice, side: SimStream) -> None:
    other = dev.new_stream("other")
    dsts = [_dst(2) for _ in range(3)]
    dev.copy_async(dsts[0], _src(1, 1), side)
    dev.copy_async(dsts[1], _src(2, 2), other)
    dev.copy_async(dsts[2], _src(3, 3), side)

    assert dev.complete(1) == (1, 0)
    assert dsts[0].tolist() == [1.0, 1.0]
    assert _is_nan(dsts[1]) and _is_nan(dsts[2])
    assert dev.pending() == 2

    assert dev.complete(1) == (1, 0)
    assert dsts[1].tolist() == [2.0, 2.0]
    assert _is_nan(dsts[2])

    assert dev.complete(5) == (1, 0)  # more than pending: completes what there is
    assert dsts[2].tolist() == [3.0, 3.0]
    assert dev.pending() == 0
    assert dev.completed == 3


@pytest.mark.parametrize("n", [0, -3])
def test_complete_zero_or_negative_completes_nothing(dev: SimDevice, side: SimStream, n: int) -> None:
    dst = _dst(1)
    dev.copy_async(dst, _src(5), side)
    assert dev.complete(n) == (0, 0)
    assert dev.pending() == 1
    assert _is_nan(dst)


def test_complete_all_and_event_done(dev: SimDevice, side: SimStream) -> None:
    a, b = _dst(2), _dst(1)
    dev.copy_async(a, _src(4, 5), side)
    dev.copy_async(b, _src(6), side)
    ev = dev.record_event(side)
    assert dev.complete_all() == (2, 0)
    assert a.tolist() == [4.0, 5.0]
    assert b.tolist() == [6.0]
    assert ev.query() is True
    assert ev.failed is False
    assert dev.pending() == 0
    assert dev.complete_all() == (0, 0)


def test_event_covers_only_copies_issued_before_it_on_its_stream(dev: SimDevice, side: SimStream) -> None:
    other = dev.new_stream("other")
    a, b, c = _dst(1), _dst(1), _dst(1)
    dev.copy_async(a, _src(1), side)
    dev.copy_async(b, _src(2), other)
    ev = dev.record_event(side)
    dev.copy_async(c, _src(3), side)
    dev.complete(1)  # completes a only
    assert ev.query() is True
    assert _is_nan(b) and _is_nan(c)


def test_event_on_idle_stream_is_done(dev: SimDevice, side: SimStream) -> None:
    ev = dev.record_event(side)
    assert ev.query() is True
    assert ev.failed is False


def test_wait_event_completes_covered_copies_and_records_ordering(dev: SimDevice, side: SimStream) -> None:
    cur = dev.current_stream()
    a, b, c = _dst(1), _dst(1), _dst(1)
    dev.copy_async(a, _src(1), side)
    dev.copy_async(b, _src(2), side)
    ev1 = dev.record_event(side)
    dev.copy_async(c, _src(3), side)
    ev2 = dev.record_event(side)
    assert ev1.seq < ev2.seq

    dev.wait_event(cur, ev1)
    assert a.tolist() == [1.0] and b.tolist() == [2.0]
    assert _is_nan(c)  # issued after ev1: not covered
    assert ev1.query() is True and ev2.query() is False
    assert dev.pending() == 1
    assert cur.waited == [ev1.seq]
    assert side.waited == []

    dev.wait_event(cur, ev2)
    assert c.tolist() == [3.0]
    assert cur.waited == [ev1.seq, ev2.seq]
    assert dev.pending() == 0
    assert dev.completed == 3

    dev.wait_event(cur, ev1)  # waiting on a done event is a no-op apart from the record
    assert cur.waited == [ev1.seq, ev2.seq, ev1.seq]
    assert dev.completed == 3


def test_current_stream_copy_is_synchronous(dev: SimDevice) -> None:
    dst = _dst(2)
    cur = dev.current_stream()
    assert dev.current_stream() is cur
    dev.copy_async(dst, _src(7, 8), cur)
    assert dst.tolist() == [7.0, 8.0]
    assert dev.pending() == 0
    assert dev.record_event(cur).query() is True


def test_copy_converts_dtype(dev: SimDevice, side: SimStream) -> None:
    dst = torch.zeros(2, dtype=torch.float64)
    dev.copy_async(dst, _src(0.5, 1.5), side)
    dev.complete_all()
    assert dst.dtype == torch.float64
    assert dst.tolist() == [0.5, 1.5]


def test_integer_destination_is_not_poisoned_but_not_written_early(dev: SimDevice, side: SimStream) -> None:
    dst = torch.zeros(2, dtype=torch.long)
    dev.copy_async(dst, torch.tensor([3, 4]), side)
    assert dst.tolist() == [0, 0]
    dev.complete_all()
    assert dst.tolist() == [3, 4]


def test_fail_next_marks_event_failed_and_leaves_poison(dev: SimDevice, side: SimStream) -> None:
    a, b = _dst(2), _dst(2)
    dev.fail_next(1)
    dev.copy_async(a, _src(1, 2), side)
    ev_a = dev.record_event(side)
    dev.copy_async(b, _src(3, 4), side)
    ev_b = dev.record_event(side)
    assert dev.complete_all() == (1, 1)
    assert ev_a.query() is True and ev_a.failed is True
    assert ev_b.query() is True and ev_b.failed is True  # covers the failed copy too
    assert _is_nan(a)  # never written with the source
    assert b.tolist() == [3.0, 4.0]
    assert (dev.completed, dev.failed) == (1, 1)


def test_fail_next_counts_accumulate_and_apply_on_wait(dev: SimDevice, side: SimStream) -> None:
    dev.fail_next(1)
    dev.fail_next(1)
    dsts = [_dst(1) for _ in range(3)]
    for i, d in enumerate(dsts):
        dev.copy_async(d, _src(float(i)), side)
    ev = dev.record_event(side)
    dev.wait_event(dev.current_stream(), ev)
    assert ev.failed is True
    assert _is_nan(dsts[0]) and _is_nan(dsts[1])
    assert dsts[2].tolist() == [2.0]
    assert (dev.completed, dev.failed) == (1, 2)


def test_fail_next_zero_and_negative(dev: SimDevice, side: SimStream) -> None:
    dev.fail_next(0)
    dst = _dst(1)
    dev.copy_async(dst, _src(9), side)
    assert dev.complete_all() == (1, 0)
    with pytest.raises(ValueError, match="n must be >= 0"):
        dev.fail_next(-1)


def test_shape_mismatch_raises_and_queues_nothing(dev: SimDevice, side: SimStream) -> None:
    dst = torch.ones(3)
    with pytest.raises(ValueError, match=r"copy shape mismatch: dst \(3,\) src \(2,\)"):
        dev.copy_async(dst, _src(1, 2), side)
    assert dev.pending() == 0
    assert dst.tolist() == [1.0, 1.0, 1.0]  # not poisoned
    with pytest.raises(ValueError, match="copy shape mismatch"):
        dev.copy_async(torch.zeros(2, 2), torch.zeros(4), dev.current_stream())


def test_pin_counts_bytes_and_returns_same_tensor(dev: SimDevice) -> None:
    t = torch.zeros(10, dtype=torch.float32)
    assert dev.pin(t) is t
    dev.pin(torch.zeros(3, dtype=torch.float64))
    assert dev.pinned_bytes == 10 * 4 + 3 * 8


def test_make_device_kinds() -> None:
    sim = make_device("sim")
    assert isinstance(sim, SimDevice) and sim.auto_complete is False
    cpu = make_device("cpu")
    assert isinstance(cpu, SimDevice) and cpu.auto_complete is True
    assert sim.torch_device == torch.device("cpu")


def test_cpu_device_lands_copies_on_poll() -> None:
    dev = make_device("cpu")
    dst = _dst(2)
    dev.copy_async(dst, _src(1, 2), dev.new_stream("load"))
    assert _is_nan(dst)  # still async until the step polls
    dev.poll()
    assert dst.tolist() == [1.0, 2.0]
    assert dev.pending() == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_make_device_cuda_without_cuda_raises() -> None:
    with pytest.raises(ConfigError, match="CUDA is not available"):
        make_device("cuda")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        TorchCudaDevice()


def test_make_device_unknown() -> None:
    with pytest.raises(
        ConfigError, match=r"device='tpu' is not allowed; choose one of \['sim-auto', 'sim', 'cpu', 'cuda'\]"
    ):
        make_device("tpu")


# -- clocks --------------------------------------------------------------------------------


def test_sim_clock_advances_only_when_told() -> None:
    clock = SimClock()
    assert clock.now() == 0.0
    assert clock.now() == 0.0
    assert clock.advance(1.5) == 1.5
    assert clock.advance(0) == 1.5
    assert clock.advance(2) == 3.5
    assert clock.now() == 3.5
    assert isinstance(clock.now(), float)
    assert SimClock(start=10).now() == 10.0


@pytest.mark.parametrize("dt", [-1.0, -1e-9, math.nan])
def test_sim_clock_rejects_negative_and_nan(dt: float) -> None:
    clock = SimClock(2.0)
    with pytest.raises(ValueError, match="clock can only move forward"):
        clock.advance(dt)
    assert clock.now() == 2.0


def test_monotonic_clock_cannot_be_advanced() -> None:
    clock = MonotonicClock()
    t0 = clock.now()
    assert t0 >= 0.0
    assert clock.now() >= t0
    with pytest.raises(TypeError, match="use SimClock"):
        clock.advance(1.0)
