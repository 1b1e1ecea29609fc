"""vLLM's real v1 `Scheduler` and `KVCacheManager` as a lorainv `Target` (vLLM 0.33.0, CPU).

No model runs: after every ``schedule()`` the target plays the model runner and hands
``update_from_output`` one sampled token per request whose computed tokens reach its full
length this step, taken from lorainv's token oracle
(``next_token(identity of the request's adapter weights, the request's tokens as vLLM holds them)``).
Everything else -- admission, chunking, preemption, prefix caching, ``max_loras``, freeing --
is vLLM's own code. The target reads vLLM's objects to report events and snapshots and never
writes to them outside the public calls ``add_request``, ``finish_requests``, ``schedule`` and
``update_from_output``.

Sizing from `RuntimeConfig` (vLLM's own lower bounds noted):

=======================  ============================================================
lorainv                  vLLM
=======================  ============================================================
page_size                ``CacheConfig.block_size`` (the hash block size too)
max_total_tokens         ``max_total_tokens // page_size`` blocks, +1 for vLLM's null block
max_running_requests     ``max_num_seqs`` = min(max_running_requests, chunked_prefill_size):
                         vLLM requires max_num_batched_tokens >= max_num_seqs
chunked_prefill_size     ``max_num_batched_tokens`` (chunked prefill on)
max_loras_per_batch      ``LoRAConfig.max_loras`` (vLLM does not count the base model)
max_lora_rank            the smallest rank vLLM accepts that is >= it (1, 8, 16, 32, ...)
enable_prefix_cache      ``enable_prefix_caching``
=======================  ============================================================

``max_model_len`` is the fingerprint network's context capped by the KV capacity in tokens:
vLLM's engine refuses at start-up a KV cache that cannot hold one full-length sequence, and
this target builds the scheduler without that start-up check, so it refuses the request instead.

Adapters, as vLLM's OpenAI serving layer names them: ``LoadAdapter(name, source)`` makes a
``LoRARequest(name, lora_int_id, path)`` with a fresh ``lora_int_id`` per load (a counter, as
``load_lora_adapter`` does for a name it does not hold). ``reload_paths="same"`` (default)
gives every load of a name the same path, as a deployment that re-publishes an adapter's
directory in place does; ``"versioned"`` gives each load its own path. The target records
which weights (``source``) each ``lora_int_id`` stands for; tokens and checkers use that.

Cache salts: lorainv's ``AddRequest`` has no salt field; the target passes its
``session_id`` as vLLM's ``cache_salt`` (vLLM has no sessions; a session id here names a
tenant whose requests may share cached KV only with each other). No ``OpenSession`` is needed.

Event mapping (vLLM mixes prefill chunks and decodes in one step; lorainv's events keep the
two apart): per ``Step`` -- `Retracted` (``reason="kv"``) for each request vLLM preempted,
`PrefixHit` for each request admitted with ``num_computed_tokens > 0`` from the cache, then
a ``BatchFormed("prefill")`` over the requests that computed prompt (or, after preemption,
recomputed) tokens with one `Scheduled` each, a ``BatchFormed("decode")`` over the requests
that decoded, then one `Decoded` per sampled token in that order and `Finished("length")` for
each request vLLM finished by length. ``num_segments`` is the number of runs of equal adapters
(vLLM has no segment count). An ``Abort`` is `Aborted(rid, state)`.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorainv.checkers.base import Checker
from lorainv.config import RuntimeConfig
from lorainv.errors import AdapterError, DuplicateAdapterError, LorainvError, RequestError
from lorainv.events import (
    Aborted,
    AdapterRegistered,
    AdapterUnregistered,
    BatchFormed,
    Decoded,
    Event,
    Finished,
    Idle,
    PrefixHit,
    Queued,
    Rejected,
    Retracted,
    Scheduled,
)
from lorainv.ops import Abort, AddRequest, LoadAdapter, Op, Step, UnloadAdapter
from lorainv.targets.base import Capabilities

VLLM_VERSION = "0.33.0"
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
ADAPTER_ROOT = "/lorainv/adapters"
SUPPORTED_OPS = frozenset({"AddRequest", "Abort", "Step", "LoadAdapter", "UnloadAdapter"})

# a tiny Llama config: the scheduler reads sizes from it, no weights are ever loaded
_TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 1,
    "vocab_size": 1024,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-06,
    "torch_dtype": "float32",
    "head_dim": 2,
}
_MODEL_DIR: Path | None = None


def _model_dir() -> Path:
    global _MODEL_DIR
    if _MODEL_DIR is None:
        d = Path(tempfile.mkdtemp(prefix="lorainv-vllm-model-"))
        (d / "config.json").write_text(json.dumps(_TINY_LLAMA))
        _MODEL_DIR = d
    return _MODEL_DIR


@dataclass
class _Adapter:
    name: str
    lora_int_id: int
    path: str
    source: str
    rank: int


@dataclass
class _Tracked:
    """What the target knows of one request (its own bookkeeping, not vLLM's)."""

    rid: str
    req: Any  # the vLLM Request object (kept after vLLM forgets it, to read its end state)
    source: str | None  # the weights of its adapter; None: the base model
    salt: str | None
    state: str = "waiting"  # lorainv's name: waiting / prefilling / decoding / finished / aborted
    prefix_hit: int = 0  # tokens of the last admission's cache hit


def _rank_of(source: str) -> int:
    from lorainv.impl.adapters import parse_gen_source

    gen = parse_gen_source(source)
    if gen is not None:
        return int(gen[0])
    cfg = Path(source) / "adapter_config.json"
    try:
        r = json.loads(cfg.read_text()).get("r", 8)
    except (OSError, ValueError) as e:
        raise AdapterError(f"{source}: cannot read adapter_config.json: {e}") from None
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterError(f"{source}: adapter_config.json has rank r={r!r}")
    return r


class VllmTarget:
    """vLLM's v1 scheduler sized from ``cfg``; ``reload_paths``: "same" or "versioned" (see
    the module docstring). Mutated only by `apply`."""

    name = "vllm"

    def __init__(self, cfg: RuntimeConfig, *, reload_paths: str = "same") -> None:
        import torch
        from vllm.config import CacheConfig, DeviceConfig, LoRAConfig, ModelConfig, SchedulerConfig, VllmConfig  # type: ignore[import-not-found,unused-ignore]
        from vllm.utils.hashing import sha256  # type: ignore[import-not-found,unused-ignore]
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # type: ignore[import-not-found,unused-ignore]
        from vllm.v1.core.sched.scheduler import Scheduler  # type: ignore[import-not-found,unused-ignore]
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec  # type: ignore[import-not-found,unused-ignore]
        from vllm.v1.structured_output import StructuredOutputManager  # type: ignore[import-not-found,unused-ignore]

        from lorainv.errors import ConfigError
        from lorainv.impl.fingerprint_net import FingerprintNetwork
        from lorainv.model.token_oracle import TokenOracle

        if reload_paths not in ("same", "versioned"):
            raise ConfigError(f"reload_paths={reload_paths!r}; choose 'same' or 'versioned'")
        self.config = cfg
        self.reload_paths = reload_paths
        self.block_size = bs = cfg.page_size
        self.num_blocks = cfg.max_total_tokens // bs + 1  # block 0 is vLLM's null block
        self.max_num_batched_tokens = cfg.chunked_prefill_size
        self.max_num_seqs = min(cfg.max_running_requests, cfg.chunked_prefill_size)
        self.max_loras = cfg.max_loras_per_batch
        self.vocab_size = FingerprintNetwork.vocab_size
        self.max_model_len = min(FingerprintNetwork.max_context_len, cfg.max_total_tokens)
        self.dims = FingerprintNetwork.dims
        rank = next(r for r in VLLM_RANKS if r >= cfg.max_lora_rank)

        mc = ModelConfig(
            model=str(_model_dir()), skip_tokenizer_init=True, dtype="float32", max_model_len=self.max_model_len
        )
        sc = SchedulerConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            enable_chunked_prefill=True,
            is_encoder_decoder=False,
        )
        cc = CacheConfig(block_size=bs, enable_prefix_caching=cfg.enable_prefix_cache)
        lc = LoRAConfig(max_loras=self.max_loras, max_lora_rank=rank)  # type: ignore[arg-type,unused-ignore]
        vc = VllmConfig(
            model_config=mc, scheduler_config=sc, cache_config=cc, lora_config=lc, device_config=DeviceConfig("cpu")
        )
        cc.num_gpu_blocks = self.num_blocks
        spec = FullAttentionSpec(block_size=bs, num_kv_heads=2, head_size=2, dtype=torch.float32)
        kvc = KVCacheConfig(
            num_blocks=self.num_blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)]
        )
        self.scheduler = Scheduler(vc, kvc, StructuredOutputManager(vc), block_size=bs)
        init_none_hash(sha256)
        self._hasher = get_request_block_hasher(bs, sha256)
        self.oracle = TokenOracle.for_config(cfg, self.dims)
        self.adapters: dict[str, _Adapter] = {}  # registered name -> its current identity
        self.identities: dict[int, str] = {}  # every lora_int_id handed out -> the weights (source)
        self._next_lora_id = 1
        self.tracked: dict[str, _Tracked] = {}  # every request ever queued
        self.steps = 0
        # block provenance: block id -> (block hash, weights, salt, tokens up to the block's end),
        # recorded when the target first sees the block hashed (see `_note_provenance`)
        self.provenance: dict[int, tuple[Any, str | None, str | None, tuple[int, ...]]] = {}
        self.last_scheduled: tuple[tuple[str, int], ...] = ()
        self.last_loras: tuple[int, ...] = ()
        self.step_holdings: tuple[tuple[str, tuple[int, ...]], ...] = ()
        self.capabilities = Capabilities(
            ops=SUPPORTED_OPS,
            pools=frozenset({"vllm_blocks", "vllm_sched", "vllm_requests"}),
            checkers=_checker_names(),
            reference_model=False,
            policy=False,
            token_oracle=True,
        )

    # -- reads --------------------------------------------------------------------------------
    @property
    def kv(self) -> Any:
        return self.scheduler.kv_cache_manager

    def is_idle(self) -> bool:
        """Nothing waits or runs in vLLM (pure)."""
        return not self.scheduler.has_unfinished_requests()

    def snapshot(self) -> Any:
        """A `VllmSnapshot` read from vLLM's block pool, managers and requests (pure)."""
        from lorainv.targets.vllm_snapshot import take_vllm_snapshot

        return take_vllm_snapshot(self)

    def checkers(self) -> list[Checker]:
        from lorainv.checkers.vllm_blocks import vllm_checkers

        return vllm_checkers()

    def make_model(self) -> tuple[Any, list[Checker]]:
        """A fresh `VllmModel` of this target and the refinement checker that reads it."""
        from lorainv.targets.vllm_model import VllmModel, VllmRefinementChecker

        model = VllmModel.for_target(self)
        return model, [VllmRefinementChecker(model)]

    def live_rids(self) -> list[str]:
        return [t.rid for t in self.tracked.values() if t.state in ("waiting", "prefilling", "decoding")]

    def state_of(self, rid: str) -> str:
        return self.tracked[rid].state

    # -- ops -------------------------------------------------------------------------------
    def apply(self, op: Op) -> list[Event]:
        """Apply one op; a refused op is one `Rejected` event and changes nothing."""
        handler = getattr(self, f"_op_{op.kind}", None)
        if isinstance(op, Step):
            return self._op_Step(op)
        try:
            if handler is None:
                raise RequestError(f"the vllm target does not support {op.kind}")
            out: list[Event] = handler(op)
            return out
        except LorainvError as e:
            return [Rejected(op.kind, type(e).__name__, str(e))]

    def _op_AddRequest(self, op: AddRequest) -> list[Event]:
        from vllm.lora.request import LoRARequest  # type: ignore[import-not-found,unused-ignore]
        from vllm.sampling_params import SamplingParams  # type: ignore[import-not-found,unused-ignore]
        from vllm.v1.request import Request  # type: ignore[import-not-found,unused-ignore]

        rid, prompt, m = op.rid, op.prompt, op.max_new_tokens
        if not isinstance(rid, str) or not rid or rid in self.tracked:
            raise RequestError(f"request id {rid!r} is empty or already used")
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise RequestError("prompt must be a non-empty list or tuple of token ids")
        bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"prompt token ids {bad[:8]} are outside the vocabulary [0, {self.vocab_size})")
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise RequestError(f"max_new_tokens must be an int >= 1, got {m!r}")
        if op.session_id is not None and not isinstance(op.session_id, str):
            raise RequestError(f"session_id must be None or a string, got {op.session_id!r}")
        if len(prompt) + m > self.max_model_len:
            raise RequestError(f"prompt+max_new_tokens = {len(prompt) + m} exceeds max_model_len={self.max_model_len}")
        lora = None
        source = None
        if op.adapter is not None:
            ad = self.adapters.get(op.adapter) if isinstance(op.adapter, str) else None
            if ad is None:
                raise RequestError(f"unknown adapter {op.adapter!r}; load it with load_adapter first")
            lora = LoRARequest(ad.name, ad.lora_int_id, ad.path)
            source = ad.source
        # vLLM has no sessions: a session id names a tenant, whose requests share a cache salt
        # (an op's own cache_salt, when the vocabulary has one, wins)
        salt = getattr(op, "cache_salt", None) or op.session_id
        req = Request(
            request_id=rid,
            prompt_token_ids=list(prompt),
            sampling_params=SamplingParams(max_tokens=m, ignore_eos=True),
            pooling_params=None,
            lora_request=lora,
            cache_salt=salt,
            block_hasher=self._hasher,
            arrival_time=float(len(self.tracked)),
        )
        self.scheduler.add_request(req)
        self.tracked[rid] = _Tracked(rid, req, source, salt)
        return [Queued(rid, op.adapter, len(prompt), m, op.session_id)]

    def _op_Abort(self, op: Abort) -> list[Event]:
        from vllm.v1.request import RequestStatus  # type: ignore[import-not-found,unused-ignore]

        t = self.tracked.get(op.rid) if isinstance(op.rid, str) else None
        if t is None:
            raise RequestError(f"unknown request id {op.rid!r}")
        if t.state not in ("waiting", "prefilling", "decoding"):
            raise RequestError(f"request {op.rid} already ended ({t.state}); nothing to abort")
        state = t.state
        self.scheduler.finish_requests(op.rid, RequestStatus.FINISHED_ABORTED)
        t.state = "aborted"
        return [Aborted(op.rid, state)]

    def _op_LoadAdapter(self, op: LoadAdapter) -> list[Event]:
        name = op.name
        if not isinstance(name, str) or not name:
            raise AdapterError(f"adapter name must be a non-empty string, got {name!r}")
        if name in self.adapters:
            raise DuplicateAdapterError(f"adapter {name!r} is already loaded; unload it first")
        if not isinstance(op.source, str):
            raise AdapterError(f"adapter source must be a str, got {op.source!r}")
        if op.pinned:
            raise AdapterError("the vllm target does not pin adapters (the scheduler has no slots)")
        rank = _rank_of(op.source)
        if rank > self.config.max_lora_rank:
            from lorainv.errors import AdapterRankError

            raise AdapterRankError(f"{op.source}: rank {rank} exceeds max_lora_rank={self.config.max_lora_rank}")
        lid = self._next_lora_id
        path = f"{ADAPTER_ROOT}/{name}" if self.reload_paths == "same" else f"{ADAPTER_ROOT}/{name}@{lid}"
        self._next_lora_id += 1
        self.adapters[name] = _Adapter(name, lid, path, op.source, rank)
        self.identities[lid] = op.source
        return [AdapterRegistered(name, rank, False)]

    def _op_UnloadAdapter(self, op: UnloadAdapter) -> list[Event]:
        if not isinstance(op.name, str) or op.name not in self.adapters:
            from lorainv.errors import AdapterNotFoundError

            raise AdapterNotFoundError(f"adapter {op.name!r} is not loaded")
        live = [
            rid
            for rid in self.live_rids()
            if (lr := self.tracked[rid].req.lora_request) is not None and lr.lora_name == op.name
        ]
        if live:
            raise RequestError(f"adapter {op.name!r} is used by live request(s) {live[:8]}; abort or finish them")
        del self.adapters[op.name]
        return [AdapterUnregistered(op.name)]

    # -- a step ----------------------------------------------------------------------------------
    def _op_Step(self, op: Step) -> list[Event]:
        from vllm.v1.outputs import ModelRunnerOutput  # type: ignore[import-not-found,unused-ignore]
        from vllm.v1.request import RequestStatus  # type: ignore[import-not-found,unused-ignore]

        self.steps += 1
        s = self.scheduler
        before = {rid: self.tracked[rid].state for rid in self.live_rids()}
        out = s.schedule()
        ev: list[Event] = []
        for rid in sorted(out.preempted_req_ids or (), key=lambda r: list(before).index(r) if r in before else 0):
            t = self.tracked[rid]
            ev.append(Retracted(rid, len(t.req.output_token_ids), "kv"))
            t.state = "waiting"
        sched = list(out.num_scheduled_tokens.items())
        self.last_scheduled = tuple(sched)
        self.last_loras = tuple(
            sorted(
                {
                    lr.lora_int_id
                    for rid, _ in sched
                    if (lr := self.tracked[rid].req.lora_request) is not None and lr.lora_int_id > 0
                }
            )
        )
        prefill: list[tuple[str, int, bool]] = []
        decode: list[str] = []
        sampled: dict[str, int] = {}
        for rid, n in sched:
            t = self.tracked[rid]
            req = t.req
            start = req.num_computed_tokens - n
            if t.state == "waiting":
                t.prefix_hit = start  # the blocks it did not compute itself at this admission
                if start > 0:
                    ev.append(PrefixHit(rid, start, "cache"))
            done = req.num_computed_tokens >= req.num_tokens
            if t.state == "decoding":
                decode.append(rid)
            else:
                prefill.append((rid, n, done))
            if done:
                sampled[rid] = self.oracle_token(t)
        self._note_provenance(sched)
        # what each scheduled request holds while the step runs: a request that ends in
        # update_from_output has freed its blocks by the time a snapshot is taken
        self.step_holdings = tuple((rid, tuple(self.blocks_of(rid))) for rid, _ in sched)
        ids = [rid for rid, _ in sched]
        mro = ModelRunnerOutput(
            req_ids=ids,
            req_id_to_index={rid: i for i, rid in enumerate(ids)},
            sampled_token_ids=[[sampled[rid]] if rid in sampled else [] for rid in ids],
            logprobs=None,
            prompt_logprobs_dict={},
            pooler_output=[],
        )
        s.update_from_output(out, mro)
        if prefill:
            rids = tuple(r for r, _, _ in prefill)
            ev.append(BatchFormed("prefill", rids, *self._adapters_of(rids)))
            for rid, n, done in prefill:
                ev.append(Scheduled(rid, n, done))
                self.tracked[rid].state = "decoding" if done else "prefilling"
            ev += [Decoded(rid, sampled[rid]) for rid, _, done in prefill if done]
        if decode:
            rids = tuple(decode)
            ev.append(BatchFormed("decode", rids, *self._adapters_of(rids)))
            ev += [Decoded(rid, sampled[rid]) for rid in decode]
        for rid, _ in sched:
            t = self.tracked[rid]
            if t.req.status == RequestStatus.FINISHED_LENGTH_CAPPED:
                t.state = "finished"
                ev.append(Finished(rid, "length"))
            elif RequestStatus.is_finished(t.req.status):
                t.state = "finished"
                ev.append(Finished(rid, "abort", f"vLLM ended it as {t.req.status.name}"))
        if not ev:
            ev.append(Idle())
        return ev

    def oracle_token(self, t: _Tracked) -> int:
        """The token the fingerprint network gives after the request's tokens as vLLM holds them."""
        from lorainv.model.token_oracle import next_token

        ident = self.oracle.identity(t.source)
        return next_token(0 if ident is None else ident, t.req.all_token_ids)

    def _adapters_of(self, rids: tuple[str, ...]) -> tuple[tuple[str | None, ...], int]:
        names = tuple(None if (lr := self.tracked[r].req.lora_request) is None else lr.lora_name for r in rids)
        runs = sum(1 for i, a in enumerate(names) if i == 0 or names[i - 1] != a)
        return names, runs

    def _note_provenance(self, sched: list[tuple[str, int]]) -> None:
        """Record who filled each hashed block. vLLM hashes a block in ``schedule()``, when
        the request computing it allocates it. A scheduled request computed every block past
        the prefix hit of its latest admission (vLLM's own ``num_computed_tokens`` then), so
        those are recorded as its own -- also a cached block that was evicted and refilled
        with the same hash; the hit blocks keep the record of whoever filled them."""
        bs = self.block_size
        for rid, _ in sched:
            t = self.tracked[rid]
            own_from = t.prefix_hit // bs
            for i, b in enumerate(self.blocks_of(rid)):
                h = self.kv.block_pool.blocks[b].block_hash
                if h is None or i < own_from:
                    continue  # a hit keeps its filler's record (none: the checker reports it)
                self.provenance[b] = (h, t.source, t.salt, tuple(t.req.all_token_ids[: (i + 1) * bs]))

    def blocks_of(self, rid: str) -> list[int]:
        """The block ids vLLM's manager holds for ``rid`` (empty if none); a pure read."""
        out: list[int] = []
        for mgr in self.kv.coordinator.single_type_managers:
            out += [b.block_id for b in mgr.req_to_blocks.get(rid, ())]
        return out


def _checker_names() -> tuple[str, ...]:
    from lorainv.checkers.vllm_blocks import VLLM_CHECKERS

    return tuple(VLLM_CHECKERS)


__all__ = ["SUPPORTED_OPS", "VLLM_VERSION", "VllmTarget"]
