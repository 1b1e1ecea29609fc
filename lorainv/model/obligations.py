"""Op obligations: what each op must do, predicted from the model's abstract state alone.

Before an op's events are read, `predict` says whether the op is valid (``accept``), invalid
(``reject``, with the documented error class) or left open by the spec (``either``), and
what an accepted op must report at once. `judge` then holds the events to that prediction:

* `Rejected` only for an op the model calls invalid, as the op's only event, with an allowed
  error class; an op the model calls invalid must be rejected;
* an accepted op reports its effect (``first``: its first event; ``must``: events that must
  appear somewhere in the op) and no event kind outside ``allowed``.

The rules are re-derived from the README "Errors" table and the ops' documented contracts,
not from engine code. Where the model cannot know an input's fate it says ``either``:

* ``LoadAdapter`` from a directory: the files decide (any `AdapterError` subclass or accept);
* ``AddRequest`` when the vocabulary or the context length was not given to the model and
  every other rule passes: accept or `RequestError`.

Pure: reads the model, never mutates it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lorainv import events as E
from lorainv import ops as O
from lorainv.errors import Violation

if TYPE_CHECKING:
    from lorainv.model.reference import ReferenceModel

# what settling after any op may add: landed or failed loads, aborts after exhausted load
# retries, drain marks and reservations that ended
BACKGROUND = frozenset({"LoadCompleted", "LoadFailed", "Finished", "DrainCleared", "SlotReserved", "ReservationEnded"})
# event kinds only the op that causes them may report; a Step reports none of them
OP_ONLY = frozenset(
    {
        "Queued",
        "Rejected",
        "AdapterRegistered",
        "AdapterUnregistered",
        "Pinned",
        "Unpinned",
        "SessionOpened",
        "SessionClosed",
        "TransfersCompleted",
        "ClockAdvanced",
        "Aborted",
    }
)
ADAPTER_ERRORS = frozenset(
    {
        "AdapterError",
        "AdapterNotFoundError",
        "AdapterFormatError",
        "AdapterConfigError",
        "UnsupportedAdapterError",
        "AdapterRankError",
        "AdapterShapeError",
        "AdapterNumericError",
    }
)
REQ = frozenset({"RequestError"})
ADP = frozenset({"AdapterError"})
NOT_FOUND = frozenset({"AdapterNotFoundError"})


@dataclass(frozen=True)
class Expect:
    """The prediction for one op. ``first`` / ``must`` hold events compared by equality, or a
    kind name (``"TransfersCompleted"``) when only the kind is predicted."""

    verdict: str  # "accept" | "reject" | "either"
    errors: frozenset[str] = frozenset()  # error classes allowed in `Rejected`
    why: str = ""
    first: E.Event | str | None = None
    must: tuple[E.Event | str, ...] = ()
    allowed: frozenset[str] = BACKGROUND
    extra: dict[str, Any] = field(default_factory=dict)


def reject(errors: frozenset[str], why: str) -> Expect:
    return Expect("reject", errors, why)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _name(x: Any) -> bool:
    return isinstance(x, str) and bool(x)


def predict(m: ReferenceModel, op: O.Op) -> Expect:
    """The model's prediction for ``op`` in its current state (pure)."""
    rule = _RULES.get(op.kind)
    if rule is None:
        return Expect("either", REQ, f"no obligation rule for op {op.kind}", allowed=frozenset())
    return rule(m, op)


