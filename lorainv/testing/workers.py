"""Backends that run campaign shards (`lorainv.testing.fuzzrun.run_shard`) in parallel.

Both run the shards in two waves (`lorainv.testing.fuzzrun.waves`): the examples saved in the
database are replayed first, then every shard generates.

* `run_processes`: N worker processes on this machine (``concurrent.futures`` with the
  ``spawn`` start method). Progress flows back through a ``multiprocessing`` queue; a shared
  event asks every shard to stop; a shared flag under a lock hands out "the first failure".
* `run_ray`: the same shards as Ray tasks (one CPU each). One Ray actor (`_Coordinator`)
  carries progress, the stop request and the first-failure claim.

Both are library facilities (no scheduler or RPC of our own). Each worker enters
`lorainv.cli.common.user_extensions` with the shard's module list, so user checkers and faults
are in force there as in the driver, and saves traces to a private scratch directory: the trace
comes back inside the report as JSON text and the driver saves the ones it keeps
(`save_traces`), so nothing lives only on a worker.

Ctrl-C: workers ignore SIGINT; the driver catches it, asks every shard to stop (each stops
after its current example) and still collects their reports.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import signal
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from lorainv.testing.fuzzrun import FailureReport, Flags, Progress, ShardReport, ShardSpec, combine, run_shard, waves

OnProgress = Callable[[Progress], None]


def _private_trace_dir() -> None:
    """Point this worker's ``LORAINV_TRACE_DIR`` at a fresh scratch directory (mutates the
    process environment): the driver decides which traces to keep. The machine's own "trace
    saved" lines (meant for pytest users) go to /dev/null: the driver prints the kept ones."""
    import sys

    os.environ["LORAINV_TRACE_DIR"] = tempfile.mkdtemp(prefix="lorainv-worker-traces-")
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the worker process


def _shard_in_scope(spec: ShardSpec, hooks: Any) -> ShardReport:
    from lorainv.cli.common import torch_threads, user_extensions

    torch_threads()
    with user_extensions(list(spec.checkers)):
        return run_shard(spec, hooks)


# -- local processes -------------------------------------------------------------------------------
class _ProcessHooks:
    """Hooks over the primitives a worker process inherited at start-up."""

    def __init__(self, q: Any, stop: Any, claimed: Any) -> None:
        self.q, self.stop, self.claimed = q, stop, claimed

    def progress(self, msg: Progress) -> None:
        self.q.put(msg)

    def should_stop(self) -> bool:
        return bool(self.stop.is_set())

    def request_stop(self) -> None:
        self.stop.set()

    def failure_claimed(self) -> bool:
        return bool(self.claimed.value)

    def claim_failure(self) -> bool:
        with self.claimed.get_lock():
            first = not self.claimed.value
            self.claimed.value = True
        return first


_WORKER: dict[str, Any] = {}


