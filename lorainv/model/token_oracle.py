"""The token oracle: what token the fast network must emit next, from logical histories alone.

Pure Python (no torch in this module): it never reads the engine. It follows requests through
the ops and events — a request's logical history is its session's last saved turn (as this
oracle saw it), its prompt and the tokens decoded so far — and computes, for every `Decoded`,
the token the fingerprint network (`lorainv.impl.fingerprint_net`) gives when every KV cell it
reads is right. The function, restated here as the spec (integers mod ``P = 2**31 - 1``):

* ``ident``: blake2b-8 (little-endian, mod ``P``) of ``b"lorainv-slot"``, the slot rank (int64
  LE), the slot scaling (float64 LE) and, per layer and group (qkv, o, gate_up, down), the A then
  the B region of the slot as float64 LE, row-major — the slot contents the adapter *as
  registered* must produce: its weights laid out zero-padded to ``max_lora_rank``, rounded to the
  pool dtype, and with ``tp_size > 1`` the tensor-parallel rank 0 shard. The base model's slot is
  all zeros with rank 0 and scaling 0.
* ``mix(x) = (x*x + 48271*x + 11) mod P``; ``fp(t, p) = mix(mix((t*1000003 + p*40503 + ident + 1) mod P))``;
* next token after ``tokens[0..L-1]``: ``S = sum_k fp(tokens[k], k) * 3**(k+1) mod P``, then
  ``mix(mix((S + ident*1000033 + L) mod P)) mod 1024``.

The adapter contents come from a *provider* (source string -> `AdapterImage`): ``gen:...``
sources are test inputs made by `lorainv.impl.adapters.generate_adapter` (torch is imported
lazily there, only to build that input); PEFT directories are read here with the ``safetensors``
library and laid out by this module's own code.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorainv import events as E
from lorainv.errors import Violation
from lorainv.ops import LoadAdapter, Op

P = 2**31 - 1
VOCAB = 1024

# Slot layout (see lorainv/impl/lora_buffers.py docstring): groups in this order, modules stacked.
LAYOUT: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("qkv", ("q_proj", "k_proj", "v_proj")),
    ("o", ("o_proj",)),
    ("gate_up", ("gate_proj", "up_proj")),
    ("down", ("down_proj",)),
)
SPLIT_OUTPUTS = frozenset({"qkv", "gate_up"})  # tensor parallel: these shard B's rows, the others A's columns
ATTENTION = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})

# significand bits (with the implicit one) and the smallest normal exponent of each pool dtype
_FLOAT_FORMATS = {"float64": (53, -1022), "float32": (24, -126), "float16": (11, -14), "bfloat16": (8, -126)}


class OracleUnsupported(Exception):
    """The oracle cannot derive this adapter's slot contents (e.g. a ``.bin`` adapter: it never unpickles)."""


def mix(x: int) -> int:
    return (x * x + 48271 * x + 11) % P


def fingerprint(token: int, position: int, ident: int) -> int:
    return mix(mix((token * 1000003 + position * 40503 + ident + 1) % P))


@dataclass
class Accumulator:
    """The running sum ``S`` over a growing token list (mutated by `extend`)."""

    ident: int
    total: int = 0
    weight: int = 1
    count: int = 0

    def extend(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            self.weight = self.weight * 3 % P
            self.total = (self.total + fingerprint(t, self.count, self.ident) * self.weight) % P
            self.count += 1

    def next_token(self) -> int:
        return mix(mix((self.total + self.ident * 1000033 + self.count) % P)) % VOCAB


def next_token(ident: int, tokens: Sequence[int]) -> int:
    """The token the network emits after ``tokens`` (all KV correct) with slot identity ``ident``."""
    acc = Accumulator(ident)
    acc.extend(tokens)
    return acc.next_token()


# -- expected slot contents ----------------------------------------------------------------------
Matrix = list[list[float]]


@dataclass(frozen=True)
class AdapterImage:
    """An adapter as its slot must reflect it: slot ``rank`` and ``scaling``; per ``(layer, module)``
    ``(A, B)`` with ``A`` ``r_m x in`` and ``B`` ``out x r_m`` (B already multiplied by the
    module's ``s_m / scaling`` when it has its own alpha or rank), full (unsharded) sizes."""

    rank: int
    scaling: float
    modules: dict[tuple[int, str], tuple[Matrix, Matrix]]


def module_io(dims: Any, module: str) -> tuple[int, int]:
    """(in, out) features of a Llama linear, re-derived from the head and MLP sizes."""
    q, kv = dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim
    h, inter = dims.hidden_size, dims.intermediate_size
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }[module]