def _add(m: ReferenceModel, op: Any) -> Expect:
    rid, prompt, adapter, max_new, sid = op.rid, op.prompt, op.adapter, op.max_new_tokens, op.session_id
    if not _name(rid) or rid in m.s.used:
        return reject(REQ, f"request id {rid!r} is empty, not a string or already used")
    if not isinstance(prompt, (list, tuple)) or not prompt:
        return reject(REQ, "the prompt is not a non-empty list or tuple")
    if any(not _is_int(t) or t < 0 for t in prompt):
        return reject(REQ, "a prompt token is not an int >= 0")
    if m.vocab_size is not None and any(t >= m.vocab_size for t in prompt):
        return reject(REQ, f"a prompt token is outside the vocabulary [0, {m.vocab_size})")
    if not _is_int(max_new) or max_new < 1:
        return reject(REQ, f"max_new_tokens={max_new!r} is not an int >= 1")
    if adapter is not None and (not isinstance(adapter, str) or adapter not in m.s.registered):
        return reject(REQ, f"adapter {adapter!r} is not registered")
    hist = 0
    if sid is not None:
        sess = m.s.sessions.get(sid) if isinstance(sid, str) else None
        if sess is None:
            return reject(REQ, f"session {sid!r} is not open")
        if any(r.session == sid and r.live for r in m.s.reqs.values()):
            return reject(REQ, f"session {sid!r} already has a live turn")
        if sess.fill and sess.adapter != adapter:
            return reject(REQ, f"session {sid!r} holds KV of adapter {sess.adapter!r}, not {adapter!r}")
        hist = sess.fill
    if len(prompt) > m.cfg.max_total_tokens:
        return reject(REQ, f"a prompt of {len(prompt)} tokens exceeds max_total_tokens")
    total = hist + len(prompt) + max_new
    if m.max_context_len is not None and total > m.max_context_len:
        return reject(REQ, f"history + prompt + max_new_tokens = {total} exceeds the context {m.max_context_len}")
    queued = E.Queued(rid, adapter, len(prompt), max_new, sid)
    if m.vocab_size is None or m.max_context_len is None:
        return Expect("either", REQ, "vocabulary or context length unknown to the model", first=queued)
    return Expect("accept", first=queued)


def _abort(m: ReferenceModel, op: Any) -> Expect:
    r = m.s.reqs.get(op.rid) if isinstance(op.rid, str) else None
    if r is None:
        return reject(REQ, f"request {op.rid!r} is unknown or retired")
    if not r.live:
        return reject(REQ, f"request {op.rid!r} already ended ({r.state})")
    return Expect("accept", first=E.Aborted(op.rid, r.state))


def _step(m: ReferenceModel, op: Any) -> Expect:
    return Expect("accept", allowed=frozenset(E.EVENTS) - OP_ONLY, why="a Step is never refused")


def _complete(m: ReferenceModel, op: Any) -> Expect:
    if op.n is not None and (not _is_int(op.n) or op.n < 0):
        return reject(REQ, f"CompleteTransfers.n={op.n!r} is not None or an int >= 0")
    # every copy lands when n is None, so every load in flight is reaped in this op
    landed = tuple(sorted(m.s.loading, key=repr)) if op.n is None else ()
    return Expect("accept", first="TransfersCompleted", extra={"landed": landed})


def _fail(m: ReferenceModel, op: Any) -> Expect:
    if not _is_int(op.n) or op.n < 0:
        return reject(REQ, f"FailTransfers.n={op.n!r} is not an int >= 0")
    return Expect("accept")


def _clock(m: ReferenceModel, op: Any) -> Expect:
    dt = op.dt
    if isinstance(dt, bool) or not isinstance(dt, (int, float)) or not (dt >= 0 and math.isfinite(dt)):
        return reject(REQ, f"AdvanceClock.dt={dt!r} is not a finite number >= 0")
    return Expect("accept", first=E.ClockAdvanced(m.s.now + float(dt)))


def _digits(text: str, most: int) -> bool:
    return 1 <= len(text) <= most and text.isdecimal()


def _gen_rank(source: str) -> int | None:
    """The rank of a documented generated source ``gen:<rank>:<seed>[:<alpha>[:rs]]`` (rank >= 1,
    0 <= seed < 2**64, at most 20 digits each; alpha a plain decimal of at most 9+9 digits);
    None when ``source`` is malformed."""
    parts = source.split(":")
    if not 3 <= len(parts) <= 5 or not (_digits(parts[1], 20) and _digits(parts[2], 20)):
        return None
    if len(parts) >= 4:
        whole, dot, frac = parts[3].partition(".")
        if not _digits(whole, 9) or (dot and not _digits(frac, 9)):
            return None
    if len(parts) == 5 and parts[4] != "rs":
        return None
    rank, seed = int(parts[1]), int(parts[2])
    return rank if rank >= 1 and seed < 1 << 64 else None