def _init_process(q: Any, stop: Any, claimed: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver handles Ctrl-C and asks us to stop
    _private_trace_dir()
    _WORKER["hooks"] = _ProcessHooks(q, stop, claimed)


def _process_shard(spec: ShardSpec) -> ShardReport:
    return _shard_in_scope(spec, _WORKER["hooks"])


def _drain(q: Any, on_progress: OnProgress, timeout: float) -> None:
    try:
        msg = q.get(timeout=timeout)
    except queue_mod.Empty:
        return
    on_progress(msg)
    while True:
        try:
            on_progress(q.get_nowait())
        except queue_mod.Empty:
            return


def run_processes(specs: list[ShardSpec], on_progress: OnProgress) -> tuple[list[ShardReport], bool]:
    """Run every shard in its own process; return the reports and whether Ctrl-C interrupted.

    Blocks until every shard has returned (after a Ctrl-C, each stops after its current
    example). A worker that dies raises (``BrokenProcessPool``).
    """
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    stop = ctx.Event()
    claimed = ctx.Value("b", False)
    interrupted = False
    reports: list[ShardReport] = []
    with ProcessPoolExecutor(
        max_workers=len(specs), mp_context=ctx, initializer=_init_process, initargs=(q, stop, claimed)
    ) as pool:
        for wave in waves(specs):
            if stop.is_set():
                break
            futures: list[Future[ShardReport]] = [pool.submit(_process_shard, s) for s in wave]
            pending = set(futures)
            while pending:
                try:
                    _drain(q, on_progress, 0.2)
                    _, pending = wait(pending, timeout=0, return_when=FIRST_COMPLETED)
                except KeyboardInterrupt:
                    interrupted = True
                    stop.set()
            _drain(q, on_progress, 0)
            reports += [f.result() for f in futures]
    reports = combine(reports)
    if interrupted:
        for r in reports:
            r.stop_reason = "interrupted"
    return reports, interrupted


# -- Ray -------------------------------------------------------------------------------------------
def ray_available() -> bool:
    """Whether Ray is installed (without importing it: that takes seconds)."""
    import importlib.util

    return importlib.util.find_spec("ray") is not None


class _Coordinator(Flags):
    """The Ray actor every shard reports to (made remote in `run_ray`). State: the progress
    messages not yet drained by the driver, the stop flag, the first-failure flag."""

    def __init__(self) -> None:
        super().__init__()
        self.msgs: list[Progress] = []

    def progress(self, msg: Progress) -> None:
        self.msgs.append(msg)

    def drain(self) -> list[Progress]:
        out, self.msgs = self.msgs, []
        return out


class _RayHooks:
    def __init__(self, coord: Any) -> None:
        self.coord = coord

    def progress(self, msg: Progress) -> None:
        self.coord.progress.remote(msg)  # fire and forget: actor calls from one caller run in order

    def _get(self, ref: Any) -> Any:
        import ray

        return ray.get(ref)

    def should_stop(self) -> bool:
        return bool(self._get(self.coord.should_stop.remote()))

    def request_stop(self) -> None:
        self.coord.request_stop.remote()

    def failure_claimed(self) -> bool:
        return bool(self._get(self.coord.failure_claimed.remote()))

    def claim_failure(self) -> bool:
        return bool(self._get(self.coord.claim_failure.remote()))


def _ray_shard(spec: ShardSpec, coord: Any) -> ShardReport:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _private_trace_dir()
    return _shard_in_scope(spec, _RayHooks(coord))


def run_ray(
    specs: list[ShardSpec], address: str, on_progress: OnProgress, runtime_env: dict[str, Any] | None = None
) -> tuple[list[ShardReport], bool]:
    """Run every shard as a Ray task (``num_cpus=1``) on the cluster at ``address``
    (``local``: start a Ray instance here with 2 CPUs, and shut it down after).

    Connecting to an existing cluster leaves it running. Returns the reports and whether
    Ctrl-C interrupted.
    """
    import ray

    own = address == "local"
    if own:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)
    elif not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
    try:
        coord: Any = ray.remote(num_cpus=0)(_Coordinator).remote()
        task = ray.remote(num_cpus=1, max_retries=0)(_ray_shard)
        reports: list[ShardReport] = []
        interrupted = False
        for wave in waves(specs):
            if ray.get(coord.should_stop.remote()):
                break
            refs = [task.remote(spec, coord) for spec in wave]
            pending = list(refs)
            while pending:
                try:
                    _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.3)
                    for msg in ray.get(coord.drain.remote()):
                        on_progress(msg)
                except KeyboardInterrupt:
                    interrupted = True
                    coord.request_stop.remote()
            for msg in ray.get(coord.drain.remote()):
                on_progress(msg)
            reports += ray.get(refs)
        reports = combine(reports)
    finally:
        if own:
            ray.shutdown()
    if interrupted:
        for r in reports:
            r.stop_reason = "interrupted"
    return reports, interrupted


# -- traces ----------------------------------------------------------------------------------------
def save_traces(kept: list[FailureReport], directory: Path) -> None:
    """Write each kept failure's trace (its JSON text) into ``directory`` under its file name
    and point ``trace_path`` there (mutates the reports). Nothing is overwritten with other
    content: an existing file with the same name holds the same trace (the name is its digest)."""
    directory.mkdir(parents=True, exist_ok=True)
    for f in kept:
        path = directory / f.trace_file
        if not path.exists():
            tmp = path.with_suffix(f".tmp{os.getpid()}.{time.monotonic_ns()}")
            tmp.write_text(f.trace_json)
            tmp.replace(path)
        f.trace_path = str(path)
