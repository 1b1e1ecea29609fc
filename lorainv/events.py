"""Events: what the engine reports for every transition, validated by the reference model.

Each event is a frozen dataclass with a stable ``kind`` (its class name) and serialises as
``{"kind": kind, **fields}``.
"""

from __future__ import annotations

from lorainv.records import Record, registry


class Event(Record):
    """Base class of all events."""


event = registry(Event, key="kind")


@event
class Queued(Event):
    """A request entered the waiting queue."""

    rid: str
    adapter: str | None
    prompt_len: int
    max_new_tokens: int
    session_id: str | None = None


@event
class Rejected(Event):
    """A call was refused with a typed error; the state is unchanged."""

    op: str
    error: str
    message: str


@event
class PrefixHit(Event):
    """A request reused ``tokens`` tokens: from the prefix cache or a restored session."""

    rid: str
    tokens: int
    source: str  # "cache" | "session"


@event
class Scheduled(Event):
    """A prefill chunk of ``chunk_tokens`` tokens was scheduled; ``done`` marks the last chunk."""

    rid: str
    chunk_tokens: int
    done: bool


@event
class BatchFormed(Event):
    """A forward ran over ``rids`` (in batch order) with the given per-request adapters."""

    mode: str  # "prefill" | "decode"
    rids: tuple[str, ...]
    adapters: tuple[str | None, ...]
    num_segments: int


@event
class Decoded(Event):
    """Request ``rid`` produced output token ``token``."""

    rid: str
    token: int


@event
class Retracted(Event):
    """A request was preempted; it holds nothing and is back in the queue. ``reason``: "kv"
    (no KV left for the next round) or "drain" (its adapter gives its slot to a starving one)."""

    rid: str
    output_len: int
    reason: str = "kv"


@event
class Finished(Event):
    """A request ended: ``reason`` is ``length`` or ``abort`` (``detail`` says why)."""

    rid: str
    reason: str
    detail: str = ""


@event
class Aborted(Event):
    """A request was aborted by the user and freed everything it held."""

    rid: str
    state: str  # the state it was in when aborted


@event
class AdapterRegistered(Event):
    name: str
    rank: int
    pinned: bool = False


@event
class AdapterUnregistered(Event):
    name: str


@event
class Pinned(Event):
    name: str


@event
class Unpinned(Event):
    name: str


@event
class LoadStarted(Event):
    """A copy of ``adapter`` into ``slot`` was issued (async when ``overlap``)."""

    adapter: str | None
    slot: int
    overlap: bool


@event
class LoadCompleted(Event):
    """The copy into ``slot`` completed and was waited on: the adapter is ready."""

    adapter: str | None
    slot: int


@event
class LoadFailed(Event):
    """The copy into ``slot`` failed; the slot is free again."""

    adapter: str | None
    slot: int
    detail: str


@event
class Evicted(Event):
    """``adapter`` left ``slot``."""

    adapter: str | None
    slot: int


@event
class DrainMarked(Event):
    """Running adapter ``adapter`` drains so that starving ``for_adapter`` can get a slot."""

    adapter: str | None
    for_adapter: str | None


@event
class DrainCleared(Event):
    """``adapter`` no longer drains: it stopped running, or its starving adapter stopped starving."""

    adapter: str | None


@event
class SlotReserved(Event):
    """A drain freed a slot for starving ``adapter``; no other adapter may take a new slot
    while the reservation holds."""

    adapter: str | None


@event
class ReservationEnded(Event):
    """``adapter``'s reservation ended: "admitted" (its load started or a chunk of it was
    scheduled) or "gone" (nothing of it waits any more)."""

    adapter: str | None
    reason: str


@event
class CacheEvicted(Event):
    """The prefix cache gave ``tokens`` tokens back to the allocator."""

    tokens: int


@event
class CacheInserted(Event):
    """A finished request's KV entered the prefix cache: ``tokens`` new tokens now belong to it."""

    rid: str
    tokens: int


@event
class SessionOpened(Event):
    session_id: str


@event
class SessionRestored(Event):
    """Session KV (``tokens`` tokens) was lent to request ``rid``."""

    session_id: str
    rid: str
    tokens: int


@event
class SessionSaved(Event):
    """Request ``rid`` finished and its KV (``tokens`` tokens) now belongs to the session."""

    session_id: str
    rid: str
    tokens: int


@event
class SessionClosed(Event):
    session_id: str
    freed_tokens: int


@event
class TransfersCompleted(Event):
    completed: int
    failed: int = 0


@event
class ClockAdvanced(Event):
    now: float


@event
class Idle(Event):
    """A ``Step`` found nothing to do."""


EVENTS: dict[str, type[Event]] = {k: v for k, v in Event._registry.items() if issubclass(v, Event)}
