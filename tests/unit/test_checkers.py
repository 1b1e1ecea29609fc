"""The KV-side checkers (kv K1–K4, req_to_token K5, prefix P1–P3, sessions S1–S2, requests
R1–R5) and checker composition.

Each test starts from a real engine in a busy state (see `checker_states.busy`: requests
mid-chunk and decoding, a locked and an unlocked prefix-cache node, an active and an
inactive session, a pinned, a resident and a loading adapter), asserts that every checker
is clean there, corrupts one thing, and asserts the exact violation: pool, invariant and
the concrete offenders. The LoRA-side checkers live in ``test_checkers_lora.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from checker_states import (
    PRE,
    Driver,
    brief,
    busy,
    dummy_config,
    idle,
    ints,
    req,
    session,
    with_node,
    with_req,
    with_session,
)

from lorainv.checkers import Checker, all_checkers, checker_names, register, run_checks, select
from lorainv.checkers.kv import KVChecker
from lorainv.checkers.prefix import PrefixChecker
from lorainv.checkers.req_to_token import ReqToTokenChecker
from lorainv.checkers.requests import RequestChecker
from lorainv.checkers.sessions import SessionChecker
from lorainv.errors import Violation
from lorainv.ops import Abort, AddRequest, CompleteTransfers, Step
from lorainv.snapshot import Snapshot


@pytest.fixture(scope="module")
def drv() -> Driver:
    return busy(page_size=2)


@pytest.fixture(scope="module")
def s(drv: Driver) -> Snapshot:
    return drv.snap()


@pytest.fixture(scope="module")
def idle_snap() -> Snapshot:
    return idle(page_size=2).snap()


@pytest.mark.parametrize("page_size", [1, 2, 4])
def test_busy_and_idle_states_are_clean(page_size: int) -> None:
    d = busy(page_size)
    assert run_checks(d.snap(), d.checkers()) == []
    d2 = idle(page_size)
    snap = d2.snap()
    assert snap.idle and snap.sessions and snap.prefix_nodes
    assert run_checks(snap, d2.checkers()) == []


def test_busy_state_has_every_kind_of_holding(s: Snapshot) -> None:
    """Guards the fixture: the corruptions below rely on this exact shape."""
    r1, u2, r3 = req(s, "r1"), req(s, "u2"), req(s, "r3")
    assert r1.cache_len == 12 and r1.cache_node is not None
    assert u2.session_alloc == 8 and session(s, "s_act").is_active and session(s, "s_act").active_rid == "u2"
    assert not session(s, "s_in").is_active and len(session(s, "s_in").indices) == 6
    assert r3.state == "prefilling" and r3.kv_len < r3.fill_len
    assert [n.lock_ref for n in s.prefix_nodes] == [1, 0]
    assert s.session_held == 6 and s.protected == 12 and s.evictable == 8


# -- kv: K1 / K2 ----------------------------------------------------------------------------------


def test_k1_accounting_identity(s: Snapshot) -> None:
    out = KVChecker().check(dataclasses.replace(s, available=s.available + 2))
    assert brief(out) == [("kv", "K1", (2,))]
    assert "!= total 256" in out[0].message and "session_held 6" in out[0].message


def test_k1_session_counted_twice(s: Snapshot) -> None:
    """The historic double count: the active slot's 8 tokens also counted as session-held."""
    out = KVChecker().check(dataclasses.replace(s, session_held=s.session_held + 8))
    assert brief(out) == [("kv", "K1", (8,))]


def test_k2_idle_requests_hold_tokens(idle_snap: Snapshot) -> None:
    assert KVChecker().check(idle_snap) == []
    bad = dataclasses.replace(idle_snap, held_by_requests=4, available=idle_snap.available - 4)
    out = KVChecker().check(bad)
    assert brief(out) == [("kv", "K2", ())]
    assert out[0].message == "idle but requests hold 4 tokens"


