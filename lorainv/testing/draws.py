"""`draws()`: the machine's cheaper stand-in for ``st.data()``.

A rule that draws inside its body takes ``data`` and calls ``data.draw(strategy, label)``. With
``st.data()`` each such call costs about 40 µs before any value is drawn: Hypothesis wraps it in
an argument span, saves and compares the global `random` state (twice a 625-word copy), and
formats a note for its failure report. The fuzzer's rules make about two such draws per op, so
that wrapper was a tenth of a campaign's time. `Draws.draw` goes straight to the test case's
own draw (the one `st.composite` hands its function), about 10 µs per call, with the same
choices and the same shrinking. What is lost is only Hypothesis's printed "Draw N (label)"
lines; lorainv reports a failure as its own trace of ops, which records every drawn value.

`Draws` has ``st.DataObject``'s ``draw(strategy, label=None)`` signature, so helpers written
for one take either (a user's rule may keep ``st.data()``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from hypothesis import strategies as st

T = TypeVar("T")


class Draws:
    """Draws from the running test case. Valid only inside the example that made it."""

    __slots__ = ("_draw",)

    def __init__(self, draw: Callable[[st.SearchStrategy[Any]], Any]) -> None:
        self._draw = draw

    def draw(self, strategy: st.SearchStrategy[T], label: Any = None) -> T:
        """A value from ``strategy``; ``label`` is accepted for ``st.DataObject`` compatibility."""
        value: T = self._draw(strategy)
        return value

    def __repr__(self) -> str:
        return "draws(...)"


# what the machine's helpers accept: either kind of draw source
DrawSource = Draws | st.DataObject


@st.composite
def draws(draw: Callable[[st.SearchStrategy[Any]], Any]) -> Draws:
    """A strategy for a `Draws` of the current test case (use as ``@rule(data=draws())``)."""
    return Draws(draw)
