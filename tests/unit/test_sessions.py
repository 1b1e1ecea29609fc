"""`SessionManager`: slot lifecycle, the lend (``is_active``) accounting and exact frees;
a property that random turns and closes return every token and row."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorainv.config import RuntimeConfig
from lorainv.errors import RequestError
from lorainv.impl.kv_pool import ReqToTokenPool, TokenAllocator
from lorainv.impl.sessions import SessionManager, SessionSlot

TOKENS = 16
ROWS = 4


@dataclass
class Pools:
    alloc: TokenAllocator
    rows: ReqToTokenPool
    mgr: SessionManager


def _pools(max_sessions: int = 2, cfg: RuntimeConfig | None = None, page_size: int = 1) -> Pools:
    alloc = TokenAllocator(TOKENS, page_size=page_size)
    rows = ReqToTokenPool(ROWS, max_context_len=32)
    return Pools(alloc, rows, SessionManager(alloc, rows, max_sessions, cfg or RuntimeConfig()))


@pytest.fixture
def p() -> Pools:
    return _pools()


def _l(a: np.ndarray | None) -> list[int]:
    assert a is not None
    return [int(x) for x in a]


def _state(p: Pools) -> tuple[list[int], list[int], list[str]]:
    return _l(p.alloc.free_indices()), p.rows.free_rows(), sorted(p.mgr.slots)


def _save_turn(p: Pools, sid: str, tokens: tuple[int, ...], adapter: str | None = "a") -> tuple[int, list[int]]:
    """A first turn of ``len(tokens)`` tokens finishes: its row and KV go to the session."""
    row = p.rows.alloc()
    idx = p.alloc.alloc(len(tokens))
    assert row is not None and idx is not None
    p.mgr.save(sid, row, tokens, idx, len(tokens), adapter)
    return row, _l(idx)


# -- open ----------------------------------------------------------------------------------


def test_open_gives_an_empty_inactive_slot(p: Pools) -> None:
    slot = p.mgr.open("s1")
    assert isinstance(slot, SessionSlot)
    assert p.mgr.get("s1") is slot
    assert (slot.row, slot.tokens, slot.kv_len, slot.alloc_len, slot.adapter) == (None, (), 0, 0, None)
    assert (slot.is_active, slot.active_rid) == (False, None)
    assert p.mgr.session_held_tokens() == 0
    assert p.mgr.session_rows() == []


def test_open_duplicate_refused(p: Pools) -> None:
    first = p.mgr.open("s1")
    with pytest.raises(RequestError, match="session 's1' is already open"):
        p.mgr.open("s1")
    assert p.mgr.get("s1") is first
    assert sorted(p.mgr.slots) == ["s1"]


def test_max_sessions(p: Pools) -> None:
    p.mgr.open("s1")
    p.mgr.open("s2")
    with pytest.raises(RequestError, match="cannot open session 's3': max_sessions=2 are open"):
        p.mgr.open("s3")
    assert sorted(p.mgr.slots) == ["s1", "s2"]
    assert p.mgr.close("s1") == 0
    p.mgr.open("s3")
    assert sorted(p.mgr.slots) == ["s2", "s3"]


def test_max_sessions_zero_refuses_every_open() -> None:
    p = _pools(max_sessions=0)
    with pytest.raises(RequestError, match="max_sessions=0"):
        p.mgr.open("s1")
    assert p.mgr.slots == {}


@pytest.mark.parametrize("sid", ["", None, 3])
def test_open_bad_id(p: Pools, sid: object) -> None:
    with pytest.raises(RequestError, match="session_id must be a non-empty string"):
        p.mgr.open(sid)  # type: ignore[arg-type]
    assert p.mgr.slots == {}


def test_unknown_session_refused_everywhere(p: Pools) -> None:
    p.mgr.open("s1")
    before = _state(p)
    calls = [
        lambda: p.mgr.close("nope"),
        lambda: p.mgr.get("nope"),
        lambda: p.mgr.restore_to_req("nope", "r1"),
        lambda: p.mgr.release("nope"),
        lambda: p.mgr.save("nope", 0, (1,), np.array([1]), 1, None),
    ]
    for call in calls:
        with pytest.raises(RequestError, match="unknown session 'nope'; open it with open_session first"):
            call()
    assert _state(p) == before


# -- save / restore / release --------------------------------------------------------------


def test_save_then_restore_sets_active_and_keeps_fields(p: Pools) -> None:
    p.mgr.open("s1")
    row, idx = _save_turn(p, "s1", (7, 8, 9))
    assert (row, idx) == (0, [1, 2, 3])
    slot = p.mgr.get("s1")
    assert (slot.row, slot.tokens, slot.kv_len, slot.alloc_len, slot.adapter) == (0, (7, 8, 9), 3, 3, "a")
    assert slot.history == (7, 8, 9)
    assert slot.is_active is False

    got = p.mgr.restore_to_req("s1", "r1")
    assert got is slot
    assert (slot.is_active, slot.active_rid) == (True, "r1")
    assert (slot.row, slot.tokens, slot.kv_len, _l(slot.indices), slot.adapter) == (0, (7, 8, 9), 3, [1, 2, 3], "a")
    assert p.alloc.available_size() == TOKENS - 3  # a lend allocates and frees nothing


def test_restore_is_idempotent_for_the_same_request(p: Pools) -> None:
    p.mgr.open("s1")
    _save_turn(p, "s1", (1, 2))
    p.mgr.restore_to_req("s1", "r1")
    p.mgr.restore_to_req("s1", "r1")  # a retried chunk
    with pytest.raises(RequestError, match="session 's1' already has an active turn r1"):
        p.mgr.restore_to_req("s1", "r2")
    slot = p.mgr.get("s1")
    assert (slot.is_active, slot.active_rid) == (True, "r1")


def test_session_held_tokens_excludes_active_slots(p: Pools) -> None:
    p.mgr.open("s1")
    p.mgr.open("s2")
    _save_turn(p, "s1", (1, 2, 3, 4))  # row 0, [1..4]
    _save_turn(p, "s2", (5, 6))  # row 1, [5, 6]
    assert p.mgr.session_held_tokens() == 6
    assert sorted(p.mgr.session_rows()) == [0, 1]
    p.mgr.restore_to_req("s1", "r1")
    assert p.mgr.session_held_tokens() == 2  # s1's KV is counted by r1 now
    held_by_r1 = 4
    assert p.alloc.available_size() + p.mgr.session_held_tokens() + held_by_r1 == TOKENS  # K1 holds
    assert p.mgr.session_rows() == [1]
    p.mgr.release("s1")
    assert p.mgr.session_held_tokens() == 6
    assert sorted(p.mgr.session_rows()) == [0, 1]


def test_fault_session_double_count_counts_active_slot_twice() -> None:
    p = _pools(cfg=RuntimeConfig(faults=frozenset({"session_double_count"})))
    p.mgr.open("s1")
    p.mgr.open("s2")
    _save_turn(p, "s1", (1, 2, 3, 4))
    _save_turn(p, "s2", (5, 6))
    p.mgr.restore_to_req("s1", "r1")
    assert p.mgr.session_held_tokens() == 6  # the bug: the lent 4 tokens still count as session-held
    held_by_r1 = 4
    assert p.alloc.available_size() + p.mgr.session_held_tokens() + held_by_r1 == TOKENS + 4  # K1 over-counts


def test_release_keeps_kv(p: Pools) -> None:
    p.mgr.open("s1")
    _save_turn(p, "s1", (1, 2, 3))
    before = _state(p)
    p.mgr.restore_to_req("s1", "r1")
    p.mgr.release("s1")
    slot = p.mgr.get("s1")
    assert (slot.is_active, slot.active_rid) == (False, None)
    assert (slot.row, slot.tokens, slot.kv_len, _l(slot.indices)) == (0, (1, 2, 3), 3, [1, 2, 3])
    assert _state(p) == before
    assert p.mgr.session_held_tokens() == 3
    p.mgr.restore_to_req("s1", "r2")  # the next turn can borrow it again
    assert p.mgr.get("s1").active_rid == "r2"


def test_save_after_restore_extends_and_ends_the_lend(p: Pools) -> None:
    p.mgr.open("s1")
    _save_turn(p, "s1", (1, 2, 3))  # row 0, [1, 2, 3]
    slot = p.mgr.restore_to_req("s1", "r1")
    extra = p.alloc.alloc(3)
    assert _l(extra) == [4, 5, 6]
    assert extra is not None
    p.mgr.save("s1", 0, (1, 2, 3, 4, 5), np.concatenate([slot.indices, extra]), 5, "a")
    assert (slot.is_active, slot.active_rid) == (False, None)
    assert (slot.row, slot.tokens, slot.kv_len, slot.alloc_len) == (0, (1, 2, 3, 4, 5), 5, 6)
    assert p.mgr.session_held_tokens() == 6
    assert p.mgr.close("s1") == 6
    assert p.alloc.available_size() == TOKENS
    assert p.rows.free_rows() == [0, 1, 2, 3]


# -- close ---------------------------------------------------------------------------------


def test_close_frees_exactly_what_it_held(p: Pools) -> None:
    p.mgr.open("s1")
    p.mgr.open("s2")
    _save_turn(p, "s1", (1, 2, 3, 4))  # row 0, [1..4]
    _save_turn(p, "s2", (5, 6))  # row 1, [5, 6]
    assert p.alloc.available_size() == TOKENS - 6
    assert p.rows.free_rows() == [2, 3]
    assert p.mgr.close("s1") == 4
    assert _l(p.alloc.free_indices()) == [1, 2, 3, 4, *range(7, 17)]
    assert p.rows.free_rows() == [0, 2, 3]
    assert sorted(p.mgr.slots) == ["s2"]
    with pytest.raises(RequestError, match="unknown session 's1'"):
        p.mgr.close("s1")  # closing twice is refused, nothing is freed twice
    assert p.mgr.close("s2") == 2
    assert p.alloc.available_size() == TOKENS
    assert p.rows.free_rows() == [0, 1, 2, 3]
    assert p.mgr.slots == {}


def test_close_empty_session_frees_nothing(p: Pools) -> None:
    p.mgr.open("s1")
    before_free, before_rows, _ = _state(p)
    assert p.mgr.close("s1") == 0
    assert _state(p) == (before_free, before_rows, [])


def test_close_with_pages(p: Pools) -> None:
    p = _pools(page_size=4)
    p.mgr.open("s1")
    row = p.rows.alloc()
    idx = p.alloc.alloc(8)
    assert row == 0 and _l(idx) == list(range(4, 12))
    p.mgr.save("s1", 0, (1, 2, 3, 4, 5), idx, 5, None)  # 5 tokens of KV in 2 whole pages
    assert p.mgr.session_held_tokens() == 8
    assert p.mgr.close("s1") == 8
    assert p.alloc.available_size() == TOKENS


def test_close_while_active_refused(p: Pools) -> None:
    p.mgr.open("s1")
    _save_turn(p, "s1", (1, 2))
    p.mgr.restore_to_req("s1", "r1")
    before = _state(p)
    with pytest.raises(RequestError, match="session 's1' has an active turn r1; abort it first"):
        p.mgr.close("s1")
    assert _state(p) == before
    slot = p.mgr.get("s1")
    assert (slot.is_active, slot.row, _l(slot.indices)) == (True, 0, [1, 2])
    p.mgr.release("s1")
    assert p.mgr.close("s1") == 2
    assert p.alloc.available_size() == TOKENS


# -- property ------------------------------------------------------------------------------

SIDS = ["s1", "s2", "s3"]


@dataclass(frozen=True)
class Open:
    sid: str


@dataclass(frozen=True)
class Begin:
    sid: str
    new_tokens: int


@dataclass(frozen=True)
class Finish:
    sid: str


@dataclass(frozen=True)
class AbortTurn:
    sid: str


@dataclass(frozen=True)
class Close:
    sid: str


SID = st.sampled_from(SIDS)
# turns are drawn more often than opens/closes so that sessions live through several turns
KINDS = [Open, Begin, Begin, Finish, Finish, Finish, AbortTurn, Close]


def _action(kind: type, sid: str, new_tokens: int) -> object:
    return kind(sid, new_tokens) if kind is Begin else kind(sid)


ACTIONS = st.lists(
    st.builds(_action, st.sampled_from(KINDS), SID, st.integers(1, 5)),
    min_size=10,
    max_size=60,
)


@dataclass
class Turn:
    """What the borrowing request holds of its own: a fresh row (first turn) and tail pages."""

    rid: str
    row: int | None
    extra: list[int]
    new_len: int


@dataclass
class ModelSlot:
    row: int | None = None
    tokens: tuple[int, ...] = ()
    indices: list[int] = field(default_factory=list)
    turn: Turn | None = None


class Harness:
    def __init__(self, page_size: int, cfg: RuntimeConfig) -> None:
        self.ps = page_size
        self.alloc = TokenAllocator(TOKENS, page_size=page_size)
        self.rows = ReqToTokenPool(ROWS, max_context_len=64)
        self.mgr = SessionManager(self.alloc, self.rows, max_sessions=2, cfg=cfg)
        self.model: dict[str, ModelSlot] = {}
        self.turns = 0

    def refused(self, call: object, *args: object) -> None:
        before = (_l(self.alloc.free_indices()), self.rows.free_rows(), sorted(self.mgr.slots))
        with pytest.raises(RequestError):
            call(*args)  # type: ignore[operator]
        assert (_l(self.alloc.free_indices()), self.rows.free_rows(), sorted(self.mgr.slots)) == before

    def apply(self, a: object) -> None:
        m = self.model.get(a.sid)  # type: ignore[attr-defined]
        if isinstance(a, Open):
            if m is not None or len(self.model) >= 2:
                self.refused(self.mgr.open, a.sid)
            else:
                self.mgr.open(a.sid)
                self.model[a.sid] = ModelSlot()
        elif m is None:
            if isinstance(a, Begin):
                self.refused(self.mgr.restore_to_req, a.sid, "rX")
            elif isinstance(a, Close):
                self.refused(self.mgr.close, a.sid)
            elif isinstance(a, AbortTurn):
                self.refused(self.mgr.release, a.sid)
        elif isinstance(a, Begin) and m.turn is None:
            self.begin(a.sid, m, a.new_tokens)
        elif isinstance(a, Begin) and m.turn is not None:
            self.refused(self.mgr.restore_to_req, a.sid, m.turn.rid + "-other")
        elif isinstance(a, Finish) and m.turn is not None:
            self.finish(a.sid, m, m.turn)
        elif isinstance(a, AbortTurn) and m.turn is not None:
            self.abort(a.sid, m, m.turn)
        elif isinstance(a, Close) and m.turn is not None:
            self.refused(self.mgr.close, a.sid)
        elif isinstance(a, Close):
            free_before = self.alloc.available_size()
            rows_before = self.rows.available_size()
            assert self.mgr.close(a.sid) == len(m.indices)
            assert self.alloc.available_size() == free_before + len(m.indices)
            assert self.rows.available_size() == rows_before + (m.row is not None)
            assert all(self.alloc.is_free(i) for i in m.indices)
            del self.model[a.sid]

    def begin(self, sid: str, m: ModelSlot, new_tokens: int) -> None:
        self.turns += 1
        rid = f"r{self.turns}"
        slot = self.mgr.restore_to_req(sid, rid)
        assert (slot.is_active, slot.active_rid) == (True, rid)
        assert (slot.row, slot.tokens, _l(slot.indices)) == (m.row, m.tokens, m.indices)
        row = None
        if m.row is None:
            row = self.rows.alloc()
            if row is None:
                self.mgr.release(sid)
                return
        new_len = len(m.tokens) + new_tokens
        more = -(-new_len // self.ps) * self.ps - len(m.indices)
        extra = self.alloc.alloc(more) if more > 0 else np.zeros(0, dtype=np.int64)
        if extra is None:  # no room for the turn: it is aborted before it starts
            self.mgr.release(sid)
            if row is not None:
                self.rows.free(row)
            return
        m.turn = Turn(rid, row, _l(extra), new_len)

    def finish(self, sid: str, m: ModelSlot, t: Turn) -> None:
        row = m.row if t.row is None else t.row
        assert row is not None
        tokens = m.tokens + tuple(range(len(m.tokens), t.new_len))
        indices = m.indices + t.extra
        self.mgr.save(sid, row, tokens, np.array(indices, dtype=np.int64), t.new_len, "a")
        m.row, m.tokens, m.indices, m.turn = row, tokens, indices, None

    def abort(self, sid: str, m: ModelSlot, t: Turn) -> None:
        self.mgr.release(sid)
        if t.extra:
            self.alloc.free(t.extra)
        if t.row is not None:
            self.rows.free(t.row)
        m.turn = None

    def check(self) -> None:
        assert sorted(self.mgr.slots) == sorted(self.model)
        for sid, m in self.model.items():
            slot = self.mgr.get(sid)
            assert (slot.row, slot.tokens, _l(slot.indices)) == (m.row, m.tokens, m.indices)
            assert slot.is_active == (m.turn is not None)
            assert slot.active_rid == (m.turn.rid if m.turn else None)
        inactive = [m for m in self.model.values() if m.turn is None]
        assert self.mgr.session_held_tokens() == sum(len(m.indices) for m in inactive)
        assert sorted(self.mgr.session_rows()) == sorted(m.row for m in inactive if m.row is not None)
        # tokens: free + session slots (lent or not) + the turns' own tails partition the pool
        session_idx = [i for m in self.model.values() for i in m.indices]
        turn_idx = [i for m in self.model.values() if m.turn for i in m.turn.extra]
        free = _l(self.alloc.free_indices())
        everything = free + session_idx + turn_idx
        assert sorted(everything) == list(range(self.ps, TOKENS + self.ps))
        # rows: free + slot rows + first-turn rows partition the row pool
        slot_rows = [m.row for m in self.model.values() if m.row is not None]
        turn_rows = [m.turn.row for m in self.model.values() if m.turn and m.turn.row is not None]
        assert sorted(self.rows.free_rows() + slot_rows + turn_rows) == list(range(ROWS))

    def drain(self) -> None:
        for sid, m in list(self.model.items()):
            if m.turn is not None:
                self.abort(sid, m, m.turn)
            self.apply(Close(sid))
        assert self.model == {} and self.mgr.slots == {}
        assert self.alloc.available_size() == TOKENS
        assert _l(self.alloc.free_indices()) == list(range(self.ps, TOKENS + self.ps))
        assert self.rows.available_size() == ROWS
        assert self.mgr.session_held_tokens() == 0


@settings(derandomize=True, max_examples=100, deadline=None)
@given(page_size=st.sampled_from([1, 2, 4]), actions=ACTIONS)
def test_random_sessions_return_every_token_and_row(page_size: int, actions: list[object]) -> None:
    h = Harness(page_size, RuntimeConfig())
    for action in [Open("s1"), Open("s2"), *actions]:
        h.apply(action)
        h.check()
    h.drain()