# -- kv: K3 exact membership ----------------------------------------------------------------------


def test_k3_aliased_and_leaked_name_the_indices_and_last_owner(s: Snapshot) -> None:
    """r2's last page is replaced by one of r1's pages: r1's page is owned twice and r2's
    old page is owned by nobody; the leak names who held it in the previous snapshot."""
    chk = KVChecker()
    assert chk.check(s) == []
    r1, r2 = req(s, "r1"), req(s, "r2")
    stolen = r1.indices[-2:]
    lost = ints(r2.indices[-2:])
    out = chk.check(with_req(s, "r2", indices=np.concatenate([r2.indices[:-2], stolen])))
    assert brief(out) == [("kv", "K3", ints(stolen)), ("kv", "K3", lost)]
    assert out[0].message == "token indices owned twice, by request r1, request r2"
    assert out[1].message == "leaked token indices: owned by nobody last owned by request r2"


def test_k3_leak_from_free_list_and_from_session(s: Snapshot) -> None:
    chk = KVChecker()
    assert chk.check(s) == []
    first_free = ints(s.free_indices[:2])
    out = chk.check(dataclasses.replace(s, free_indices=s.free_indices[2:]))
    assert brief(out) == [("kv", "K3", first_free)]
    assert out[0].message.endswith("last owned by free")

    chk = KVChecker()
    chk.check(s)
    s_in = session(s, "s_in")
    out = chk.check(with_session(s, "s_in", indices=s_in.indices[:-2]))
    assert brief(out) == [("kv", "K3", ints(s_in.indices[-2:]))]
    assert out[0].message.endswith("last owned by session s_in")


def test_k3_leak_without_history_names_only_the_indices(s: Snapshot) -> None:
    out = KVChecker().check(dataclasses.replace(s, free_indices=s.free_indices[2:]))
    assert brief(out) == [("kv", "K3", ints(s.free_indices[:2]))]
    assert out[0].message == "leaked token indices: owned by nobody"


def test_k3_padding_and_out_of_pool_indices(s: Snapshot) -> None:
    beyond = s.total_tokens + s.page_size  # first index past the last usable page
    out = KVChecker().check(dataclasses.replace(s, free_indices=np.concatenate([[1], s.free_indices, [beyond]])))
    assert brief(out) == [("kv", "K3", (1, beyond))]
    assert out[0].message == "free holds padding/out-of-pool indices"


def test_k3_lent_session_tokens_are_claimed_once(s: Snapshot) -> None:
    """The active slot's indices are u2's; counting the slot as an owner too would alias them."""
    s_act = session(s, "s_act")
    out = KVChecker().check(with_session(s, "s_act", is_active=False, active_rid=None))
    assert brief(out) == [("kv", "K3", ints(s_act.indices))]
    assert out[0].message == "token indices owned twice, by request u2, session s_act"


def test_k3_prefix_node_shares_an_index_with_a_request(s: Snapshot) -> None:
    r2 = req(s, "r2")
    node = s.prefix_nodes[1]  # unlocked node of rb0
    idx = np.concatenate([node.indices[:-2], r2.indices[:2]])
    out = KVChecker().check(with_node(s, node.id, indices=idx))
    assert brief(out) == [("kv", "K3", ints(r2.indices[:2])), ("kv", "K3", ints(node.indices[-2:]))]
    assert out[0].message == f"token indices owned twice, by prefix node {node.id}, request r2"


# -- kv: K4 per-request lengths -----------------------------------------------------------------


def test_k4_committed_beyond_allocated(s: Snapshot) -> None:
    out = KVChecker().check(with_req(s, "r3", kv_len=18))
    assert brief(out) == [("kv", "K4", ("r3",))]
    assert out[0].message == "request r3: protected 0 <= committed 18 <= allocated 8 broken"


