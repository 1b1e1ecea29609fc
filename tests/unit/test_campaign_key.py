"""The campaign's factory keeps Hypothesis's example-database key of the machine class.

Saved failures are found again by that key (derived from the machine's name), and a
derandomized campaign's random stream is seeded by it; the factory exists only to skip the
source search Hypothesis makes for a class created at run time."""

from hypothesis.internal.reflection import function_digest

from lorainv.testing.campaign import _Factory
from lorainv.testing.machine import LorainvMachine, make_machine


def test_factory_digest_equals_the_machine_class_digest() -> None:
    machine = make_machine("fuzz-fast", max_total_tokens=32)
    assert function_digest(_Factory(machine)) == function_digest(machine)


def test_factory_digest_still_depends_on_the_name() -> None:
    a, b = make_machine("fuzz-fast"), make_machine("fuzz-numeric")
    assert function_digest(_Factory(a)) != function_digest(_Factory(b))


def test_factory_builds_a_fresh_machine_each_call() -> None:
    f = _Factory(make_machine("fuzz-fast"))
    m1, m2 = f(), f()
    assert isinstance(m1, LorainvMachine) and m1 is not m2
