"""Run the state machine as a campaign: a fixed example budget or a time limit, a seed,
progress reporting, and the shrunk failing trace. Used by ``lorainv fuzz`` (through
`lorainv.testing.fuzzrun`), the fault self-test and ``bench/detect.py``.

Example database: ``database=None`` (the default) reads and writes none, so library callers and
tests stay independent of each other's runs. With a database, Hypothesis saves every failing
example under the machine's name (the key is derived from it), and ``reuse=True`` replays the
saved examples of that name before generating (``replay_only=True``: replay and nothing else).
A passing replay is deleted from the database by Hypothesis.
"""

from __future__ import annotations

import inspect
import time
import unittest
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, settings
from hypothesis import seed as hyp_seed
from hypothesis.database import ExampleDatabase
from hypothesis.errors import Flaky
from hypothesis.stateful import run_state_machine_as_test

from lorainv.testing.machine import LorainvMachine, coverage_report, make_machine
from lorainv.trace import Trace

# Config fields under which each fault can exist at all (e.g. a partial page needs page_size 2).
FAULT_SETUPS: dict[str, dict[str, Any]] = {
    "stale_overlap_event": {"enable_lora_overlap_loading": True, "max_loras_per_batch": 1},
    "session_double_count": {"max_total_tokens": 32, "max_loras_per_batch": 3},
    "retract_leaks_tail": {"page_size": 2, "max_total_tokens": 12},
    "segments_from_batch_size": {"max_loras_per_batch": 3},
    "drainer_never_clears": {"lora_drain_wait_threshold": 0.5},
    "evict_in_batch_adapter": {"max_loras_per_batch": 2},
    "admission_ignores_staged_chunk": {"max_loras_per_batch": 2, "chunked_prefill_size": 3},
    "abort_chunked_leaks_kv": {"chunked_prefill_size": 2, "max_total_tokens": 32},
    "use_before_transfer": {"enable_lora_overlap_loading": True},
    "pinned_cache_key_collision": {"tp_size": 2},
    "stale_slot_tail": {},
    "nonresident_falls_back_to_slot0": {"max_loras_per_batch": 2},
}


def import_all_lorainv() -> None:
    """Import every lorainv module (once per process; ``__main__`` modules excepted).

    Hypothesis mixes constants from the source of every loaded local module into its draws, so
    a derandomized campaign's examples depend on which modules the process happened to import
    before it: in a test worker, on which tests ran there first. With all of lorainv loaded
    first, they depend only on the code (and on any user module loaded: a test suite that
    imports more local modules can load those up front too, as lorainv's own conftest does)."""
    if _ALL_IMPORTED:
        return
    import importlib
    import pkgutil

    import lorainv

    for info in pkgutil.walk_packages(lorainv.__path__, "lorainv."):
        if not info.name.endswith(".__main__"):
            importlib.import_module(info.name)
    _ALL_IMPORTED.append(True)


_ALL_IMPORTED: list[bool] = []


class _Factory:
    """Calls ``machine()``. Hypothesis keys the example database (and a derandomized run's
    seed) by ``function_digest`` of the factory it is given. For a class made by `make_machine`
    that digest first parses the whole of ``machine.py`` looking for the class's source (which
    is not there) and falls back to the name and signature: about 25 ms per campaign, paid on
    each of a fuzz run's rounds. This object offers no source, so the digest goes straight to
    the same name and signature: the same key, without the parse."""

    def __init__(self, machine: type[LorainvMachine]) -> None:
        self.machine = machine
        self.__name__ = machine.__name__
        self.__signature__ = inspect.signature(machine)

    def __call__(self) -> LorainvMachine:
        return self.machine()


@dataclass
class CampaignResult:
    found: bool
    trace: Trace | None
    trace_path: str | None
    seconds: float
    examples: int
    ops: int
    states: int
    transitions: int
    error: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    stopped: bool = False  # ended early because ``stop()`` returned True (no failure was lost)
    passed_before_failure: int | None = None  # examples that passed before the first failing one
    shrunk: bool = False  # the failing trace was shrunk (False when shrinking was off or given up)

    @property
    def coverage(self) -> dict[str, Any]:
        """Op variants, event kinds and rare states reached (`coverage_report` of the stats)."""
        return coverage_report(self.stats)


def _minimize_saved(trace: Trace, path: str | None) -> tuple[Trace, str | None]:
    """Delta-debug the failing trace (as found, or as Hypothesis shrank it) by replay (`lorainv.testing.minimize`) and
    overwrite the saved file with the result when it is shorter."""
    from lorainv.testing.minimize import minimize
    from lorainv.trace import save

    smaller = minimize(trace)
    if len(smaller.ops) < len(trace.ops) and path is not None:
        save(smaller, Path(path))
    return smaller, path


class StopRequested(KeyboardInterrupt):
    """Raised between examples when the campaign's ``stop()`` says so. A KeyboardInterrupt
    subclass because Hypothesis lets those through at once, without saving the example to
    the database or retrying it as a failure."""