def round_to(x: float, dtype: str) -> float:
    """``x`` rounded to nearest-even in ``dtype`` (normal and subnormal range; no overflow)."""
    bits, emin = _FLOAT_FORMATS[dtype]
    if x == 0.0 or bits == 53:
        return x
    m, e = math.frexp(x)  # x = m * 2**e, 0.5 <= |m| < 1
    keep = bits - max(0, emin - (e - 1))
    return math.ldexp(round(math.ldexp(m, keep)), e - keep)


def slot_contents(
    image: AdapterImage | None, dims: Any, max_rank: int, tp_size: int, dtype: str
) -> tuple[int, float, list[float]]:
    """(rank, scaling, values): what the tp-rank-0 slot holding ``image`` (None: the base model)
    must contain, values in the identity's order, rounded to ``dtype``."""
    rank, scaling = (0, 0.0) if image is None else (image.rank, image.scaling)
    out: list[float] = []
    for layer in range(dims.num_layers):
        for group, mods in LAYOUT:
            fan_in = module_io(dims, mods[0])[0]
            in_local = fan_in if group in SPLIT_OUTPUTS else fan_in // tp_size
            a_rows: Matrix = []
            b_rows: Matrix = []
            for m in mods:
                fan_out = module_io(dims, m)[1]
                out_local = fan_out // tp_size if group in SPLIT_OUTPUTS else fan_out
                got = None if image is None else image.modules.get((layer, m))
                a = [] if got is None else got[0]
                b = [] if got is None else got[1]
                for j in range(max_rank):
                    row = a[j][:in_local] if j < len(a) else []
                    a_rows.append(row + [0.0] * (in_local - len(row)))
                for k in range(out_local):
                    row = b[k][:max_rank] if k < len(b) else []
                    b_rows.append(row + [0.0] * (max_rank - len(row)))
            for row in a_rows + b_rows:
                out.extend(round_to(v, dtype) for v in row)
    return rank, scaling, out


def identity_of(rank: int, scaling: float, values: Sequence[float]) -> int:
    h = hashlib.blake2b(b"lorainv-slot", digest_size=8)
    h.update(struct.pack("<q", rank))
    h.update(struct.pack("<d", scaling))
    h.update(struct.pack(f"<{len(values)}d", *values))
    return int.from_bytes(h.digest(), "little") % P


# -- adapter providers ---------------------------------------------------------------------------
def image_from_gen(source: str, dims: Any) -> AdapterImage:
    """A ``gen:...`` source, materialised as the PEFT directory the generator writes for it
    (raw A and B tensors in float64, ``r``, ``lora_alpha``, ``use_rslora``) and read back like a
    user's directory: the scaling and the layout are this module's, never the loader's."""
    import tempfile

    import torch  # only to write the test input; the oracle's own arithmetic is plain Python

    from lorainv.impl.adapters import parse_gen_source, write_peft_adapter

    parsed: Any = parse_gen_source(source)
    if parsed is None:
        raise OracleUnsupported(f"{source!r} is not a gen source")
    rank, seed = int(parsed[0]), int(parsed[1])
    alpha = getattr(parsed, "alpha", None)
    rslora = bool(getattr(parsed, "use_rslora", False))
    with tempfile.TemporaryDirectory(prefix="lorainv-token-oracle-") as tmp:
        write_peft_adapter(tmp, dims, rank=rank, seed=seed, alpha=alpha, use_rslora=rslora, dtype=torch.float64)
        return image_from_peft(tmp, dims)


_PEFT_TENSOR = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")


