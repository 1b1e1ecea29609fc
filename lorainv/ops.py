"""Ops: the only way to drive the system. A trace is a config, a seed and a list of ops.

Each op is a frozen dataclass with a stable ``kind`` (its class name) and serialises as
``{"op": kind, **fields}``. Request ids are part of ``AddRequest`` so that traces can
refer to them (``Abort("r3")``) and replay is exact.
"""

from __future__ import annotations

from lorainv.records import Record, registry


class Op(Record):
    """Base class of all ops."""


op = registry(Op, key="op")


@op
class AddRequest(Op):
    """Queue a request. ``adapter=None`` is the base model; ``session_id`` makes it a session turn."""

    rid: str
    prompt: tuple[int, ...]
    adapter: str | None = None
    max_new_tokens: int = 8
    session_id: str | None = None


@op
class Abort(Op):
    """Abort a live request in whatever state it is."""

    rid: str


@op
class Step(Op):
    """Run one scheduler iteration (a prefill round or a decode round)."""


@op
class CompleteTransfers(Op):
    """Complete the oldest ``n`` pending host-to-device copies (all of them when ``n`` is None)."""

    n: int | None = None


@op
class AdvanceClock(Op):
    """Advance the simulated clock by ``dt`` seconds."""

    dt: float


@op
class LoadAdapter(Op):
    """Register an adapter on the host.

    ``source`` is a PEFT directory, or ``"gen:<rank>:<seed>"`` for a generated adapter
    matching the current network (no files involved, so traces are self-contained).
    """

    name: str
    source: str
    pinned: bool = False


@op
class UnloadAdapter(Op):
    """Unregister an adapter (refused while a live request uses it)."""

    name: str


@op
class PinAdapter(Op):
    """Pin a registered adapter: it is loaded and never evicted."""

    name: str


@op
class UnpinAdapter(Op):
    """Unpin an adapter: it becomes evictable again."""

    name: str


@op
class OpenSession(Op):
    """Open a streaming session whose turns keep their KV between requests."""

    session_id: str


@op
class CloseSession(Op):
    """Close a session and free everything it holds."""

    session_id: str


@op
class FailTransfers(Op):
    """Make the next ``n`` pending host-to-device copies fail with an I/O error when completed."""

    n: int = 1


OPS: dict[str, type[Op]] = {k: v for k, v in Op._registry.items() if issubclass(v, Op)}