def test_k4_protected_beyond_committed_and_over_allocation(s: Snapshot) -> None:
    out = KVChecker().check(with_req(s, "r1", kv_len=10))
    assert brief(out) == [("kv", "K4", ("r1",)), ("kv", "K4", ("r1",))]
    assert "protected 12 <= committed 10 <= allocated 16" in out[0].message
    assert out[1].message == "request r1 over-allocated: 16 allocated for 10"


def test_k4_decoding_request_over_allocated(s: Snapshot) -> None:
    out = KVChecker().check(with_req(s, "r2", kv_len=2))
    assert brief(out) == [("kv", "K4", ("r2",))]
    assert out[0].message == "request r2 over-allocated: 4 allocated for 2"


def test_k4_not_whole_pages(s: Snapshot) -> None:
    """r3 takes one more free index (no membership change): 9 indices is not whole pages."""
    r3 = req(s, "r3")
    extra = s.free_indices[:1]
    bad = with_req(s, "r3", indices=np.concatenate([r3.indices, extra]))
    bad = dataclasses.replace(bad, free_indices=s.free_indices[1:])
    out = KVChecker().check(bad)
    assert brief(out) == [("kv", "K4", ("r3",))]
    assert out[0].message == "request r3 holds 9 tokens, not whole pages"


def test_k4_waiting_and_ended_requests_hold_nothing(s: Snapshot) -> None:
    out = KVChecker().check(with_req(s, "r4", row=7))
    assert brief(out) == [("kv", "K4", ("r4",))]
    assert out[0].message == "request r4 is waiting but holds 0 tokens / row 7"
    out = KVChecker().check(with_req(s, "r0", indices=s.free_indices[:2]))
    assert brief(out) == [("kv", "K4", ("r0",))]
    assert out[0].message == "request r0 is finished but holds 2 tokens / row None"


# -- req_to_token: K5 ---------------------------------------------------------------------------


def test_k5_row_with_two_requests(s: Snapshot) -> None:
    r1_row, r2_row = req(s, "r1").row, req(s, "r2").row
    out = ReqToTokenChecker().check(with_req(s, "r2", row=r1_row))
    assert brief(out) == [("req_to_token", "K5", (r1_row,)), ("req_to_token", "K5", (r2_row,))]
    assert out[0].message == f"rows with two owners (row {r1_row}: request r1, request r2)"
    assert out[1].message == "leaked req_to_token rows: owned by nobody"


def test_k5_row_both_free_and_owned(s: Snapshot) -> None:
    row = req(s, "r3").row
    out = ReqToTokenChecker().check(dataclasses.replace(s, free_rows=(row, *s.free_rows)))
    assert brief(out) == [("req_to_token", "K5", (row,))]
    assert out[0].message == f"rows with two owners (row {row}: request r3, free)"


def test_k5_request_on_an_inactive_session_row(s: Snapshot) -> None:
    row = session(s, "s_in").row
    out = ReqToTokenChecker().check(with_req(s, "r4", row=row))
    assert brief(out) == [("req_to_token", "K5", (row,))]
    assert out[0].message == f"rows with two owners (row {row}: request r4, session s_in)"


def test_k5_leaked_row(s: Snapshot) -> None:
    out = ReqToTokenChecker().check(dataclasses.replace(s, free_rows=s.free_rows[1:]))
    assert brief(out) == [("req_to_token", "K5", (s.free_rows[0],))]


def test_k5_active_session_row_lent_twice(s: Snapshot) -> None:
    row = session(s, "s_act").row
    out = ReqToTokenChecker().check(with_req(s, "r4", session_id="s_act", row=row))
    assert brief(out) == [("req_to_token", "K5", (row,)), ("req_to_token", "K5", ("u2", "r4"))]
    assert out[0].message == f"rows with two owners (row {row}: request u2, request r4)"
    assert out[1].message == "session s_act row lent twice"


