"""LoRA adapters: PEFT loading with validation, deterministic generation, and PEFT writing.

`LoraAdapter.weights[layer][g] = (A, B)` is the host copy in the stacked layout of
`LoraBuffers`, for a group ``g`` with ``S`` slices, output sizes ``outs`` and adapter rank
``r`` (the max rank over its modules):

* ``A [S*r, in]``: rows ``i*r : i*r + r_m`` hold module ``m``'s ``lora_A`` (``[r_m, in]``);
* ``B [sum(outs), r]``: rows ``off_i : off_i + outs[i]``, columns ``0 : r_m`` hold module
  ``m``'s ``lora_B * (s_m / s)``, where ``s_m`` is the module's PEFT scaling and ``s`` the
  adapter's (``alpha/r``, or ``alpha/sqrt(r)`` with rsLoRA).

Invariants: everything else is exactly zero (rank tails, untargeted modules and layers), so
``s * (x A_i^T) B_i^T`` equals PEFT's delta for each module; loading touches no pool and
never unpickles. Every refusal is an `AdapterError` subclass naming the file, tensor or field.
"""

from __future__ import annotations

import errno
import functools
import io
import json
import math
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import safetensors.torch
import torch

from lorainv.errors import (
    AdapterConfigError,
    AdapterFormatError,
    AdapterNotFoundError,
    AdapterNumericError,
    AdapterRankError,
    AdapterShapeError,
    UnsupportedAdapterError,
)
from lorainv.impl.dims import GROUPS, MODULE_GROUP, TARGET_MODULES, ModelDims

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"
_PARENT = {m: ("self_attn" if MODULE_GROUP[m] in ("qkv", "o") else "mlp") for m in TARGET_MODULES}
_TENSOR_RE = re.compile(r"base_model\.model\.(model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+))\.lora_([AB])\.weight")
# Config fields whose non-default value changes the math: serving them would silently be wrong.
_REFUSED: dict[str, Any] = {"use_dora": False, "fan_in_fan_out": False, "modules_to_save": None}
_REFUSED.update({"layers_to_transform": None})
_REFUSED.update({"layers_pattern": None, "target_parameters": None, "lora_bias": False, "bias": "none"})
_REFUSED.update({"exclude_modules": None, "trainable_token_indices": None, "layer_replication": None})

Key = tuple[int, str]  # (layer, module)


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no boolean equality; identity is the meaning
class LoraAdapter:
    """A validated adapter in the stacked host layout (see the module docstring).

    Immutable as objects: the dataclass is frozen and each layer's group map is read-only, so
    an adapter object always holds the same tensor objects (the snapshotter relies on this to
    key its pinned-cache memo by adapter identity). The tensors' values are not frozen."""

    name: str
    rank: int
    scaling: float
    target_modules: frozenset[str]
    weights: tuple[Mapping[str, tuple[torch.Tensor, torch.Tensor]], ...]

    def nbytes(self) -> int:
        """Host bytes of all stacked A and B tensors."""
        return sum(t.numel() * t.element_size() for layer in self.weights for ab in layer.values() for t in ab)


def module_name(layer: int, module: str) -> str:
    """PEFT's module key, e.g. ``model.layers.0.self_attn.q_proj``."""
    return f"model.layers.{layer}.{_PARENT[module]}.{module}"


