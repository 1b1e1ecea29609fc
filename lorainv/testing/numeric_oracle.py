"""The numeric oracle of ``--numeric`` mode: a plain float64 Llama forward that applies each
adapter's PEFT tensors directly, and the check that holds the engine's tokens and logits to it.

Independence (docs/design.md §9): this module imports no engine code except as a *source of input
data*, so a bug in paging, slots, segments, batching, the LoRA backends, the stacked slot
layout or the engine's own scaling cannot cancel out here.

* Base weights are input data: `BaseWeights.from_network` reads the network object's tensors
  by their Hugging Face names (``hf_state_dict()``) and its HF ``config.json`` dict
  (``config.to_hf_dict()``); nothing else of the network is used.
* Adapters are read from PEFT files (``adapter_config.json`` + ``adapter_model.safetensors``)
  with the ``safetensors`` library. A ``gen:...`` source is first materialised as a PEFT
  directory by ``lorainv.impl.adapters.write_peft_adapter`` (the generator's own writer, so
  any knob the gen format grows -- alpha, rsLoRA -- reaches the files and hence this oracle),
  and then read back exactly like a user's directory. The scaling ``alpha/r`` (``alpha/sqrt(r)``
  with rsLoRA) is computed here from the config, per module with ``rank_pattern`` /
  ``alpha_pattern``.
* The forward is full-sequence causal attention from position 0, recomputed from scratch for
  every sequence (no KV cache at all), one request at a time, with the LoRA delta added per
  module as ``y = x W^T + s * (x A^T) B^T`` (A ``[r, in]``, B ``[out, r]`` as PEFT saves them).

Numerics follow transformers' ``LlamaForCausalLM`` (the reference the tests compare with):
RMSNorm statistics and the RoPE angle tables are float32 (then cast), everything else float64.
(Computing those in float64 instead would put this forward ~1e-6 away from both others.)

Tolerance (`LOGIT_ATOL`, `LOGIT_RTOL`, 1e-9 each, elementwise ``|got - want| <= ATOL + RTOL
|want|``), chosen from measurement on the tiny model: this forward vs transformers+PEFT, worst
1.4e-14 (tied and untied heads, rsLoRA, alpha != r, rank/alpha patterns, up to 40 tokens);
engine vs this forward over 50-example ``--numeric`` campaigns, worst 5.8e-15. So the bound
leaves over four orders of magnitude for summation-order noise, while the planted bugs of the
tests (a LoRA delta x2, GQA heads tiled) move logits by 1e-1 to 2. A token differing from the
oracle's argmax is accepted only when the two logits are within that same tolerance (a tie).
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from lorainv.errors import ConfigError, Violation

__all__ = [
    "LOGIT_ATOL",
    "LOGIT_RTOL",
    "BaseWeights",
    "LogitsRecorder",
    "NumericOracle",
    "PeftLora",
    "check_numerics",
    "read_peft_dir",
]

# float64 tolerance for an engine logit row against the oracle (see the module docstring)
LOGIT_ATOL = 1e-9
LOGIT_RTOL = 1e-9

_LORA_NAME = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")


# ------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class BaseWeights:
    """A Llama base model as plain float64 tensors under Hugging Face names, plus the fields of
    its HF ``config.json`` this forward needs. Never mutated after construction."""

    tensors: Mapping[str, torch.Tensor]
    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tied: bool

    @classmethod
    def from_hf(cls, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> BaseWeights:
        """From HF-named tensors and an HF ``config.json`` dict (missing ``head_dim`` is
        ``hidden_size / num_attention_heads``, missing ``num_key_value_heads`` is MHA)."""
        heads = int(config["num_attention_heads"])
        head_dim = config.get("head_dim") or int(config["hidden_size"]) // heads
        theta = config.get("rope_theta")
        if theta is None:
            theta = (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(
            tensors={k: v.detach().to(torch.float64).cpu() for k, v in tensors.items()},
            vocab_size=int(config["vocab_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            tied=bool(config.get("tie_word_embeddings", False)),
        )

    @classmethod
    def from_network(cls, network: Any) -> BaseWeights:
        """Read a lorainv Llama network object's weights by HF name (input data, not code)."""
        return cls.from_hf(network.hf_state_dict(), network.config.to_hf_dict())

    def w(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    @property
    def lm_head(self) -> torch.Tensor:
        return self.tensors["model.embed_tokens.weight" if self.tied else "lm_head.weight"]


@dataclass(frozen=True)
class PeftLora:
    """One adapter as PEFT stores it: module name (``model.layers.0.self_attn.q_proj``) ->
    ``(A [r, in], B [out, r], scaling)`` in float64. Modules absent here get no delta."""

    modules: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]