def test_k5_row_points_elsewhere(s: Snapshot) -> None:
    r2 = req(s, "r2")
    entries = r2.row_entries.copy()
    entries[1] = 999
    out = ReqToTokenChecker().check(with_req(s, "r2", row_entries=entries))
    assert brief(out) == [("req_to_token", "K5", (1,))]
    assert out[0].message == f"row {r2.row} of request r2 does not point at the request's token indices"
    out = ReqToTokenChecker().check(with_req(s, "r2", row_entries=entries[:2]))
    assert brief(out) == [("req_to_token", "K5", ())]


def test_k2_idle_rows(s: Snapshot, idle_snap: Snapshot) -> None:
    assert ReqToTokenChecker().check(idle_snap) == []
    out = ReqToTokenChecker().check(dataclasses.replace(s, idle=True))
    assert brief(out) == [("req_to_token", "K2", ())]
    assert out[0].message == f"idle: free_rows {len(s.free_rows)} + session_rows 2 != {s.rows_total}"


# -- prefix: P1 / P2 / P3 -----------------------------------------------------------------------


def test_p1_sizes_match_the_tree(s: Snapshot) -> None:
    out = PrefixChecker().check(dataclasses.replace(s, evictable=s.evictable + 2))
    assert brief(out) == [("prefix", "P1", ())]
    assert out[0].message == "evictable 10 + protected 12 != tree tokens 20"
    out = PrefixChecker().check(dataclasses.replace(s, evictable=s.evictable + 12, protected=0))
    assert brief(out) == [("prefix", "P1", ())]
    assert out[0].message == "protected 0 != locked node tokens 12"


def test_p2_nodes_are_page_aligned(s: Snapshot) -> None:
    node = s.prefix_nodes[1]
    bad = with_node(s, node.id, indices=node.indices[:-1], key=node.key[:-1])
    out = PrefixChecker().check(dataclasses.replace(bad, evictable=s.evictable - 1))
    assert brief(out) == [("prefix", "P2", (node.id,))]
    # a key that no longer covers the node's indices
    out = PrefixChecker().check(with_node(s, node.id, key=node.key[:-1]))
    assert brief(out) == [("prefix", "P2", (node.id,))]


def test_p4_borrowed_kv_is_for_the_requests_own_tokens(s: Snapshot) -> None:
    """r1 borrows the 12-token prefix PRE cached by r0 (same adapter); its node keys are PRE."""
    locked = s.prefix_nodes[0]
    r1 = next(r for r in s.requests if r.rid == "r1")
    assert r1.cache_node == locked.id and r1.cache_len == 12 and locked.key == PRE
    assert PrefixChecker().check(s) == []
    other = (PRE[0] + 1, *PRE[1:])  # the cached KV was computed for another first token
    out = PrefixChecker().check(with_node(s, locked.id, key=other))
    assert brief(out) == [("prefix", "P4", ("r1",))]
    out = PrefixChecker().check(with_node(s, locked.id, namespace="b"))
    assert brief(out) == [("prefix", "P4", ("r1",))]
    assert out[0].message == "request r1 on 'a' borrows KV cached under 'b'"


def test_p3_lock_refs_match_borrowers(s: Snapshot) -> None:
    locked = s.prefix_nodes[0]
    out = PrefixChecker().check(with_node(s, locked.id, lock_ref=2))
    assert brief(out) == [("prefix", "P3", (locked.id,))]
    assert out[0].message.endswith(f"(node {locked.id}: lock_ref 2, live borrowers 1)")
    # the borrower gone (e.g. an abort that forgot dec_lock_ref) leaves the lock dangling
    out = PrefixChecker().check(with_req(s, "r1", state="aborted"))
    assert brief(out) == [("prefix", "P3", (locked.id,))]


def test_p3_request_locks_a_missing_node(s: Snapshot) -> None:
    locked = s.prefix_nodes[0]
    out = PrefixChecker().check(with_req(s, "r1", cache_node=999))
    assert brief(out) == [("prefix", "P3", (999,)), ("prefix", "P3", ("r1",)), ("prefix", "P3", (locked.id,))]
    assert out[0].message == "request r1 locks a node not in the tree"