def tensor_name(layer: int, module: str, which: str) -> str:
    """PEFT's saved tensor name, e.g. ``base_model.model.model.layers.0.mlp.up_proj.lora_B.weight``."""
    return f"base_model.model.{module_name(layer, module)}.lora_{which}.weight"


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """PEFT's scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _model_module_names(dims: ModelDims) -> dict[str, Key | None]:
    """Every named module of a Llama model -> (layer, module) for LoRA-able linears, else None."""
    names: dict[str, Key | None] = dict.fromkeys(("model", "model.embed_tokens", "model.layers"))
    for i in range(dims.num_layers):
        p = f"model.layers.{i}"
        names.update(dict.fromkeys((p, f"{p}.self_attn", f"{p}.mlp", f"{p}.mlp.act_fn")))
        names.update(dict.fromkeys((f"{p}.input_layernorm", f"{p}.post_attention_layernorm")))
        names.update({module_name(i, m): (i, m) for m in TARGET_MODULES})
    names.update(dict.fromkeys(("model.norm", "model.rotary_emb", "lm_head")))
    return names


MAX_REGEX_LEN = 1000


def _compile_safe(pattern: str, where: str) -> re.Pattern[str]:
    """Compile a regex from an adapter config, refusing the shapes that backtrack exponentially.

    Python's ``re`` has no timeout, so a hostile ``target_modules`` such as ``(a+)+$`` would
    hang the loader. Refused: patterns over `MAX_REGEX_LEN` characters, and an unbounded
    repeat (``*``, ``+``, ``{n,}``) around another unbounded repeat or an alternation.
    PEFT's usual patterns (``.*\\.(q_proj|v_proj)``, ``model\\.layers\\.\\d+\\..*``) pass.
    """
    if len(pattern) > MAX_REGEX_LEN:
        raise AdapterConfigError(f"{where}: regex of {len(pattern)} characters (at most {MAX_REGEX_LEN})")
    try:
        rx = re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise AdapterConfigError(f"{where}: invalid regex {pattern!r}: {e}") from None
    if _nested_repeat(pattern):
        raise AdapterConfigError(
            f"{where}: regex {pattern!r} repeats a repeat or an alternation (like (a+)+ or (a|b)*), "
            "which can backtrack exponentially; write it without the nesting"
        )
    return rx


def _nested_repeat(pattern: str) -> bool:
    try:
        from re import _parser as sre  # type: ignore[attr-defined,unused-ignore]  # CPython >= 3.11
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_parse as sre  # type: ignore[no-redef,unused-ignore]
    repeats = {sre.MAX_REPEAT, sre.MIN_REPEAT, getattr(sre, "POSSESSIVE_REPEAT", sre.MAX_REPEAT)}

    def walk(items: Any, under_star: bool) -> bool:
        for op, av in items:
            if op in repeats:
                star = av[1] == sre.MAXREPEAT
                if (star and under_star) or walk(av[2], under_star or star):
                    return True
            elif op == sre.BRANCH:
                if under_star or any(walk(b, under_star) for b in av[1]):
                    return True
            elif op == sre.SUBPATTERN:
                if walk(av[-1], under_star):
                    return True
            elif op in (sre.ASSERT, sre.ASSERT_NOT) and walk(av[1], under_star):
                return True
        return False

    return walk(sre.parse(pattern), False)


def match_targets(target_modules: Any, dims: ModelDims, where: str = "target_modules") -> set[Key]:
    """(layer, module) pairs PEFT would wrap: a list matches a name or a ``.``-suffix, a str is a full-match regex."""
    names = _model_module_names(dims)
    supported = f"supported: {list(TARGET_MODULES)}"
    if isinstance(target_modules, str):
        rx = _compile_safe(target_modules, where)
        hits = [n for n in names if rx.fullmatch(n)]
        if not hits:
            raise AdapterConfigError(f"{where}: regex {target_modules!r} matches no module of the base model")
        groups = [(target_modules, hits)]
    elif isinstance(target_modules, (list, tuple, set, frozenset)) and target_modules:
        groups = []
        for t in sorted(target_modules) if isinstance(target_modules, (set, frozenset)) else target_modules:
            if not isinstance(t, str):
                raise AdapterConfigError(f"{where}: entries must be strings, got {t!r}")
            hits = [n for n in names if n == t or n.endswith("." + t)]
            if not hits:
                raise UnsupportedAdapterError(f"{where}: unknown module {t!r} (no such module); {supported}")
            groups.append((t, hits))
    else:
        raise AdapterConfigError(f"{where} must be a non-empty list of module names or a regex string")
    out: set[Key] = set()
    for t, hits in groups:
        bad = [n for n in hits if names[n] is None]
        if bad:
            raise UnsupportedAdapterError(f"{where}: {t!r} targets {bad[0]!r}, which lorainv cannot serve; {supported}")
        out.update(names[n] for n in hits)  # type: ignore[misc]
    return out


def _pattern_value(pattern: Mapping[str, Any], name: str, field: str) -> tuple[str, Any] | None:
    """First key of ``pattern`` matching ``name`` like PEFT's ``(.*\\.)?(key)$``, with its value."""
    for k, v in pattern.items():
        _compile_safe(k, f"{field} key")
        if re.match(rf"(.*\.)?({k})$", name):
            return k, v
    return None


