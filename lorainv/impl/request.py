"""A request's runtime state and what it holds.

Ownership of ``indices`` (the request's ``req_to_token`` row, positions ``0..alloc_len``):
``indices[:cache_len]`` belong to the prefix cache (locked through ``cache_node``);
``indices[cache_len:]`` are the request's — including a lent session's tokens while the
session slot is active. ``cache_len <= kv_len <= alloc_len`` (K4).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_NONE = np.zeros(0, dtype=np.int64)


class ReqState(str, enum.Enum):
    WAITING = "waiting"  # queued (new or retracted); holds nothing
    PREFILLING = "prefilling"  # some chunks done, more to come; holds its row and KV
    DECODING = "decoding"  # prefill complete; one token per decode round
    FINISHED = "finished"
    ABORTED = "aborted"

    @property
    def live(self) -> bool:
        return self in LIVE_STATES


# the live states (a tuple: `in` finds a member by identity, with no Python-level hash or compare)
LIVE_STATES = (ReqState.WAITING, ReqState.PREFILLING, ReqState.DECODING)


@dataclass(eq=False)
class Request:
    rid: str
    prompt: tuple[int, ...]
    adapter: str | None
    max_new_tokens: int
    session_id: str | None
    arrival: float
    seq: int  # admission order, for FCFS
    state: ReqState = ReqState.WAITING
    output: list[int] = field(default_factory=list)
    history: tuple[int, ...] = ()  # session tokens before this turn (fixed when first scheduled)
    row: int | None = None
    indices: np.ndarray = field(default_factory=lambda: _NONE)
    kv_len: int = 0
    cache_len: int = 0
    cache_node: Any = None
    session_lent: bool = False
    session_alloc: int = 0  # how many leading indices are the session's (valid while lent)
    own_row: bool = False  # the row was allocated for this request (not a session's)
    retractions: int = 0
    drain_retractions: int = 0  # retractions the drainer asked for (bounded per request)
    queued_at: float = 0.0  # when it last entered the waiting queue (arrival or retraction)
    admitted_output: int = 0  # len(output) when last admitted; > means it progressed since
    admitted_at: float = 0.0  # when it was last admitted (the drain quantum counts from here)
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None
    finish_detail: str = ""

    @property
    def fill(self) -> tuple[int, ...]:
        """Every token whose KV must exist before the next output: history + prompt + output."""
        return self.history + self.prompt + tuple(self.output)

    @property
    def alloc_len(self) -> int:
        return len(self.indices)

    @property
    def held_tokens(self) -> int:
        """Tokens this request accounts for (K1 ``held_by_requests``)."""
        return len(self.indices) - self.cache_len

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.output)

    def reset_memory(self) -> None:
        self.row = None
        self.indices = _NONE
        self.kv_len = 0
        self.cache_len = 0
        self.cache_node = None
        self.session_lent = False
        self.session_alloc = 0
        self.own_row = False