def test_p3_protected_prefix_is_the_node_path(s: Snapshot) -> None:
    r1 = req(s, "r1")
    idx = r1.indices.copy()
    idx[[0, -1]] = idx[[-1, 0]]  # same set of indices, different order
    out = PrefixChecker().check(with_req(s, "r1", indices=idx))
    assert brief(out) == [("prefix", "P3", ("r1",))]
    assert out[0].message == "request r1's protected prefix is not its node path"


# -- sessions: S1 / S2 --------------------------------------------------------------------------


def test_s1_slot_lengths(s: Snapshot) -> None:
    s_in = session(s, "s_in")
    out = SessionChecker().check(with_session(s, "s_in", kv_len=8))
    assert brief(out) == [("sessions", "S1", ())]
    assert out[0].message == "session s_in: kv_len 8 / 6 allocated"
    out = SessionChecker().check(with_session(s, "s_in", indices=s_in.indices[:5], kv_len=5))
    assert [v.message for v in out] == ["session s_in: kv_len 5 / 5 allocated"]
    out = SessionChecker().check(with_session(s, "s_in", row=None))
    assert [v.message for v in out] == ["session s_in: row None with 6 tokens"]
    out = SessionChecker().check(with_session(s, "s_in", indices=s_in.indices[:0], kv_len=0))
    assert [v.message for v in out] == [f"session s_in: row {s_in.row} with 0 tokens"]


def test_s2_inactive_slot_names_a_borrower(s: Snapshot) -> None:
    out = SessionChecker().check(with_session(s, "s_in", active_rid="r2"))
    assert brief(out) == [("sessions", "S2", ())]
    assert out[0].message == "inactive session s_in names a borrower"


def test_s2_lent_to_a_request_that_is_not_a_live_turn(s: Snapshot) -> None:
    out = SessionChecker().check(with_session(s, "s_act", active_rid="u1"))  # u1: the finished turn 1
    assert brief(out) == [("sessions", "S2", ("u1",)), ("sessions", "S2", ("u2",))]
    assert out[0].message == "session s_act is lent to u1, which is not a live turn of it"
    assert out[1].message == "u2 holds session KV without an active lend"
    out = SessionChecker().check(with_session(s, "s_act", active_rid="r2"))  # live, another session
    assert brief(out)[0] == ("sessions", "S2", ("r2",))


def test_s2_lent_to_a_waiting_turn(s: Snapshot) -> None:
    out = SessionChecker().check(with_req(s, "u2", state="waiting"))
    assert brief(out) == [("sessions", "S2", ("u2",))]
    assert out[0].message == "session s_act lent to waiting u2"


def test_s2_turn_must_hold_the_session_kv(s: Snapshot) -> None:
    u2 = req(s, "u2")
    idx = u2.indices.copy()
    idx[0] = 999
    out = SessionChecker().check(with_req(s, "u2", indices=idx))
    assert brief(out) == [("sessions", "S2", ("u2",))]
    assert out[0].message == "turn u2 does not hold session s_act's KV"
    out = SessionChecker().check(with_req(s, "u2", session_alloc=6))
    assert brief(out) == [("sessions", "S2", ("u2",))]


def test_s2_session_kv_without_a_lend(s: Snapshot) -> None:
    out = SessionChecker().check(with_session(s, "s_act", is_active=False, active_rid=None))
    assert brief(out) == [("sessions", "S2", ("u2",))]
    assert out[0].message == "u2 holds session KV without an active lend"


# -- requests: R1–R5 ----------------------------------------------------------------------------