def _pattern_value(pattern: Mapping[str, Any], module: str) -> Any | None:
    """PEFT's rank/alpha pattern lookup: the first key ``k`` with ``module`` matching ``(.*\\.)?k``."""
    for key, value in pattern.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", module):
            return value
    return None


def read_peft_dir(path: str | Path) -> PeftLora:
    """Read ``adapter_config.json`` and ``adapter_model.safetensors`` (else ``adapter_model.bin``,
    loaded with ``weights_only=True``) of a PEFT LoRA directory.

    Scaling per module: ``alpha_m / r_m`` or ``alpha_m / sqrt(r_m)`` (``use_rslora``), where
    ``r_m`` is the rank of the module's ``lora_A`` and ``alpha_m`` is ``lora_alpha`` unless an
    ``alpha_pattern`` key matches. Raises ``ValueError`` for a file this oracle cannot read.
    """
    directory = Path(path)
    cfg = json.loads((directory / "adapter_config.json").read_text())
    st_file, bin_file = directory / "adapter_model.safetensors", directory / "adapter_model.bin"
    if st_file.exists() or not bin_file.exists():
        tensors = safetensors.torch.load_file(str(st_file))
    else:  # PEFT's older format; never unpickled
        tensors = torch.load(bin_file, map_location="cpu", weights_only=True)
    alpha = float(cfg.get("lora_alpha", 8))
    rslora = bool(cfg.get("use_rslora", False))
    alpha_pattern = cfg.get("alpha_pattern") or {}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = _LORA_NAME.fullmatch(name)
        if m is None:
            raise ValueError(f"{directory}: tensor {name!r} is not a LoRA weight")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t.to(torch.float64)
    modules = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{directory}: module {module} lacks lora_A or lora_B")
        a, b = ab["A"], ab["B"]
        r = int(a.shape[0])
        alpha_m = _pattern_value(alpha_pattern, module)
        alpha_m = alpha if alpha_m is None else float(alpha_m)
        modules[module] = (a, b, alpha_m / (math.sqrt(r) if rslora else r))
    return PeftLora(modules)


_GEN_CACHE: dict[tuple[str, tuple[int, ...]], PeftLora] = {}


def _gen_dims_key(dims: Any) -> tuple[int, ...]:
    return (dims.num_layers, dims.hidden_size, dims.num_heads, dims.num_kv_heads, dims.head_dim, dims.intermediate_size)


def read_gen_source(source: str, dims: Any) -> PeftLora:
    """A ``gen:...`` adapter, materialised as PEFT files by the generator's writer and read back
    with `read_peft_dir` (cached per source and model shape: the generator is deterministic)."""
    key = (source, _gen_dims_key(dims))
    if key not in _GEN_CACHE:
        from lorainv.impl import adapters

        parsed = adapters.parse_gen_source(source)
        if parsed is None:
            raise ValueError(f"{source!r} is not a gen source")
        # a GenSource is the pair (rank, seed) with writer options as attributes; refuse any
        # option this reader does not know rather than silently build a different adapter
        options = dict(vars(parsed)) if hasattr(parsed, "__dict__") else {}
        unknown = set(options) - {"alpha", "use_rslora"}
        if unknown:
            raise ValueError(f"{source!r}: gen option(s) {sorted(unknown)} unknown to the numeric oracle")
        kwargs: dict[str, Any] = {"rank": int(parsed[0]), "seed": int(parsed[1]), **options}
        with tempfile.TemporaryDirectory(prefix="lorainv-oracle-") as tmp:
            adapters.write_peft_adapter(tmp, dims, **kwargs)
            _GEN_CACHE[key] = read_peft_dir(tmp)
    return _GEN_CACHE[key]