def run_campaign(
    *,
    max_examples: int = 200,
    seed: int = 0,
    faults: frozenset[str] = frozenset(),
    network: str = "dummy",
    numeric: bool = False,
    steps: int = 30,
    shrink: bool = True,
    shrinker: str = "ddmin",
    derandomize: bool = False,
    overrides: dict[str, Any] | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    name: str = "fuzz",
    policy: frozenset[str] | None = None,
    database: ExampleDatabase | None = None,
    reuse: bool = False,
    replay_only: bool = False,
    stop: Callable[[], bool] | None = None,
    claim: Callable[[], bool] | None = None,
) -> CampaignResult:
    """Run ``max_examples`` examples of the machine; stop at the first (shrunk) failure.

    ``shrink``: make the failing trace small before it is returned and saved. ``shrinker``:
    ``"ddmin"`` (default) delta-debugs the trace as found, by replay (`lorainv.testing.minimize`);
    ``"hypothesis"`` runs Hypothesis's shrink phase first, then the same pass. Measured on the
    twelve catalogue faults (derandomized, 400-example budget), ddmin alone reached traces of
    1-9 ops in at most 6 s each, where Hypothesis's phase took 30-330 s per fault.

    ``database``: Hypothesis's example database (failing examples are saved under ``name``);
    ``reuse``: replay the examples saved under ``name`` first; ``replay_only``: only that.
    ``stop``: asked after every passing example while no failure has been found; True ends
    the run early (``stopped``), with the stats so far. ``claim``: asked once, when the first
    failure is found (during Hypothesis's shrink phase, else before the delta debugging), whether
    this campaign may shrink it; False gives shrinking up and returns the failure as found
    (``shrunk`` False; no trace file if Hypothesis's final replay did not happen).
    A real Ctrl-C (KeyboardInterrupt) propagates. Sets torch to one intra-op thread: a
    campaign's tensors are tiny, and parallel campaigns run as separate processes.
    """
    import torch

    if shrinker not in ("ddmin", "hypothesis"):
        raise ValueError(f"shrinker must be 'ddmin' or 'hypothesis', got {shrinker!r}")
    torch.set_num_threads(1)
    if derandomize:
        import_all_lorainv()
    cfg: dict[str, Any] = dict(overrides or {})
    if faults:
        cfg["faults"] = frozenset(faults)
        for f in sorted(faults):
            for k, v in FAULT_SETUPS.get(f, {}).items():
                cfg.setdefault(k, v)
    machine: type[LorainvMachine] = make_machine(name, network=network, numeric=numeric, policy=policy, **cfg)
    claimed: list[bool] = []
    if progress is not None or stop is not None or claim is not None:

        def after_example(stats: dict[str, Any]) -> None:
            if progress is not None:
                progress(stats)
            if machine.last_failure is not None:  # a failure was found: Hypothesis is shrinking it
                if claim is not None and not claimed:
                    claimed.append(claim())
                    if not claimed[0]:
                        raise StopRequested
                return
            if stop is not None and stop():
                raise StopRequested

        machine.progress = staticmethod(after_example)
    # count passing examples up to the first failure (the machine's "examples" stat also counts
    # an example that fails in its teardown, and shrink attempts)
    passed = [0]
    first_failure: list[int] = []
    machine_teardown = machine.teardown

    def teardown(self: LorainvMachine) -> None:
        try:
            machine_teardown(self)
        finally:
            if self.failed and not first_failure:
                first_failure.append(passed[0])
            elif not self.failed and self.h is not None:
                passed[0] += 1

    machine.teardown = teardown  # type: ignore[method-assign]
    reusing = [Phase.reuse] if database is not None and (reuse or replay_only) else []
    finding = [] if replay_only else [Phase.explicit, Phase.generate]
    phases = reusing + finding + ([Phase.shrink] if shrink and shrinker == "hypothesis" else [])
    s = settings(
        max_examples=max_examples,
        stateful_step_count=steps,
        deadline=None,
        database=database,
        derandomize=derandomize,
        phases=phases,
        report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    factory = _Factory(machine)
    if not derandomize:
        hyp_seed(seed)(factory)
    t0 = time.monotonic()
    error = ""
    stopped = abandoned = False
    try:
        run_state_machine_as_test(factory, settings=s)  # type: ignore[arg-type]  # any callable, per its docs
        found = False
    except StopRequested:
        if machine.last_failure is not None:  # shrinking given up: ``claim`` said another has it
            found, abandoned = True, True
            error = "shrinking left to the campaign that found the first failure"
        else:
            found, stopped = False, True
    except unittest.SkipTest:  # Hypothesis ran nothing: a replay with no saved example
        found = False
    except (AssertionError, Flaky) as e:
        found = True
        error = str(e).splitlines()[0] if str(e) else type(e).__name__
    st = machine.stats
    trace, path = (machine.last_failure, machine.last_trace_path) if found else (None, None)
    if abandoned:
        path = None  # the trace was never saved: that happens on Hypothesis's final replay
    if trace is not None and shrink and not abandoned:
        if claim is not None and not claimed:
            claimed.append(claim())
        if claimed and not claimed[0]:  # another campaign's failure is the one shrunk
            abandoned = True
        else:
            trace, path = _minimize_saved(trace, path)
    return CampaignResult(
        found=found,
        trace=trace,
        trace_path=path,
        seconds=time.monotonic() - t0,
        examples=st.get("examples", 0),
        ops=st.get("ops", 0),
        states=len(st.get("states", ())),
        transitions=len(st.get("transitions", ())),
        error=error,
        stats=st,
        stopped=stopped,
        passed_before_failure=first_failure[0] if found and first_failure else None,
        shrunk=found and shrink and not abandoned,
    )