def test_r1_exactly_the_prefilling_request_is_staged(s: Snapshot) -> None:
    out = RequestChecker().check(dataclasses.replace(s, staged=None))
    assert brief(out) == [("requests", "R1", ("r3",))]
    assert out[0].message == "staged None vs prefilling ['r3']"
    out = RequestChecker().check(with_req(s, "r2", state="prefilling"))
    assert brief(out) == [("requests", "R1", ("r2", "r3"))]
    out = RequestChecker().check(dataclasses.replace(s, staged="r4"))
    assert brief(out) == [("requests", "R1", ("r3",))]
    out = RequestChecker().check(with_req(s, "r3", state="waiting"))
    assert brief(out) == [("requests", "R1", ())]
    assert out[0].message == "staged r3 vs prefilling []"


def test_r1_unknown_state(s: Snapshot) -> None:
    out = RequestChecker().check(with_req(s, "r0", state="zombie"))
    assert brief(out) == [("requests", "R1", ("r0",))]
    assert out[0].message == "r0 in unknown state 'zombie'"


def test_r2_output_within_budget(s: Snapshot) -> None:
    out = RequestChecker().check(with_req(s, "r0", output_len=3))
    assert brief(out) == [("requests", "R2", ("r0",))]
    assert out[0].message == "r0 produced 3 > 2"


def test_r3_ended_requests_hold_nothing(s: Snapshot) -> None:
    for changes in ({"row": 5}, {"indices": np.array([60, 61])}, {"cache_node": 3}):
        out = RequestChecker().check(with_req(s, "r0", **changes))
        assert brief(out) == [("requests", "R3", ("r0",))], changes
        assert out[0].message == "r0 is finished but still holds memory"


def test_r4_decoding_kv_is_fill_minus_one(s: Snapshot) -> None:
    out = RequestChecker().check(with_req(s, "r2", kv_len=3))
    assert brief(out) == [("requests", "R4", ("r2",))]
    assert out[0].message == "r2 decoding with kv 3, fill 5"


def test_r5_idle_with_live_requests(s: Snapshot, idle_snap: Snapshot) -> None:
    assert RequestChecker().check(idle_snap) == []
    out = RequestChecker().check(dataclasses.replace(s, idle=True))
    assert brief(out) == [("requests", "R5", ("r1", "u2", "r2", "r4", "r3"))]


# -- leaks caught on a live engine --------------------------------------------------------------


def test_leak_from_a_live_engine_names_the_last_owner() -> None:
    """The allocator loses r0's pages behind the engine's back (a test-only corruption of the
    live allocator): the next snapshot names them, and who held them in the previous one."""
    d = Driver(dummy_config(page_size=2), check=False)
    d.run([AddRequest("r0", (1, 2, 3, 4, 5), None, 4), CompleteTransfers(None), Step()])
    chk = KVChecker()
    assert chk.check(d.snap()) == []
    e = d.engine
    r0 = e.requests["r0"]
    lost = ints(r0.indices)
    r0.indices = r0.indices[:0]  # the request forgets its tokens without freeing them
    r0.kv_len = 0
    out = [v for v in chk.check(d.snap()) if v.invariant == "K3"]
    assert brief(out) == [("kv", "K3", lost)]
    assert out[0].message == "leaked token indices: owned by nobody last owned by request r0"


def test_double_free_from_a_live_engine_is_aliasing() -> None:
    """An index handed to a second request while the first still holds it."""
    d = Driver(dummy_config(page_size=1), check=False)
    d.run([AddRequest("r0", (1, 2, 3), None, 4), AddRequest("r1", (4, 5, 6), None, 4), Step()])
    e = d.engine
    a, b = e.requests["r0"], e.requests["r1"]
    b.indices = b.indices.copy()
    b.indices[0] = a.indices[0]
    e.rows.write(b.row, 0, b.indices)
    out = KVChecker().check(d.snap())
    assert ("kv", "K3", (int(a.indices[0]),)) in brief(out)
    assert any("owned twice, by request r0, request r1" in v.message for v in out)


