"""A subclass of the machine adds its own rule through the public ``apply``: the op runs in
lockstep with the model, every pool is checked, and it is counted under its variant."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import rule, run_state_machine_as_test

from lorainv import ops as O
from lorainv.testing.machine import make_machine

Base = make_machine("CustomRuleBase")


class BurstMachine(Base):  # type: ignore[misc,valid-type]
    @rule(n=st.integers(1, 3))
    def burst(self, n: int) -> None:
        for _ in range(n):
            self.apply(O.Step(), variant="burst")

    @rule()
    def abort_unknown(self) -> None:
        self.apply(O.Abort("no-such-request"), variant="abort-unknown")


def test_a_custom_rule_runs_in_lockstep_and_is_counted() -> None:
    BurstMachine.stats.clear()
    run_state_machine_as_test(
        BurstMachine,
        settings=settings(
            max_examples=15,
            stateful_step_count=15,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
    counted = BurstMachine.stats["ops_by_variant"]
    assert counted[("Step", "burst", "accepted")] > 0
    # the model judged the unknown rid invalid, the engine rejected it, and nothing else counted it
    assert counted[("Abort", "abort-unknown", "rejected")] > 0
    assert counted[("Abort", "abort-unknown", "accepted")] == 0