def _pin_feasible(m: ReferenceModel, name: str) -> str:
    """Why pinning ``name`` now must fail, or "" when it succeeds (P-1 pins; a slot to load into)."""
    p = m.cfg.max_loras_per_batch
    if len(m.s.pinned | {name}) > p - 1:
        return f"at most max_loras_per_batch - 1 = {p - 1} adapters can be pinned"
    if name in m.resident():
        return f"{name!r} is still loading" if name in m.s.loading else ""
    busy = m.active_adapters() | {name}
    free = len(m.s.slots) < p
    if not free and all(u in busy or u in m.s.pinned for u in m.s.slots.values()):
        return f"every slot is held by active or pinned adapters {sorted(m.s.slots.values(), key=repr)}"
    return ""


def _pin_events(m: ReferenceModel, name: str) -> tuple[E.Event | str, ...]:
    load: tuple[E.Event | str, ...] = () if name in m.resident() else ("LoadStarted", "LoadCompleted")
    return (*load, E.Pinned(name))


def _load(m: ReferenceModel, op: Any) -> Expect:
    name, source, pinned = op.name, op.source, op.pinned
    if not _name(name):
        return reject(ADP, f"adapter name {name!r} is not a non-empty string")
    if name in m.s.registered:
        return reject(frozenset({"DuplicateAdapterError"}), f"adapter {name!r} is already registered")
    if not isinstance(source, str):
        return reject(ADP, f"source {source!r} is not a string")
    if not isinstance(pinned, bool):
        return reject(ADP, f"pinned={pinned!r} is not a bool")
    verdict, errors, rank = "either", ADAPTER_ERRORS, None
    if source == "gen" or source.startswith("gen:"):
        rank = _gen_rank(source)
        if rank is None:
            return reject(frozenset({"AdapterConfigError"}), f"malformed generated source {source!r}")
        if rank > m.cfg.max_lora_rank:
            return reject(frozenset({"AdapterRankError"}), f"{source}: rank {rank} > max_lora_rank")
        verdict, errors = "accept", frozenset()
    must: tuple[E.Event | str, ...] = ()
    allowed = BACKGROUND
    if pinned:
        why = _pin_feasible(m, name)
        if why:
            return reject(ADAPTER_ERRORS if verdict == "either" else ADP, f"cannot pin {name!r}: {why}")
        must, allowed = _pin_events(m, name), BACKGROUND | {"Evicted", "LoadStarted", "Pinned"}
    first = E.AdapterRegistered(name, rank, pinned) if rank is not None else "AdapterRegistered"
    return Expect(verdict, errors, "", first=first, must=must, allowed=allowed, extra={"name": name})


def _unload(m: ReferenceModel, op: Any) -> Expect:
    name = op.name
    if not isinstance(name, str) or name not in m.s.registered:
        return reject(NOT_FOUND, f"no adapter is registered as {name!r}")
    if any(r.adapter == name and r.live for r in m.s.reqs.values()):
        return reject(REQ, f"live requests use {name!r}")
    if name in m.s.loading:
        return reject(REQ, f"{name!r} has a load in flight")
    if any(s.fill and s.adapter == name for s in m.s.sessions.values()):
        return reject(REQ, f"a session holds KV computed by {name!r}")
    must: list[E.Event | str] = [E.Unpinned(name)] if name in m.s.pinned else []
    if name in m.resident():
        must.append(E.Evicted(name, m.resident()[name]))
    must.append(E.AdapterUnregistered(name))
    return Expect("accept", must=tuple(must), allowed=BACKGROUND | {"CacheEvicted", "Unpinned", "Evicted"})


def _pin(m: ReferenceModel, op: Any) -> Expect:
    name = op.name
    if not isinstance(name, str) or name not in m.s.registered:
        return reject(NOT_FOUND, f"no adapter is registered as {name!r}")
    if name in m.s.pinned:
        return reject(ADP, f"{name!r} is already pinned")
    why = _pin_feasible(m, name)
    if why:
        return reject(ADP, f"cannot pin {name!r}: {why}")
    return Expect("accept", must=_pin_events(m, name), allowed=BACKGROUND | {"Evicted", "LoadStarted", "Pinned"})