@dataclass(frozen=True)
class _Spec:
    """The parsed config: default ``r``/``alpha`` and each targeted module's ``(r_m, alpha_m)``."""

    r: int
    alpha: float
    use_rslora: bool
    modules: dict[Key, tuple[int, float]]


def _number(v: Any, field: str, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise AdapterConfigError(f"{where}: {field} must be a finite number, got {v!r}")
    return float(v)


def _rank(v: Any, field: str, where: str, max_lora_rank: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise AdapterConfigError(f"{where}: {field} must be an int, got {v!r}")
    if v < 1:
        raise AdapterRankError(f"{where}: {field}={v} must be >= 1")
    if v > max_lora_rank:
        raise AdapterRankError(f"{where}: {field}={v} exceeds max_lora_rank={max_lora_rank}; raise max_lora_rank")
    return v


def _parse_config(cfg: Any, dims: ModelDims, max_lora_rank: int, where: str) -> _Spec:
    if not isinstance(cfg, dict):
        raise AdapterConfigError(f"{where}: must hold a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UnsupportedAdapterError(f"{where}: peft_type={cfg['peft_type']!r}; only LORA adapters are served")
    for field, default in _REFUSED.items():
        v = cfg.get(field, default)
        if v != default and v not in (None, [], {}, False):
            raise UnsupportedAdapterError(f"{where}: {field}={v!r} is not supported (expected {default!r})")
    r = _rank(cfg.get("r", 8), "r", where, 1 << 30)  # checked against the limit per module below
    alpha = _number(cfg.get("lora_alpha", 8), "lora_alpha", where)
    rslora = cfg.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise AdapterConfigError(f"{where}: use_rslora must be a bool, got {rslora!r}")
    if "target_modules" not in cfg or cfg["target_modules"] is None:
        raise AdapterConfigError(f"{where}: target_modules is missing; list the modules the adapter targets")
    targets = match_targets(cfg["target_modules"], dims, f"{where}: target_modules")
    patterns = {}
    for field in ("rank_pattern", "alpha_pattern"):
        p = cfg.get(field) or {}
        if not isinstance(p, dict):
            raise AdapterConfigError(f"{where}: {field} must be an object, got {p!r}")
        patterns[field] = p
    modules: dict[Key, tuple[int, float]] = {}
    for key in sorted(targets):
        name = module_name(*key)
        r_hit = _pattern_value(patterns["rank_pattern"], name, "rank_pattern")
        a_hit = _pattern_value(patterns["alpha_pattern"], name, "alpha_pattern")
        r_field, r_val = ("r", r) if r_hit is None else (f"rank_pattern[{r_hit[0]!r}]", r_hit[1])
        r_m = _rank(r_val, r_field, where, max_lora_rank)
        a_m = alpha if a_hit is None else _number(a_hit[1], f"alpha_pattern[{a_hit[0]!r}]", where)
        modules[key] = (r_m, a_m)
    return _Spec(r, alpha, rslora, modules)


def _assemble(
    name: str, dims: ModelDims, spec: _Spec, tensors: Mapping[Key, tuple[torch.Tensor, torch.Tensor]], dtype
) -> LoraAdapter:
    """Stack per-module (A, B) into the group layout; B folds ``s_m / s`` (exact when it is 1)."""
    if not isinstance(name, str) or not name:
        raise AdapterConfigError(f"adapter name must be a non-empty string, got {name!r}")
    rank = max(r_m for r_m, _ in spec.modules.values())
    s = lora_scaling(spec.alpha, spec.r, spec.use_rslora)
    if s == 0.0:  # alpha 0: keep the slot factor at 1 and fold each module's (zero) scaling into B
        s = 1.0
    layers = []
    for layer in range(dims.num_layers):
        groups = {}
        for g, mods in GROUPS.items():
            outs = dims.group_out_sizes(g)
            a = torch.zeros(len(mods) * rank, dims.group_in(g), dtype=dtype)
            b = torch.zeros(sum(outs), rank, dtype=dtype)
            off = 0
            for i, (m, out) in enumerate(zip(mods, outs)):
                if (layer, m) in tensors:
                    r_m, a_m = spec.modules[(layer, m)]
                    ta, tb = tensors[(layer, m)]
                    ratio = lora_scaling(a_m, r_m, spec.use_rslora) / s
                    a[i * rank : i * rank + r_m] = ta.to(dtype)
                    b[off : off + out, :r_m] = tb.to(dtype) if ratio == 1.0 else (tb.double() * ratio).to(dtype)
                off += out
            groups[g] = (a, b)
        layers.append(MappingProxyType(groups))
    targeted = frozenset(m for _, m in tensors)
    return LoraAdapter(name=name, rank=rank, scaling=s, target_modules=targeted, weights=tuple(layers))


def _read_bytes(path: Path, what: str) -> bytes:
    """A regular file's bytes. Opened non-blocking and checked with fstat before reading, so a
    FIFO, a device (``/dev/zero``) or a directory is refused at once instead of hanging."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise AdapterNotFoundError(f"{path}: {what} is missing") from None
    except OSError as e:
        why = "symlink loop" if e.errno == errno.ELOOP else (e.strerror or type(e).__name__)
        raise AdapterFormatError(f"{path}: cannot read {what}: {why}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise AdapterFormatError(f"{path}: cannot read {what}: not a regular file")
        with os.fdopen(fd, "rb") as f:
            fd = -1
            return f.read()
    except OSError as e:
        raise AdapterFormatError(f"{path}: cannot read {what}: {e.strerror or type(e).__name__}") from None
    finally:
        if fd >= 0:
            os.close(fd)


def _load_tensors(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    st, pt = directory / SAFETENSORS_FILE, directory / BIN_FILE
    if os.path.lexists(st) or not os.path.lexists(pt):
        data = _read_bytes(st, SAFETENSORS_FILE)
        try:
            return safetensors.torch.load(data), st
        except Exception as e:  # SafetensorError, or a header that lies about sizes
            raise AdapterFormatError(f"{st}: not a valid safetensors file ({e})") from None
    data = _read_bytes(pt, BIN_FILE)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise AdapterFormatError(f"{pt}: refused: not loadable with weights_only=True, never unpickled ({e})") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise AdapterFormatError(f"{pt}: must hold a dict of tensor name -> tensor")
    return obj, pt


def _check_tensors(
    raw: Mapping[str, torch.Tensor], spec: _Spec, dims: ModelDims, fname: Path
) -> dict[Key, tuple[torch.Tensor, torch.Tensor]]:
    found: dict[tuple[int, str, str], torch.Tensor] = {}
    for tname in sorted(raw):
        m = _TENSOR_RE.fullmatch(tname)
        key = (int(m.group(2)), m.group(4)) if m else (-1, "")
        if not (m and key[1] in _PARENT and key[0] < dims.num_layers and m.group(1) == module_name(*key)):
            raise AdapterShapeError(f"{fname}: unknown tensor {tname!r} (not a LoRA weight of a Llama linear)")
        if key not in spec.modules:
            raise AdapterShapeError(f"{fname}: extra tensor {tname!r}: its module is not in target_modules")
        t = raw[tname]
        if not t.is_floating_point():
            raise AdapterShapeError(f"{fname}: tensor {tname!r} has dtype {t.dtype}; expected a float dtype")
        r_m = spec.modules[key][0]
        fan_in, fan_out = dims.module_shape(key[1])
        want = (r_m, fan_in) if m.group(5) == "A" else (fan_out, r_m)
        if tuple(t.shape) != want:
            raise AdapterShapeError(f"{fname}: tensor {tname!r} has shape {tuple(t.shape)}; expected {want}")
        if not bool(torch.isfinite(t.float()).all()):  # float(): isfinite lacks some float8 kernels
            raise AdapterNumericError(f"{fname}: tensor {tname!r} holds NaN or Inf")
        found[(key[0], key[1], m.group(5))] = t
    out = {}
    for layer, mod in sorted(spec.modules):
        for which in "AB":
            if (layer, mod, which) not in found:
                raise AdapterShapeError(f"{fname}: missing tensor {tensor_name(layer, mod, which)!r} (module targeted)")
        out[(layer, mod)] = (found[(layer, mod, "A")], found[(layer, mod, "B")])
    return out


def load_peft_adapter(
    name: str, path: str | os.PathLike, dims: ModelDims, *, max_lora_rank: int, dtype: torch.dtype
) -> LoraAdapter:
    """Load and validate a PEFT LoRA directory (``adapter_config.json`` + weights); pure, no pool."""
    directory = Path(path)
    try:
        os.stat(directory)
    except FileNotFoundError:
        raise AdapterNotFoundError(f"{directory}: adapter directory not found") from None
    except OSError as e:
        raise AdapterFormatError(f"{directory}: cannot open adapter directory: {e.strerror}") from None
    except ValueError as e:  # an embedded NUL byte or an unencodable character: no such path can exist
        raise AdapterNotFoundError(f"{str(directory)!r}: not a valid adapter directory path ({e})") from None
    if not directory.is_dir():
        raise AdapterNotFoundError(f"{directory}: not a directory; pass the adapter's directory")
    cfg_path = directory / CONFIG_FILE
    text = _read_bytes(cfg_path, CONFIG_FILE)
    try:
        cfg = json.loads(text)
    except (ValueError, RecursionError) as e:  # also: too deeply nested, or an int with too many digits
        raise AdapterFormatError(f"{cfg_path}: invalid JSON: {e}") from None
    spec = _parse_config(cfg, dims, max_lora_rank, str(cfg_path))
    raw, fname = _load_tensors(directory)
    return _assemble(name, dims, spec, _check_tensors(raw, spec, dims, fname), dtype)


def _random_modules(dims: ModelDims, spec: _Spec, seed: int) -> dict[Key, tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic float32 (A, B) per targeted module from ``seed``; B ~ 0.1 so outputs visibly move."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(dims.num_layers):
        for m in TARGET_MODULES:
            if (layer, m) in spec.modules:
                r_m = spec.modules[(layer, m)][0]
                fan_in, fan_out = dims.module_shape(m)
                a = torch.randn(r_m, fan_in, generator=gen) / math.sqrt(fan_in)
                out[(layer, m)] = (a, torch.randn(fan_out, r_m, generator=gen) * 0.1)
    return out


def _gen_spec(dims, rank, alpha, target_modules, use_rslora, rank_pattern=None, alpha_pattern=None) -> _Spec:
    if isinstance(target_modules, Iterable) and not isinstance(target_modules, str):
        target_modules = list(target_modules)
    cfg = {"r": rank, "lora_alpha": float(rank) if alpha is None else alpha, "use_rslora": use_rslora}
    cfg.update(target_modules=target_modules, rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {})
    return _parse_config(cfg, dims, max_lora_rank=1 << 30, where="generated adapter")


def generate_adapter(
    name: str,
    dims: ModelDims,
    *,
    rank: int,
    seed: int,
    dtype: torch.dtype,
    alpha: float | None = None,
    target_modules: Iterable[str] | str = TARGET_MODULES,
    use_rslora: bool = False,
) -> LoraAdapter:
    """An in-memory adapter, deterministic from ``seed``; ``alpha`` defaults to ``rank`` (scaling 1).

    Equal to ``load_peft_adapter`` of ``write_peft_adapter`` with the same arguments.
    """
    targets: Any = target_modules
    if isinstance(target_modules, Iterable) and not isinstance(target_modules, str):
        targets = tuple(target_modules)  # hashable, for the cache; anything else _gen_spec refuses by name
    try:
        hash((dims, rank, seed, alpha, targets, use_rslora))
    except TypeError:  # not a cache key; _gen_spec names what is wrong
        spec = _gen_spec(dims, rank, alpha, targets, use_rslora)
        return _assemble(name, dims, spec, _random_modules(dims, spec, seed), dtype)
    spec, modules = _generated(dims, rank, seed, alpha, targets, use_rslora)
    return _assemble(name, dims, spec, modules, dtype)


@functools.lru_cache(maxsize=64)
def _generated(
    dims: ModelDims, rank: int, seed: int, alpha: float | None, targets: tuple[str, ...] | str, use_rslora: bool
) -> tuple[_Spec, dict[Key, tuple[torch.Tensor, torch.Tensor]]]:
    """The parsed spec and the random (A, B) of a generated adapter, built once per argument
    tuple (a fuzz run loads the same few sources hundreds of times). Read-only to callers:
    `_assemble` copies every tensor into fresh stacked ones, so no two loads share a tensor."""
    spec = _gen_spec(dims, rank, alpha, targets, use_rslora)
    return spec, _random_modules(dims, spec, seed)


def write_peft_adapter(
    path: str | os.PathLike,
    dims: ModelDims,
    *,
    rank: int,
    seed: int,
    alpha: float | None = None,
    target_modules: Iterable[str] | str = TARGET_MODULES,
    use_rslora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a PEFT LoRA directory (config keys and tensor names as PEFT saves them); returns it."""
    rp, ap = dict(rank_pattern or {}), dict(alpha_pattern or {})
    spec = _gen_spec(dims, rank, alpha, target_modules, use_rslora, rp, ap)
    tensors = {}
    for (layer, m), (a, b) in _random_modules(dims, spec, seed).items():
        tensors[tensor_name(layer, m, "A")] = a.to(dtype).contiguous()
        tensors[tensor_name(layer, m, "B")] = b.to(dtype).contiguous()
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tm = target_modules if isinstance(target_modules, str) else sorted(set(target_modules))
    cfg: dict[str, Any] = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None}
    cfg["inference_mode"] = True
    cfg.update(r=rank, lora_alpha=spec.alpha, lora_dropout=0.0, target_modules=tm, use_rslora=use_rslora)
    cfg.update(rank_pattern=rp, alpha_pattern=ap, init_lora_weights=True, **_REFUSED)
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    safetensors.torch.save_file(tensors, str(out / SAFETENSORS_FILE), metadata={"format": "pt"})
    return out


class GenSource(tuple[int, int]):
    """A parsed ``gen:`` source: ``(rank, seed)`` plus ``alpha`` (None: the rank, so scaling 1)
    and ``use_rslora``.

    It is the pair ``(rank, seed)`` (so ``rank, seed = parse_gen_source(s)`` keeps working and
    compares equal to that pair); ``alpha`` and ``use_rslora`` are attributes. A caller that
    builds the adapter must pass them too: `GenSource.build` does.
    """

    alpha: float | None
    use_rslora: bool

    def __new__(cls, rank: int, seed: int, alpha: float | None = None, use_rslora: bool = False) -> GenSource:
        self = super().__new__(cls, (rank, seed))
        self.alpha = alpha
        self.use_rslora = use_rslora
        return self

    @property
    def rank(self) -> int:
        return self[0]

    @property
    def seed(self) -> int:
        return self[1]

    def build(self, name: str, dims: ModelDims, dtype: torch.dtype) -> LoraAdapter:
        """The adapter this source describes (`generate_adapter` with every parsed field)."""
        return generate_adapter(
            name, dims, rank=self.rank, seed=self.seed, dtype=dtype, alpha=self.alpha, use_rslora=self.use_rslora
        )

    def __repr__(self) -> str:
        return f"GenSource(rank={self.rank}, seed={self.seed}, alpha={self.alpha}, use_rslora={self.use_rslora})"


_GEN_SYNTAX = "gen:<rank>:<seed>[:<alpha>[:rs]]"
# at most 20 digits: a seed must fit torch's 64-bit generator seed (and int() has a digit limit);
# alpha is a plain decimal (no sign, exponent, inf or nan) so every accepted value is finite and >= 0
_GEN_RE = re.compile(r"gen:(\d{1,20}):(\d{1,20})(?::(\d{1,9}(?:\.\d{1,9})?)(:rs)?)?")


def parse_gen_source(source: str) -> GenSource | None:
    """``"gen:<rank>:<seed>[:<alpha>[:rs]]"`` -> `GenSource`; None when ``source`` is not a gen source.

    ``alpha`` defaults to the rank (scaling 1); ``:rs`` selects rsLoRA scaling
    (``alpha / sqrt(rank)``). A malformed gen source is an `AdapterConfigError`. Pure: no
    state is read or written.
    """
    if source != "gen" and not source.startswith("gen:"):
        return None
    m = _GEN_RE.fullmatch(source)
    if m is None or int(m[1]) < 1 or int(m[2]) >= 1 << 64:
        shown = source if len(source) <= 80 else source[:77] + "..."
        raise AdapterConfigError(
            f"adapter source {shown!r}: expected '{_GEN_SYNTAX}' with rank >= 1, 0 <= seed < 2**64, "
            "alpha a decimal >= 0"
        )
    alpha = None if m[3] is None else float(m[3])
    return GenSource(int(m[1]), int(m[2]), alpha, m[4] is not None)