def test_aborting_every_kind_of_request_leaves_all_checkers_clean() -> None:
    d = busy(page_size=2)
    for rid in ("r3", "u2", "r1", "r4", "r2"):
        d.do(Abort(rid))  # Driver.do runs every checker and the refinement check after each op
    d.settle()
    snap = d.snap()
    assert snap.idle and snap.available + snap.evictable + snap.session_held == snap.total_tokens


# -- composition --------------------------------------------------------------------------------

KNOWN = {"drainer", "kv", "lora", "overlap", "pinned", "prefix", "req_to_token", "requests", "sessions"}


def test_all_checkers_builds_fresh_instances_of_every_registered_checker() -> None:
    a, b = all_checkers(), all_checkers()
    assert {c.name for c in a} == KNOWN == set(checker_names())
    assert all(isinstance(c, Checker) for c in a)
    assert all(x is not y for x, y in zip(a, b))


def test_select_by_name_and_unknown_names(s: Snapshot) -> None:
    kv, lora = select("kv", "lora")
    assert (type(kv).__name__, kv.name, type(lora).__name__, lora.name) == ("KVChecker", "kv", "LoraChecker", "lora")
    assert select() == []
    with pytest.raises(KeyError) as info:
        select("kv", "nope", "also_nope")
    msg = str(info.value)
    assert "['nope', 'also_nope']" in msg and "'req_to_token'" in msg
    bad = dataclasses.replace(s, available=s.available + 2)
    assert [v.pool for v in run_checks(bad, select("kv", "lora"))] == ["kv"]
    assert [v.pool for v in run_checks(bad, select("lora"))] == []


class _Quota:
    """A user-defined checker: no inheritance, just ``name`` and ``check``."""

    name = "quota"

    def __init__(self, max_live: int) -> None:
        self.max_live = max_live
        self.seen: list[int] = []

    def check(self, snap: Snapshot) -> list[Violation]:
        self.seen.append(snap.step)
        live = [r.rid for r in snap.live()]
        if len(live) > self.max_live:
            return [Violation("quota", "Q1", f"{len(live)} live > {self.max_live}", tuple(live))]
        return []


def test_user_checker_composes_with_the_builtin_ones(s: Snapshot) -> None:
    mine = _Quota(max_live=3)
    assert isinstance(mine, Checker)
    checkers = all_checkers(extra=[mine])
    assert checkers[-1] is mine and len(checkers) == len(KNOWN) + 1
    out = run_checks(s, checkers)
    assert brief(out) == [("quota", "Q1", ("r1", "u2", "r2", "r4", "r3"))]
    assert mine.seen == [s.step]
    out = run_checks(dataclasses.replace(s, available=s.available + 2), checkers)
    assert [(v.pool, v.invariant) for v in out] == [("kv", "K1"), ("quota", "Q1")]


def test_run_checks_defaults_to_every_checker(s: Snapshot) -> None:
    assert run_checks(s) == []
    bad = with_req(dataclasses.replace(s, available=s.available + 2), "r2", kv_len=2)
    got = {(v.pool, v.invariant) for v in run_checks(bad)}
    assert {("kv", "K1"), ("kv", "K4"), ("requests", "R4")} <= got


def test_register_makes_a_checker_selectable_inside_a_scope(s: Snapshot) -> None:
    from lorainv.extensions import using

    @register("always_one")
    class AlwaysOne:
        def check(self, snap: Snapshot) -> list[Any]:
            return [Violation("test", "T1", "always", (snap.step,))]

    assert AlwaysOne.name == "always_one"  # type: ignore[attr-defined]
    assert "always_one" not in checker_names()  # declared only: in force nowhere yet
    with using(AlwaysOne):
        assert "always_one" in checker_names()
        (c,) = select("always_one")
        assert brief(c.check(s)) == [("test", "T1", (s.step,))]
        assert brief(run_checks(s)) == [("test", "T1", (s.step,))]
    assert "always_one" not in checker_names()
    assert run_checks(s) == []
