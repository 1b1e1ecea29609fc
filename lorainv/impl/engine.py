"""The engine: owns every runtime part, applies ops, runs forwards, reports events.

Data flows one way: ``apply(op)`` (or the user API built on it) → events; ``snapshot()``
→ checkers. A call that raises a `LorainvError` leaves every pool exactly as it was:
each op validates before it mutates anything.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

import torch

from lorainv.config import RuntimeConfig
from lorainv.errors import (
    AdapterError,
    AdapterNotFoundError,
    DuplicateAdapterError,
    InvariantViolation,
    LorainvError,
    RequestError,
    Violation,
)
from lorainv.events import (
    Aborted,
    AdapterRegistered,
    AdapterUnregistered,
    BatchFormed,
    CacheEvicted,
    ClockAdvanced,
    Decoded,
    Event,
    Finished,
    Idle,
    LoadCompleted,
    Pinned,
    Queued,
    Rejected,
    Scheduled,
    SessionClosed,
    SessionOpened,
    TransfersCompleted,
    Unpinned,
)
from lorainv.impl import faults
from lorainv.impl.adapters import LoraAdapter, load_peft_adapter, parse_gen_source
from lorainv.impl.batch import ForwardBatch, LoraBatchInfo, build_lora_batch_info
from lorainv.impl.clock import Clock, SimClock
from lorainv.impl.device import make_device
from lorainv.impl.drainer import Drainer
from lorainv.impl.kv_pool import ReqToTokenPool, TokenAllocator
from lorainv.impl.overlap_loader import OverlapLoader
from lorainv.impl.prefix_cache import PrefixCache
from lorainv.impl.request import LIVE_STATES, ReqState, Request
from lorainv.impl.scheduler import Scheduler
from lorainv.impl.sessions import SessionManager
from lorainv.impl.tp_pools import make_lora_pool
from lorainv.ops import (
    Abort,
    AddRequest,
    AdvanceClock,
    CloseSession,
    CompleteTransfers,
    FailTransfers,
    LoadAdapter,
    Op,
    OpenSession,
    PinAdapter,
    Step,
    UnloadAdapter,
    UnpinAdapter,
)


def make_network(model: Any, cfg: RuntimeConfig) -> Any:
    """``None`` → ``cfg.network``; ``"tiny"``/``"dummy"``; a HF checkpoint dir; or a network object."""
    dtype = cfg.torch_dtype
    if model is None:
        model = cfg.network
    if isinstance(model, (str, os.PathLike)):
        if str(model) == "dummy":  # the fast network: integer fingerprints through the paged KV cache
            from lorainv.impl.fingerprint_net import FingerprintNetwork

            return FingerprintNetwork(dtype)
        from lorainv.impl.llama import LlamaNetwork

        if str(model) == "tiny":
            return LlamaNetwork.tiny(seed=cfg.seed, dtype=dtype)
        return LlamaNetwork.from_pretrained(Path(model), dtype=dtype)
    return model


def _prompt_ids(prompt_ids: Any, what: str) -> tuple[int, ...]:
    """``prompt_ids`` as a tuple of ints; anything else is a `RequestError` (nothing mutated)."""
    if isinstance(prompt_ids, (str, bytes, bytearray, memoryview, Mapping, AbstractSet)):
        # iterable, but not an ordered sequence of token ids (bytes would silently become ids)
        raise RequestError(f"{what} must be a list or tuple of ints, got {type(prompt_ids).__name__}")
    try:
        ids = tuple(prompt_ids)
    except TypeError:
        raise RequestError(f"{what} must be a sequence of ints, got {type(prompt_ids).__name__}") from None
    if any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
        raise RequestError(f"{what} must contain only ints")
    return ids


class Engine:
    """A compact multi-LoRA serving engine; see docs/design.md §3 for the data flow."""

    def __init__(
        self,
        config: RuntimeConfig | None = None,
        model: Any = None,
        *,
        clock: Clock | None = None,
        device: Any = None,
    ) -> None:
        cfg = config if config is not None else RuntimeConfig()
        self.cfg = cfg
        self.clock: Any = clock if clock is not None else SimClock()
        self.device = device if device is not None else make_device(cfg.device, cfg.transfer_latency_steps)
        self.network = make_network(model, cfg)
        self.dims = self.network.dims
        self.dtype = cfg.torch_dtype
        self.allocator = TokenAllocator(cfg.max_total_tokens, cfg.page_size)
        self.rows = ReqToTokenPool(
            cfg.max_running_requests + cfg.max_sessions, self.network.max_context_len, self.device.torch_device
        )
        self.kv = self._make_kv_cache()
        self.cache = PrefixCache(self.allocator, cfg.page_size, cfg.enable_prefix_cache)
        self.sessions = SessionManager(self.allocator, self.rows, cfg.max_sessions, cfg)
        self.pool = make_lora_pool(cfg, self.dims, self.device, self.dtype)
        self.loader = (
            OverlapLoader(self.pool, self.device, cfg, step_counter=lambda: self.steps)
            if cfg.enable_lora_overlap_loading
            else None
        )
        self.drainer = Drainer(cfg, self.clock)
        self.registry: dict[str, LoraAdapter] = {}
        self.backend = self._make_backend()
        self.scheduler = Scheduler(
            cfg,
            self.allocator,
            self.rows,
            self.cache,
            self.sessions,
            self.pool,
            self.loader,
            self.drainer,
            self.registry,
            self.device,
            self.clock,
        )
        self.requests: dict[str, Request] = {}  # live ones and the retained ended ones
        self._used_rids: set[str] = set()  # every id ever queued (ids are never reused)
        self._ended: deque[str] = deque()  # retained ended requests, oldest first
        self.last_batch: tuple[Any, ...] = ()
        self.last_batch_slots: tuple[int, ...] = ()
        self.last_batch_lens: tuple[int, ...] = ()  # new tokens per request of the last batch
        self.last_batch_info: LoraBatchInfo | None = None  # its segment metadata
        self.steps = 0
        self._seq = 0
        self.history: deque[tuple[int, list[Event]]] = deque(maxlen=cfg.history_steps)
        # The snapshot `check` last found clean, reset to None when an op starts: after `apply`
        # returns it is either None or the snapshot the strict hook checked at the end of that
        # op (every default checker passed), so a caller reading it right then (the harness)
        # need not take and check a second, identical one.
        self.last_checked_snapshot: Any = None
        self._checkers: tuple[int, list[Any]] | None = None  # (checker generation, instances): see check()
        # user faults (lorainv.extensions.Fault) named in cfg.faults patch this engine now
        faults.install_user_faults(self)

    def _make_kv_cache(self) -> Any:
        net = self.network
        if hasattr(net, "make_kv_cache"):
            return net.make_kv_cache(self.allocator.buffer_len, self.device.torch_device)
        from lorainv.impl.llama import KVCache

        return KVCache.allocate(net.config, self.allocator.buffer_len, self.dtype, self.device.torch_device)

    def _make_backend(self) -> Any:
        from lorainv.impl.backends import get_backend

        return get_backend(self.cfg.lora_backend)

    # -- user API ---------------------------------------------------------------------------
    def add_request(
        self,
        prompt_ids: Sequence[int],
        adapter: str | None = None,
        max_new_tokens: int = 16,
        session_id: str | None = None,
        *,
        rid: str | None = None,
    ) -> str:
        """Queue a request; returns its id. Bad input → `RequestError`, state unchanged."""
        if rid is None:
            rid = f"r{self._seq}"
        self._do(AddRequest(rid, _prompt_ids(prompt_ids, "prompt_ids"), adapter, max_new_tokens, session_id))
        return rid

    def abort(self, rid: str) -> list[Event]:
        return self._do(Abort(rid))

    def step(self) -> list[Event]:
        return self._do(Step())

    def load_adapter(self, name: str, path: str | os.PathLike[str], pinned: bool = False) -> list[Event]:
        if not isinstance(path, (str, os.PathLike)):
            raise AdapterError(f"adapter path must be a str or os.PathLike (or 'gen:<rank>:<seed>'), got {path!r}")
        return self._do(LoadAdapter(name, os.fspath(path), pinned))

    def unload_adapter(self, name: str) -> list[Event]:
        return self._do(UnloadAdapter(name))

    def pin_adapter(self, name: str) -> list[Event]:
        return self._do(PinAdapter(name))

    def unpin_adapter(self, name: str) -> list[Event]:
        return self._do(UnpinAdapter(name))

    def open_session(self, session_id: str) -> list[Event]:
        return self._do(OpenSession(session_id))

    def close_session(self, session_id: str) -> list[Event]:
        return self._do(CloseSession(session_id))

    def complete_transfers(self, n: int | None = None) -> list[Event]:
        return self._do(CompleteTransfers(n))

    def output(self, rid: str) -> list[int]:
        return list(self._req(rid).output)

    def status(self, rid: str) -> str:
        return self._req(rid).state.value

    def request_stats(self, rid: str) -> dict[str, Any]:
        """Clock-time latencies: ttft (first token) and e2e (end), from arrival."""
        r = self._req(rid)
        return {
            "state": r.state.value,
            "reason": r.finish_reason,
            "detail": r.finish_detail,
            "ttft": None if r.first_token_time is None else r.first_token_time - r.arrival,
            "e2e": None if r.finish_time is None else r.finish_time - r.arrival,
            "retractions": r.retractions,
            "output_len": len(r.output),
        }

    def is_idle(self) -> bool:
        """No request waits, runs or is staged and no load is in flight. Pure (no reaping):
        every op reaps completed loads before it returns."""
        s = self.scheduler
        return not (s.waiting or s.running or s.staged) and not (self.loader and self.loader.in_flight())

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        adapters: Sequence[str | None] | None = None,
        max_new_tokens: int = 16,
        max_steps: int | None = None,
    ) -> list[list[int]]:
        """Run ``prompts`` (with per-prompt adapters) to completion; returns their outputs."""
        if not isinstance(prompts, (list, tuple)):
            raise RequestError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
        if adapters is not None and not isinstance(adapters, (list, tuple)):
            raise RequestError(f"adapters must be a list (one name or None per prompt), got {type(adapters).__name__}")
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
            raise RequestError(f"max_steps must be None or an int >= 1, got {max_steps!r}")
        adapters = list(adapters) if adapters is not None else [None] * len(prompts)
        if len(adapters) != len(prompts):
            raise RequestError(f"{len(prompts)} prompts but {len(adapters)} adapters")
        limit = self.cfg.max_finished_requests
        if 0 < limit < len(prompts):
            raise RequestError(
                f"{len(prompts)} prompts but max_finished_requests={limit}: outputs would be retired unread"
            )
        # all-or-nothing: validate every prompt (with the ids it would get) before queueing any
        checked = [_prompt_ids(p, f"prompt {i}") for i, p in enumerate(prompts)]
        for i, (prompt, a) in enumerate(zip(checked, adapters)):
            self._check_add(AddRequest(f"r{self._seq + i}", prompt, a, max_new_tokens))
        rids = [self.add_request(p, a, max_new_tokens) for p, a in zip(checked, adapters)]
        bound = max_steps or 4 * sum(len(p) + max_new_tokens for p in checked) + 64
        self._run_to_idle(bound)
        return [self.output(r) for r in rids]

    def _run_to_idle(self, max_steps: int) -> None:
        """Complete transfers and step until idle (mutates, through ops only); still busy after
        ``max_steps`` steps is a stall: `InvariantViolation` (pool ``requests``, ``liveness``)."""
        for _ in range(max_steps):
            if self.is_idle():
                return
            self.apply(CompleteTransfers(None))
            self.apply(Step())
        if self.is_idle():
            return
        live = tuple(r.rid for r in self.requests.values() if r.state.live)
        msg = f"not idle after {max_steps} steps: {len(live)} live request(s) stalled"
        raise InvariantViolation([Violation("requests", "liveness", msg, live)])

    def _req(self, rid: str) -> Request:
        r = self.requests.get(rid) if isinstance(rid, str) else None
        if r is None:
            if isinstance(rid, str) and rid in self._used_rids:
                limit = self.cfg.max_finished_requests
                raise RequestError(f"request {rid!r} ended and was retired (max_finished_requests={limit})")
            raise RequestError(f"unknown request id {rid!r}")
        return r

    # -- op dispatch ------------------------------------------------------------------------
    def apply(self, op: Op) -> list[Event]:
        """Apply one op; a refused op becomes a `Rejected` event (state unchanged).

        A ``Step`` is never refused: an error inside it is a runtime failure and propagates.
        """
        if isinstance(op, Step):
            return self._do(op)
        try:
            return self._do(op)
        except InvariantViolation:
            raise
        except LorainvError as e:
            return [Rejected(op.kind, type(e).__name__, str(e))]

    def _do(self, op: Op) -> list[Event]:
        handler = getattr(self, f"_op_{op.kind}", None)
        if handler is None:
            raise RequestError(f"unsupported op {op.kind}")
        self.last_checked_snapshot = None
        self.last_batch, self.last_batch_slots = (), ()
        self.last_batch_lens, self.last_batch_info = (), None
        self.scheduler.evictions.clear()
        events: list[Event] = handler(op)
        self._settle(events)
        self._retire(events)
        if isinstance(op, Step):
            self.history.append((self.steps, events))
        self._strict_hook(op)
        return events

    def _op_AddRequest(self, op: AddRequest) -> list[Event]:
        history = self._check_add(op)
        m = op.max_new_tokens
        req = Request(op.rid, tuple(op.prompt), op.adapter, m, op.session_id, self.clock.now(), self._seq)
        req.history = history
        req.queued_at = req.arrival
        self._seq += 1
        self.requests[op.rid] = req
        self._used_rids.add(op.rid)
        self.scheduler.waiting.append(req)
        return [Queued(op.rid, op.adapter, len(op.prompt), m, op.session_id)]

    def _check_add(self, op: AddRequest) -> tuple[int, ...]:
        """Validate ``op`` without mutating anything; returns the session history it extends."""
        if not isinstance(op.rid, str) or not op.rid or op.rid in self._used_rids:
            raise RequestError(f"request id {op.rid!r} is empty or already used")
        prompt = op.prompt
        if not isinstance(prompt, (list, tuple)):
            raise RequestError(f"prompt must be a list or tuple of token ids, got {type(prompt).__name__}")
        if not prompt:
            raise RequestError("empty prompt: a request needs at least one token")
        vocab = self.network.vocab_size
        bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt token ids {bad[:8]} are outside the vocabulary [0, {vocab})")
        m = op.max_new_tokens
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise RequestError(f"max_new_tokens must be an int >= 1, got {m!r}")
        if op.adapter is not None and not isinstance(op.adapter, str):
            raise RequestError(f"adapter must be None (the base model) or an adapter name, got {op.adapter!r}")
        if op.session_id is not None and not isinstance(op.session_id, str):
            raise RequestError(f"session_id must be None or a session id string, got {op.session_id!r}")
        if op.adapter is not None and op.adapter not in self.registry:
            raise RequestError(f"unknown adapter {op.adapter!r}; load it with load_adapter first")
        history: tuple[int, ...] = ()
        if op.session_id is not None:
            slot = self.sessions.slots.get(op.session_id)
            if slot is None:
                raise RequestError(f"session {op.session_id!r} is not open (closed or never opened)")
            if any(r.session_id == op.session_id and r.state.live for r in self.requests.values()):
                raise RequestError(f"session {op.session_id!r} already has a live turn")
            if slot.tokens and slot.adapter != op.adapter:
                raise RequestError(
                    f"session {op.session_id!r} runs adapter {slot.adapter!r}; its KV cannot serve {op.adapter!r}"
                )
            history = slot.tokens
        if len(prompt) > self.cfg.max_total_tokens:
            raise RequestError(f"prompt of {len(prompt)} tokens exceeds max_total_tokens={self.cfg.max_total_tokens}")
        total = len(history) + len(prompt) + m
        if total > self.network.max_context_len:
            raise RequestError(
                f"history+prompt+max_new_tokens = {total} exceeds the model context {self.network.max_context_len}"
            )
        return history

    def _op_Abort(self, op: Abort) -> list[Event]:
        req = self._req(op.rid)
        ev: list[Event] = []
        self.scheduler.abort(req, ev)
        return ev

    def _op_Step(self, op: Step) -> list[Event]:
        ev: list[Event] = []
        self.steps += 1
        self.device.poll()
        if self.loader is not None:
            self.scheduler.reap_loads(ev)
        s = self.scheduler
        batch = s.schedule_prefill(ev)
        if batch:
            self._run_prefill(batch, ev)
        else:
            decoders = s.schedule_decode(ev)
            if decoders:
                self._run_decode(decoders, ev)
            elif not ev and not s.stuck_staged(ev):
                self._end_stall(ev)
        if not ev:
            ev.append(Idle())
        return ev

    def _settle(self, ev: list[Event]) -> None:
        """After every op: land reaped loads; clear drain marks and reservations that are done."""
        if self.loader is not None:
            self.scheduler.reap_loads(ev)
        if self.drainer.enabled and (self.drainer.marks or self.drainer.reserved):
            ev.extend(self.scheduler.drain_update(full=False))

    def _retire(self, ev: list[Event]) -> None:
        """Forget the oldest ended requests beyond ``max_finished_requests`` (0: keep all), in
        the order their `Finished`/`Aborted` events came; the reference model does the same."""
        limit = self.cfg.max_finished_requests
        if limit <= 0:
            return
        self._ended.extend(e.rid for e in ev if isinstance(e, (Finished, Aborted)))
        while len(self._ended) > limit:
            del self.requests[self._ended.popleft()]

    def _end_stall(self, ev: list[Event]) -> None:
        """Nothing can run and nothing is in flight: end the head request rather than stall."""
        s = self.scheduler
        if not s.waiting or (self.loader is not None and self.loader.in_flight()) or self.device.pending():
            return
        head = s.waiting[0]
        s.waiting.remove(head)
        held = self.sessions.session_held_tokens()
        free = self.allocator.available_size() + self.cache.evictable_size()
        s.finish(head, "abort", f"does not fit: {free} tokens free or evictable, sessions hold {held}", ev)

    # -- forwards ---------------------------------------------------------------------------
    def _forward(self, reqs: list[Request], lens: list[int], mode: str) -> torch.Tensor:
        ids: list[int] = []
        pos: list[int] = []
        loc: list[int] = []
        for r, n in zip(reqs, lens):
            fill = r.fill
            ids.extend(fill[r.kv_len : r.kv_len + n])
            pos.extend(range(r.kv_len, r.kv_len + n))
            loc.extend(r.indices[r.kv_len : r.kv_len + n].tolist())
        dev = self.device.torch_device
        slots = [self.pool.slot_of(r.adapter) for r in reqs]
        info = build_lora_batch_info(
            slots, lens, self.pool.buffers.ranks, self.pool.buffers.scalings, faults=self.cfg.faults
        )
        fb = ForwardBatch(
            mode=mode,
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(pos, dtype=torch.long, device=dev),
            rows=torch.tensor([r.row for r in reqs], dtype=torch.long, device=dev),
            prefix_lens=torch.tensor([r.kv_len for r in reqs], dtype=torch.long, device=dev),
            extend_lens=torch.tensor(lens, dtype=torch.long, device=dev),
            out_cache_loc=torch.tensor(loc, dtype=torch.long, device=dev),
            lora=info,
        )
        adapters = tuple(r.adapter for r in reqs)
        self.last_batch, self.last_batch_slots = adapters, tuple(slots)
        self.last_batch_lens, self.last_batch_info = tuple(lens), info
        self.pool.touch(set(adapters))
        with torch.inference_mode():
            logits = self.network.forward(fb, self.kv, self.rows.req_to_token, self.pool.buffers, self.backend)
        self._batch_event = BatchFormed(mode, tuple(r.rid for r in reqs), adapters, info.num_segments)
        return logits.argmax(dim=-1).tolist()

    def _emit_token(self, r: Request, token: int, ev: list[Event]) -> None:
        r.output.append(int(token))
        if r.first_token_time is None:
            r.first_token_time = self.clock.now()
        ev.append(Decoded(r.rid, int(token)))
        if len(r.output) >= r.max_new_tokens:
            if r in self.scheduler.running:
                self.scheduler.running.remove(r)
            self.scheduler.finish(r, "length", "", ev)

    def _run_prefill(self, batch: list[tuple[Request, int]], ev: list[Event]) -> None:
        reqs = [r for r, _ in batch]
        lens = [n for _, n in batch]
        tokens = self._forward(reqs, lens, "prefill")
        ev.append(self._batch_event)
        s = self.scheduler
        for r, n, tok in zip(reqs, lens, tokens):
            r.kv_len += n
            done = r.kv_len == len(r.fill)
            ev.append(Scheduled(r.rid, n, done))
            if not done:
                r.state = ReqState.PREFILLING
                continue
            if s.staged is r:
                s.staged = None
            r.state = ReqState.DECODING
            s.running.append(r)
            self._emit_token(r, tok, ev)

    def _run_decode(self, decoders: list[Request], ev: list[Event]) -> None:
        tokens = self._forward(decoders, [1] * len(decoders), "decode")
        ev.append(self._batch_event)
        for r, tok in zip(decoders, tokens):
            r.kv_len += 1
            self._emit_token(r, tok, ev)

    # -- adapters ---------------------------------------------------------------------------
    def _op_LoadAdapter(self, op: LoadAdapter) -> list[Event]:
        name = op.name
        if not isinstance(name, str) or not name:
            raise AdapterError(f"adapter name must be a non-empty string, got {name!r}")
        if name in self.registry:
            raise DuplicateAdapterError(f"adapter {name!r} is already loaded; unload it first or pick another name")
        if not isinstance(op.source, str):
            raise AdapterError(f"adapter source must be a directory path or 'gen:<rank>:<seed>', got {op.source!r}")
        if not isinstance(op.pinned, bool):
            raise AdapterError(f"pinned must be a bool, got {op.pinned!r}")
        gen = parse_gen_source(op.source)
        if gen is not None:
            from lorainv.errors import AdapterRankError

            if gen.rank > self.cfg.max_lora_rank:
                raise AdapterRankError(f"{op.source}: rank {gen.rank} exceeds max_lora_rank={self.cfg.max_lora_rank}")
            adapter = gen.build(name, self.dims, self.dtype)
        else:
            adapter = load_peft_adapter(
                name, op.source, self.dims, max_lora_rank=self.cfg.max_lora_rank, dtype=self.dtype
            )
        ev: list[Event] = []
        self.registry[name] = adapter
        if op.pinned:
            try:
                ev.extend(self._pin(name))
            except LorainvError:
                del self.registry[name]
                raise
        return [AdapterRegistered(name, adapter.rank, op.pinned), *ev]

    def _pin(self, name: str) -> list[Event]:
        """Pin ``name`` and make it resident now (synchronously)."""
        pool = self.pool
        ev: list[Event] = []
        if len(pool.pinned | {name}) > self.cfg.max_loras_per_batch - 1:
            raise AdapterError(
                f"cannot pin {name!r}: at most max_loras_per_batch-1={self.cfg.max_loras_per_batch - 1} adapters"
            )
        if name not in pool.uid_to_slot:
            protected = self.scheduler.active_adapters() | {name}
            choice = pool.choose_slot(name, protected=protected)
            if choice is None:
                raise AdapterError(f"cannot pin {name!r}: every slot is in use by running requests; retry later")
            loaded = pool.load(name, self.registry[name], choice[0], self.device.current_stream())
            self.scheduler._note_evictions(loaded, protected)
            ev.extend(loaded)
            ev.append(LoadCompleted(name, choice[0]))
        elif self.loader is not None and name in self.loader.in_flight():
            raise AdapterError(f"cannot pin {name!r} while its load is in flight; complete transfers first")
        pool.pin(name)
        ev.append(Pinned(name))
        return ev

    def _registered(self, name: str) -> LoraAdapter:
        if not isinstance(name, str) or name not in self.registry:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded")
        return self.registry[name]

    def _op_PinAdapter(self, op: PinAdapter) -> list[Event]:
        self._registered(op.name)
        if op.name in self.pool.pinned:
            raise AdapterError(f"adapter {op.name!r} is already pinned")
        return self._pin(op.name)

    def _op_UnpinAdapter(self, op: UnpinAdapter) -> list[Event]:
        self._registered(op.name)
        if op.name not in self.pool.pinned:
            raise AdapterError(f"adapter {op.name!r} is not pinned")
        self.pool.unpin(op.name)
        return [Unpinned(op.name)]

    def _op_UnloadAdapter(self, op: UnloadAdapter) -> list[Event]:
        self._registered(op.name)
        live = [r.rid for r in self.requests.values() if r.adapter == op.name and r.state.live]
        if live:
            raise RequestError(f"adapter {op.name!r} is used by live request(s) {live[:8]}; abort or finish them")
        if self.loader is not None and op.name in self.loader.in_flight():
            raise RequestError(f"adapter {op.name!r} has a load in flight; complete transfers first")
        held = sorted(s.session_id for s in self.sessions.slots.values() if s.tokens and s.adapter == op.name)
        if held:
            raise RequestError(f"adapter {op.name!r} computed the KV that session(s) {held[:8]} hold; close them first")
        ev: list[Event] = []
        if op.name in self.pool.pinned:
            self.pool.unpin(op.name)
            ev.append(Unpinned(op.name))
        if op.name in self.pool.uid_to_slot:
            ev.extend(self.pool.evict(op.name))
        # no slot holds it and no load of it is in flight (refused above), so no copy reads these
        self.pool.release_host_copies(op.name)
        # KV cached under this name came from these weights; a later adapter of the same name must not match it
        dropped = self.cache.drop_namespace(op.name)
        if dropped:
            ev.append(CacheEvicted(dropped))
        del self.registry[op.name]
        self.scheduler.load_failures.pop(op.name, None)  # a re-registered adapter starts a fresh retry budget
        ev.append(AdapterUnregistered(op.name))
        return ev

    # -- sessions, transfers, clock ---------------------------------------------------------
    def _op_OpenSession(self, op: OpenSession) -> list[Event]:
        self.sessions.open(op.session_id)
        return [SessionOpened(op.session_id)]

    def _op_CloseSession(self, op: CloseSession) -> list[Event]:
        if not isinstance(op.session_id, str):
            raise RequestError(f"session_id must be a string, got {op.session_id!r}")
        self.sessions.get(op.session_id)
        ev: list[Event] = []
        for r in list(self.requests.values()):
            if r.session_id == op.session_id and r.state.live:
                self.scheduler.abort(r, ev)
        freed = self.sessions.close(op.session_id)
        ev.append(SessionClosed(op.session_id, freed))
        return ev

    def _op_CompleteTransfers(self, op: CompleteTransfers) -> list[Event]:
        if op.n is not None and (isinstance(op.n, bool) or not isinstance(op.n, int) or op.n < 0):
            raise RequestError(f"CompleteTransfers.n must be None or an int >= 0, got {op.n!r}")
        done, failed = self.device.complete(op.n)
        ev: list[Event] = [TransfersCompleted(done, failed)]
        if self.loader is not None:
            self.scheduler.reap_loads(ev)
        return ev

    def _op_FailTransfers(self, op: FailTransfers) -> list[Event]:
        if isinstance(op.n, bool) or not isinstance(op.n, int) or op.n < 0:
            raise RequestError(f"FailTransfers.n must be an int >= 0, got {op.n!r}")
        self.device.fail_next(op.n)
        return []

    def _op_AdvanceClock(self, op: AdvanceClock) -> list[Event]:
        dt = op.dt
        if isinstance(dt, bool) or not isinstance(dt, (int, float)) or not 0 <= dt < float("inf"):
            raise RequestError(f"AdvanceClock.dt must be a finite number >= 0, got {dt!r}")
        return [ClockAdvanced(self.clock.advance(dt))]

    # -- checking ---------------------------------------------------------------------------
    def snapshot(self) -> Any:
        """A tensor-free `Snapshot` of every pool. A pure read: taking it changes nothing."""
        from lorainv.impl.snapshotter import take_snapshot

        return take_snapshot(self)

    def _progress_facts(self) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        """(rid, state, adapter) of every live request and (adapter, slot, started step, landed)
        of every tracked load: what the no-progress check reads. A pure read."""
        live = tuple((r.rid, r.state._value_, r.adapter) for r in self.requests.values() if r.state in LIVE_STATES)
        if self.loader is None:
            return live, ()
        started = self.loader.started_steps()
        return live, tuple((t.uid, t.slot, started[t.uid], t.done) for t in self.loader.tracked())

    def check(self, *, progress_only: bool = False) -> list[Violation]:
        """Run every checker on a fresh snapshot, then the no-progress check
        (`lorainv.checkers.liveness.no_progress`); with ``progress_only``, that check alone (no
        snapshot). Pure as to the runtime. Its writes: `last_checked_snapshot` (the snapshot
        when every check passed, else None; left alone with ``progress_only``) and the checker
        instances, kept between calls while the set in force is unchanged
        (`lorainv.checkers.base.generation`), as the harness keeps its own: a checker may
        remember its last verdict or the last owners it saw, never anything of the runtime."""
        from lorainv.checkers import all_checkers, generation, liveness, run_checks

        live, loads = self._progress_facts()
        latency = getattr(self.device, "latency_steps", None)
        view = liveness.ProgressView(self.steps, latency, live, tuple(liveness.PendingLoad(*t) for t in loads))
        if progress_only:
            return liveness.no_progress(view)
        snap = self.snapshot()
        gen = generation()
        if self._checkers is None or self._checkers[0] != gen:
            self._checkers = (gen, all_checkers())
        out = run_checks(snap, self._checkers[1]) + liveness.no_progress(view)
        self.last_checked_snapshot = None if out else snap
        return out

    def _strict_hook(self, op: Op) -> None:
        """The engine's one way to the checkers (``strict_mem_check``): level 2 checks every
        pool after every op; level 1 runs the no-progress check after every step, and every
        checker after a step that leaves the engine idle (the leak check). A violation raises
        `InvariantViolation` with the recent step history (level 2)."""
        level = self.cfg.strict_mem_check
        if level == 0 or (level == 1 and not isinstance(op, Step)):
            return
        violations = self.check(progress_only=level == 1 and not self.is_idle())
        if violations:
            recent = [f"step {n}: " + ", ".join(str(e) for e in evs) for n, evs in self.history]
            raise InvariantViolation(violations, recent if self.cfg.strict_mem_check >= 2 else [])

    def finished_rids(self) -> list[str]:
        return [r.rid for r in self.requests.values() if r.state in (ReqState.FINISHED, ReqState.ABORTED)]


__all__ = ["Engine", "Finished", "make_network"]