def _read_safetensors(path: Path) -> dict[str, Matrix]:
    """Every tensor of a 2-D-tensor safetensors file as nested float lists."""
    from safetensors import safe_open

    out: dict[str, Matrix] = {}
    raw_header: dict[str, Any] | None = None
    with safe_open(str(path), framework="numpy") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
            try:
                out[name] = f.get_tensor(name).astype("float64").tolist()
            except TypeError:  # bfloat16 has no numpy dtype: decode the raw bytes
                if raw_header is None:
                    data = path.read_bytes()
                    n = int.from_bytes(data[:8], "little")
                    raw_header = {"data": data, "base": 8 + n, **json.loads(data[8 : 8 + n])}
                out[name] = _decode_bf16(raw_header, name)
    return out


def _decode_bf16(header: dict[str, Any], name: str) -> Matrix:
    info = header[name]
    if info["dtype"] != "BF16":
        raise OracleUnsupported(f"tensor {name!r} has dtype {info['dtype']}")
    lo, hi = info["data_offsets"]
    blob = header["data"][header["base"] + lo : header["base"] + hi]
    vals = [struct.unpack("<f", struct.pack("<I", h << 16))[0] for (h,) in struct.iter_unpack("<H", blob)]
    rows, cols = info["shape"]
    return [vals[i * cols : (i + 1) * cols] for i in range(rows)]