def _unpin(m: ReferenceModel, op: Any) -> Expect:
    name = op.name
    if not isinstance(name, str) or name not in m.s.registered:
        return reject(NOT_FOUND, f"no adapter is registered as {name!r}")
    if name not in m.s.pinned:
        return reject(ADP, f"{name!r} is not pinned")
    return Expect("accept", first=E.Unpinned(name))


def _open(m: ReferenceModel, op: Any) -> Expect:
    sid = op.session_id
    if not _name(sid) or sid in m.s.sessions:
        return reject(REQ, f"session id {sid!r} is empty, not a string or already open")
    if len(m.s.sessions) >= m.cfg.max_sessions:
        return reject(REQ, f"max_sessions={m.cfg.max_sessions} sessions are open")
    return Expect("accept", first=E.SessionOpened(sid))


def _close(m: ReferenceModel, op: Any) -> Expect:
    sid = op.session_id
    if not isinstance(sid, str) or sid not in m.s.sessions:
        return reject(REQ, f"session {sid!r} is not open")
    turns = [E.Aborted(rid, r.state) for rid, r in m.s.reqs.items() if r.session == sid and r.live]
    return Expect("accept", must=(*turns, "SessionClosed"), allowed=BACKGROUND | {"Aborted", "SessionClosed"})


_RULES = {
    "AddRequest": _add,
    "Abort": _abort,
    "Step": _step,
    "CompleteTransfers": _complete,
    "FailTransfers": _fail,
    "AdvanceClock": _clock,
    "LoadAdapter": _load,
    "UnloadAdapter": _unload,
    "PinAdapter": _pin,
    "UnpinAdapter": _unpin,
    "OpenSession": _open,
    "CloseSession": _close,
}


def _matches(want: E.Event | str, ev: E.Event) -> bool:
    return ev.kind == want if isinstance(want, str) else ev == want


def judge(op: O.Op, want: Expect, events: list[E.Event]) -> list[Violation]:
    """Hold ``events`` to the prediction ``want`` for ``op``; returns the broken obligations."""

    def bad(inv: str, msg: str) -> list[Violation]:
        return [Violation("obligation", inv, f"{op.kind}: {msg}", (op.kind,))]

    if op.kind not in _RULES:
        return [Violation("model", "unhandled-op", f"the model has no obligation rule for op {op.kind}", (op.kind,))]
    rejected = [e for e in events if isinstance(e, E.Rejected)]
    if rejected:
        r = rejected[0]
        if want.verdict == "accept":
            return bad("rejected-valid", f"refused with {r.error} ({r.message}) but the model says it is valid")
        if len(events) != 1 or r.op != op.kind:
            return bad("rejected-effect", f"a refusal must be the op's only event, for {op.kind}: {events}")
        if r.error not in want.errors:
            return bad("error-class", f"refused with {r.error}; the model expects {sorted(want.errors)} ({want.why})")
        return []
    if want.verdict == "reject":
        return bad("accepted-invalid", f"accepted, but the model says it is invalid: {want.why}")
    out: list[Violation] = []
    missing: list[str] = []
    if want.first is not None and (not events or not _matches(want.first, events[0])):
        missing.append(f"the first event must be {want.first}, got {events[0] if events else 'nothing'}")
    missing += [f"no {w}" for w in want.must if not any(_matches(w, e) for e in events)]
    for adapter in want.extra.get("landed", ()):
        if not any(isinstance(e, (E.LoadCompleted, E.LoadFailed)) and e.adapter == adapter for e in events):
            missing.append(f"every transfer completed, yet the load of {adapter!r} did not land")
    if missing:
        out += bad("effect", "; ".join(missing) + f" (events: {[str(e) for e in events]})")
    expected = {w if isinstance(w, str) else w.kind for w in (want.first, *want.must) if w is not None}
    stray = [e for e in events if e.kind not in want.allowed and e.kind not in expected]
    if stray:
        out += bad("unexpected-event", f"reported {stray[0]}, which this op cannot cause")
    idle = [i for i, e in enumerate(events) if isinstance(e, E.Idle)]
    if idle and any(i <= idle[0] or e.kind not in BACKGROUND for i, e in enumerate(events) if i != idle[0]):
        # only settling (landed loads, drain bookkeeping) may follow a Step that found nothing to do
        out += bad("unexpected-event", "Idle with other events: a Step that did something is not idle")
    return out