# ------------------------------------------------------------------------------------ forward
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm with transformers' numerics: normalised in float32 by ``rsqrt`` of the
    float32 mean square (``x / sqrt(.)`` rounds differently by 1 ulp, ~4e-7 in the logits)."""
    x32 = x.to(torch.float32)
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * normed.to(torch.float64)


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE of ``x [heads, n, d]`` at positions ``0..n-1``; angles in float32."""
    n, d = x.shape[1], x.shape[2]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    angle = torch.arange(n, dtype=torch.float32)[:, None] * inv_freq[None, :]  # [n, d/2]
    angle = torch.cat([angle, angle], dim=-1)
    cos, sin = angle.cos().to(torch.float64), angle.sin().to(torch.float64)
    first, second = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-second, first], dim=-1) * sin


def forward_logits(base: BaseWeights, lora: PeftLora | None, tokens: Sequence[int]) -> torch.Tensor:
    """``[len(tokens), vocab]`` float64 logits of ``tokens`` from position 0; pure."""
    n = len(tokens)
    heads, kv_heads, d = base.num_heads, base.num_kv_heads, base.head_dim
    eps = base.rms_norm_eps

    def linear(h: torch.Tensor, module: str) -> torch.Tensor:
        y = h @ base.w(module + ".weight").T
        if lora is not None and module in lora.modules:
            a, b, s = lora.modules[module]
            y = y + s * ((h @ a.T) @ b.T)
        return y

    x = base.w("model.embed_tokens.weight")[torch.tensor(list(tokens), dtype=torch.long)]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for layer in range(base.num_layers):
        p = f"model.layers.{layer}."
        h = _rms_norm(x, base.w(p + "input_layernorm.weight"), eps)
        q = linear(h, p + "self_attn.q_proj").view(n, heads, d).transpose(0, 1)
        k = linear(h, p + "self_attn.k_proj").view(n, kv_heads, d).transpose(0, 1)
        v = linear(h, p + "self_attn.v_proj").view(n, kv_heads, d).transpose(0, 1)
        q, k = _rope(q, base.rope_theta), _rope(k, base.rope_theta)
        group = heads // kv_heads  # query head j reads key/value head j // group
        outs = []
        for j in range(heads):
            scores = (q[j] @ k[j // group].T) / math.sqrt(d)
            scores = scores.masked_fill(~causal, float("-inf"))
            outs.append(torch.softmax(scores, dim=-1) @ v[j // group])
        attn = torch.cat(outs, dim=-1)  # [n, heads * d], head-major like q_proj's rows
        x = x + linear(attn, p + "self_attn.o_proj")
        h = _rms_norm(x, base.w(p + "post_attention_layernorm.weight"), eps)
        gate, up = linear(h, p + "mlp.gate_proj"), linear(h, p + "mlp.up_proj")
        x = x + linear(torch.nn.functional.silu(gate) * up, p + "mlp.down_proj")
    return _rms_norm(x, base.w("model.norm.weight"), eps) @ base.lm_head.T


@dataclass
class NumericOracle:
    """Logits of a token sequence under an adapter source (``None``: the base model).

    ``dims`` (the model's sizes: ``num_layers``, ``hidden_size``, ...) is needed only to
    materialise gen sources. Mutates only its caches.
    """

    base: BaseWeights
    dims: Any = None
    _adapters: dict[str, PeftLora] = field(default_factory=dict)
    _logits: dict[tuple[str | None, tuple[int, ...]], torch.Tensor] = field(default_factory=dict)

    @classmethod
    def for_network(cls, network: Any) -> NumericOracle:
        """The oracle of a Llama network object; `ConfigError` for any other network (the fast
        networks have no weights to judge: numeric mode needs ``network="tiny"`` or a checkpoint)."""
        if not callable(getattr(network, "hf_state_dict", None)) or not hasattr(network, "config"):
            raise ConfigError(
                f"numeric mode needs a Llama network (network='tiny' or a checkpoint), got {type(network).__name__}"
            )
        return cls(BaseWeights.from_network(network), getattr(network, "dims", None))

    def adapter(self, source: str) -> PeftLora:
        """Read per oracle (a directory is read when first needed; rewriting it mid-run is unsupported)."""
        if source not in self._adapters:
            is_gen = source == "gen" or source.startswith("gen:")
            self._adapters[source] = read_gen_source(source, self.dims) if is_gen else read_peft_dir(source)
        return self._adapters[source]

    @torch.no_grad()
    def logits(self, source: str | None, tokens: Sequence[int]) -> torch.Tensor:
        key = (source, tuple(tokens))
        if key not in self._logits:
            lora = None if source is None else self.adapter(source)
            self._logits[key] = forward_logits(self.base, lora, key[1])
        return self._logits[key]

    def greedy(self, source: str | None, prompt: Sequence[int], max_new: int) -> list[int]:
        """Greedy continuation of ``prompt`` (argmax, first index on an exact tie)."""
        seq = list(prompt)
        for _ in range(max_new):
            seq.append(int(self.logits(source, seq)[-1].argmax()))
        return seq[len(prompt) :]


# ------------------------------------------------------------------------------------ recording
@dataclass
class ForwardRecord:
    """One engine forward: the op index it ran under, each row's last position, its logits."""

    op_index: int
    positions: list[int]
    logits: torch.Tensor


class LogitsRecorder:
    """Wraps a network object; every ``forward`` is passed through and its logits recorded.

    ``op_index()`` tells which op (harness record index) a forward belongs to. Everything
    else is delegated to the wrapped network. Mutates only ``forwards``.
    """

    def __init__(self, inner: Any, op_index: Callable[[], int]) -> None:
        self._inner = inner
        self._op_index = op_index
        self.forwards: list[ForwardRecord] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def forward(self, fb: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        logits = self._inner.forward(fb, *args, **kwargs)
        last = (fb.prefix_lens + fb.extend_lens - 1).tolist()
        self.forwards.append(ForwardRecord(self._op_index(), last, logits.detach().to("cpu").clone()))
        return logits


# ------------------------------------------------------------------------------------ check
@dataclass
class _Req:
    source: str | None
    context: tuple[int, ...]  # session history + prompt
    session: str | None
    output: list[int] = field(default_factory=list)
    rows: list[tuple[int, torch.Tensor, int | None]] = field(default_factory=list)  # (pos, logits, token j)


def _close(got: torch.Tensor, want: torch.Tensor) -> tuple[bool, float]:
    diff = (got.to(torch.float64) - want).abs()
    ok = bool((diff <= LOGIT_ATOL + LOGIT_RTOL * want.abs()).all())
    return ok, float(diff.max())


def check_numerics(
    records: Sequence[Any],
    forwards: Sequence[ForwardRecord],
    oracle: NumericOracle,
    stats: dict[str, float] | None = None,
) -> list[Violation]:
    """Hold every request of a run to the oracle; ``records`` are the harness's `OpRecord` s.

    The logical history of each request is rebuilt from the ops and events alone: the adapter
    source registered under its adapter name at submission (``AdapterRegistered`` after a
    ``LoadAdapter``, dropped at ``AdapterUnregistered``), and its session's history (empty at
    ``SessionOpened``, extended by each turn that finishes with reason ``length``). Then:

    * N1 (tokens): each emitted token, in order, must be the oracle's argmax given the same
      prefix (history + prompt + the earlier outputs), unless the oracle's logit of the
      emitted token is within the logit tolerance of the maximum (a float tie). Finished,
      aborted and retracted requests alike: whatever was emitted is a prefix of the oracle's.
    * N2 (logits): each forward's row for a request (every prefill chunk and decode step)
      equals the oracle's logits at that row's position within `LOGIT_ATOL`/`LOGIT_RTOL`; a
      token comes from a row at the position just before it; each forward has its
      ``BatchFormed`` event.
    ``stats``, when given, accumulates ``requests``, ``tokens`` and ``rows`` checked and the
    ``worst`` elementwise logit difference seen. Mutates nothing else but the oracle's caches.
    """
    from lorainv.events import (
        AdapterRegistered,
        AdapterUnregistered,
        BatchFormed,
        Decoded,
        Finished,
        Queued,
        SessionClosed,
        SessionOpened,
    )
    from lorainv.ops import AddRequest, LoadAdapter

    out: list[Violation] = []
    by_op: dict[int, list[ForwardRecord]] = {}
    for f in forwards:
        by_op.setdefault(f.op_index, []).append(f)
    sources: dict[str, str] = {}
    sessions: dict[str, tuple[int, ...]] = {}
    reqs: dict[str, _Req] = {}
    for i, rec in enumerate(records):
        fwd = iter(by_op.get(i, []))
        batches = [e for e in rec.events if isinstance(e, BatchFormed)]
        if len(batches) != len(by_op.get(i, [])) and not rec.violations:
            msg = f"op {i} ({rec.op.kind}) ran {len(by_op.get(i, []))} forwards but reported {len(batches)} batches"
            return [Violation("numerics", "N2", msg, (rec.op.kind,))]
        pending: dict[str, int] = {}  # rid -> index in its rows of the latest row of this op
        for ev in rec.events:
            if isinstance(ev, AdapterRegistered) and isinstance(rec.op, LoadAdapter):
                sources[ev.name] = rec.op.source
            elif isinstance(ev, AdapterUnregistered):
                sources.pop(ev.name, None)
            elif isinstance(ev, SessionOpened):
                sessions[ev.session_id] = ()
            elif isinstance(ev, SessionClosed):
                sessions.pop(ev.session_id, None)
            elif isinstance(ev, Queued) and isinstance(rec.op, AddRequest) and rec.op.rid == ev.rid:
                op = rec.op
                src = None if op.adapter is None else sources.get(op.adapter)
                hist = sessions.get(op.session_id, ()) if op.session_id is not None else ()
                if op.adapter is None or src is not None:
                    reqs[ev.rid] = _Req(src, hist + tuple(op.prompt), op.session_id)
            elif isinstance(ev, BatchFormed):
                fr = next(fwd, None)
                if fr is None:
                    break
                for b, rid in enumerate(ev.rids):
                    if rid in reqs:
                        reqs[rid].rows.append((fr.positions[b], fr.logits[b], None))
                        pending[rid] = len(reqs[rid].rows) - 1
            elif isinstance(ev, Decoded) and ev.rid in reqs:
                r = reqs[ev.rid]
                if ev.rid not in pending:
                    out.append(Violation("numerics", "N2", f"{ev.rid} emitted a token with no forward row", (ev.rid,)))
                else:
                    k = pending.pop(ev.rid)
                    r.rows[k] = (r.rows[k][0], r.rows[k][1], len(r.output))
                r.output.append(ev.token)
            elif isinstance(ev, Finished) and ev.reason == "length" and ev.rid in reqs:
                r = reqs[ev.rid]
                if r.session is not None and r.session in sessions:
                    sessions[r.session] = r.context + tuple(r.output)
    for rid, r in reqs.items():
        out.extend(_check_request(rid, r, oracle, stats if stats is not None else {}))
    return out


def _check_request(rid: str, r: _Req, oracle: NumericOracle, stats: dict[str, float]) -> list[Violation]:
    out: list[Violation] = []
    seq = r.context + tuple(r.output)
    if not r.rows:
        return out
    stats["requests"] = stats.get("requests", 0) + 1
    stats["tokens"] = stats.get("tokens", 0) + len(r.output)
    stats["rows"] = stats.get("rows", 0) + len(r.rows)
    top = max(pos for pos, _, _ in r.rows)
    if top >= len(seq) or min(pos for pos, _, _ in r.rows) < 0:
        msg = f"{rid} has a logits row at position {top}, outside its {len(seq)} tokens"
        return [Violation("numerics", "N2", msg, (rid,))]
    want = oracle.logits(r.source, seq[: max(top + 1, len(seq) - 1)])
    for j, tok in enumerate(r.output):
        pos = len(r.context) + j - 1
        best = int(want[pos].argmax())
        top_logit, gap = float(want[pos][best]), float(want[pos][best] - want[pos][tok])
        if tok != best and gap > LOGIT_ATOL + LOGIT_RTOL * abs(top_logit):
            msg = (
                f"{rid} token {j}: engine emitted {tok}, the oracle's argmax after the same "
                f"{pos + 1} tokens is {best} (outputs so far {list(r.output[:j])})"
            )
            out.append(Violation("numerics", "N1", msg, (rid,)))
            break
    for pos, row, made in r.rows:
        if made is not None and pos != len(r.context) + made - 1:
            msg = f"{rid} token {made} came from logits at position {pos}, not {len(r.context) + made - 1}"
            out.append(Violation("numerics", "N2", msg, (rid,)))
            break
        ok, diff = _close(row, want[pos])
        stats["worst"] = max(stats.get("worst", 0.0), diff)
        if not ok:
            msg = f"{rid} logits at position {pos}: max |engine - oracle| = {diff:.3e} (tolerance {LOGIT_ATOL:g})"
            out.append(Violation("numerics", "N2", msg, (rid,)))
            break
    return out