def _scale(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def image_from_peft(directory: str, dims: Any) -> AdapterImage:
    """A PEFT LoRA directory, read directly: per-module tensors, ``r``/``lora_alpha``/rsLoRA and
    ``alpha_pattern`` (PEFT's ``(.*\\.)?(key)$`` match); module ranks are the tensors' own."""
    d = Path(directory)
    st = d / "adapter_model.safetensors"
    if not st.exists():
        raise OracleUnsupported(f"{d}: no adapter_model.safetensors (the oracle never unpickles a .bin)")
    cfg = json.loads((d / "adapter_config.json").read_text())
    r, alpha, rs = cfg.get("r", 8), float(cfg.get("lora_alpha", 8)), bool(cfg.get("use_rslora", False))
    pattern = cfg.get("alpha_pattern") or {}
    s = _scale(alpha, r, rs) or 1.0
    parts: dict[tuple[int, str], dict[str, Matrix]] = {}
    for name, mat in _read_safetensors(st).items():
        hit = _PEFT_TENSOR.fullmatch(name)
        if hit is None:
            raise OracleUnsupported(f"{st}: unexpected tensor {name!r}")
        parts.setdefault((int(hit.group(1)), hit.group(2)), {})[hit.group(3)] = mat
    modules: dict[tuple[int, str], tuple[Matrix, Matrix]] = {}
    for (layer, m), ab in parts.items():
        a, b = ab["A"], ab["B"]
        r_m = len(a)
        full = f"model.layers.{layer}.{'self_attn' if m in ATTENTION else 'mlp'}.{m}"
        a_m = next((float(v) for k, v in pattern.items() if re.match(rf"(.*\.)?({k})$", full)), alpha)
        ratio = _scale(a_m, r_m, rs) / s
        modules[(layer, m)] = (a, b if ratio == 1.0 else [[v * ratio for v in row] for row in b])
    rank = max((len(a) for a, _ in modules.values()), default=0)
    return AdapterImage(rank=rank, scaling=s, modules=modules)


def default_provider(source: str, dims: Any) -> AdapterImage:
    if source == "gen" or source.startswith("gen:"):
        return image_from_gen(source, dims)
    return image_from_peft(source, dims)


# The base model and gen sources are deterministic, so caching their identities is exact (PEFT
# directories are read again at every load: their files may change).
_EXACT_IDENTS: dict[tuple[Any, ...], int] = {}


# -- the oracle ----------------------------------------------------------------------------------
@dataclass
class _Req:
    adapter: str | None
    ident: int | None  # None: the oracle cannot derive this adapter (its tokens are not checked)
    tokens: list[int]
    acc: Accumulator | None


@dataclass
class TokenOracle:
    """Follows ops and events; `observe` returns a ``tokens``/``T1`` violation per wrong `Decoded`.

    ``dims``: the network's `ModelDims`; the rest as in `RuntimeConfig`. Mutated by `observe` only.
    """

    dims: Any
    max_lora_rank: int
    tp_size: int = 1
    dtype: str = "float32"
    provider: Callable[[str, Any], AdapterImage] = default_provider
    idents: dict[str, int | None] = field(default_factory=dict)  # registered adapter -> identity
    sessions: dict[str, tuple[int, ...]] = field(default_factory=dict)  # open session -> last saved turn
    reqs: dict[str, _Req] = field(default_factory=dict)
    checked: int = 0
    unchecked: int = 0

    @classmethod
    def for_config(cls, cfg: Any, dims: Any, **kw: Any) -> TokenOracle:
        return cls(dims, cfg.max_lora_rank, cfg.tp_size, cfg.dtype, **kw)

    def identity(self, source: str | None) -> int | None:
        """The identity of the slot that must hold ``source`` (None: the base model)."""
        key = (source, self.dims, self.max_lora_rank, self.tp_size, self.dtype, self.provider)
        if key in _EXACT_IDENTS:
            return _EXACT_IDENTS[key]
        if source is None:
            ident = identity_of(*slot_contents(None, self.dims, self.max_lora_rank, self.tp_size, self.dtype))
            _EXACT_IDENTS[key] = ident
            return ident
        gen = source == "gen" or source.startswith("gen:")
        try:
            image = self.provider(source, self.dims)
        except OracleUnsupported:
            return None
        ident = identity_of(*slot_contents(image, self.dims, self.max_lora_rank, self.tp_size, self.dtype))
        if gen:
            _EXACT_IDENTS[key] = ident
        return ident

    def observe(self, op: Op, events: Sequence[E.Event]) -> list[Violation]:
        out: list[Violation] = []
        ended: list[str] = []
        for ev in events:
            if isinstance(ev, E.AdapterRegistered) and isinstance(op, LoadAdapter) and op.name == ev.name:
                self.idents[ev.name] = self.identity(op.source)
            elif isinstance(ev, E.AdapterUnregistered):
                self.idents.pop(ev.name, None)
            elif isinstance(ev, E.Queued):
                self._queue(op, ev)
            elif isinstance(ev, E.Decoded):
                v = self._decoded(ev)
                if v is not None:
                    out.append(v)
            elif isinstance(ev, E.SessionOpened):
                self.sessions[ev.session_id] = ()
            elif isinstance(ev, E.SessionSaved) and ev.rid in self.reqs:
                self.sessions[ev.session_id] = tuple(self.reqs[ev.rid].tokens)
            elif isinstance(ev, E.SessionClosed):
                self.sessions.pop(ev.session_id, None)
            elif isinstance(ev, (E.Finished, E.Aborted)):
                ended.append(ev.rid)
        for rid in ended:
            self.reqs.pop(rid, None)
        return out

    def _queue(self, op: Op, ev: E.Queued) -> None:
        prompt = tuple(getattr(op, "prompt", ()))
        history = self.sessions.get(ev.session_id, ()) if ev.session_id is not None else ()
        if ev.adapter is None:
            ident = self.identity(None)
        else:
            ident = self.idents.get(ev.adapter)
        tokens = [*history, *prompt]
        acc = None if ident is None else Accumulator(ident)
        if acc is not None:
            acc.extend(tokens)
        self.reqs[ev.rid] = _Req(ev.adapter, ident, tokens, acc)

    def _decoded(self, ev: E.Decoded) -> Violation | None:
        req = self.reqs.get(ev.rid)
        if req is None:
            return None  # not a request this oracle saw queued; the reference model judges that
        pos = len(req.tokens)
        req.tokens.append(ev.token)
        if req.acc is None:
            self.unchecked += 1
            return None
        want = req.acc.next_token()
        req.acc.extend([ev.token])
        self.checked += 1
        if want == ev.token:
            return None
        return Violation(
            "tokens",
            "T1",
            f"{ev.rid} (adapter {req.adapter!r}) decoded {ev.token} at position {pos}, expected {want} "
            f"from its {pos}-token history and adapter contents",
            (ev.rid,),
        )
