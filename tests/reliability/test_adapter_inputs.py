"""Malformed PEFT adapter directories, through `Engine.load_adapter` on a live engine.

Every refusal must be an `AdapterError` subclass whose message names the culprit (the file,
the tensor or the config field), and must leave the engine exactly as it was: the snapshot
(free indices, requests, sessions, LoRA maps, loads in flight, registered adapters, ...)
equals the one taken before the attempt, and every checker is clean. The engines have
requests in flight in every state (decoding, mid chunked prefill, waiting on a load whose
copies are pending, a waiting session turn) and run at strict level 2.

`tests/unit/test_adapters.py` pins the loader's refusal reasons one by one; here the same
kinds of damage (and more: FIFOs, devices, NUL bytes, deep JSON) go through the engine, and a
Hypothesis suite mutates a valid directory at random (drop/rename/reshape/retype/poison
tensors, flip or truncate bytes, edit or delete config fields).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from reliability_util import live_engine, no_hang, state_of

from lorainv import Engine
from lorainv.checkers.liveness import drain_to_idle
from lorainv.errors import (
    AdapterConfigError,
    AdapterError,
    AdapterFormatError,
    AdapterNotFoundError,
    AdapterNumericError,
    AdapterRankError,
    AdapterShapeError,
    LorainvError,
    UnsupportedAdapterError,
)
from lorainv.events import AdapterRegistered, Rejected
from lorainv.impl.adapters import BIN_FILE, CONFIG_FILE, SAFETENSORS_FILE, tensor_name, write_peft_adapter
from lorainv.impl.dims import ModelDims
from lorainv.ops import LoadAdapter

TARGETS = ["q_proj", "v_proj", "down_proj"]
RANK = 4


def write_valid(path: Path, dims: ModelDims, rank: int = RANK) -> Path:
    return write_peft_adapter(path, dims, rank=rank, seed=3, target_modules=TARGETS)


def edit_config(d: Path, **changes: Any) -> None:
    cfg = json.loads((d / CONFIG_FILE).read_text())
    cfg.update(changes)
    (d / CONFIG_FILE).write_text(json.dumps(cfg))


def edit_tensors(d: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    t = safetensors.torch.load_file(str(d / SAFETENSORS_FILE))
    fn(t)
    safetensors.torch.save_file(t, str(d / SAFETENSORS_FILE))


# -- the table: (name, damage, error class); damage(dir, dims) -> (path to load, needles) ------
Damage = Callable[[Path, ModelDims], tuple[str, list[str]]]


def _missing_config(d: Path, dims: ModelDims) -> tuple[str, list[str]]:
    (d / CONFIG_FILE).unlink()
    return str(d), [str(d / CONFIG_FILE), "missing"]


def _missing_weights(d: Path, dims: ModelDims) -> tuple[str, list[str]]:
    (d / SAFETENSORS_FILE).unlink()
    return str(d), [str(d / SAFETENSORS_FILE), "missing"]


def _missing_dir(d: Path, dims: ModelDims) -> tuple[str, list[str]]:
    return str(d / "nope"), [str(d / "nope"), "not found"]


def _file_not_dir(d: Path, dims: ModelDims) -> tuple[str, list[str]]:
    return str(d / CONFIG_FILE), [str(d / CONFIG_FILE), "not a directory"]


def _nul_in_path(d: Path, dims: ModelDims) -> tuple[str, list[str]]:
    return str(d) + "\x00x", ["not a valid adapter directory path", "null byte"]


def _truncated(d: Path, dims: ModelDims) -> tuple[str, list[str]]:
    data = (d / SAFETENSORS_FILE).read_bytes()
    (d / SAFETENSORS_FILE).write_bytes(data[: len(data) - 7])
    return str(d), [str(d / SAFETENSORS_FILE), "not a valid safetensors"]


def _empty_weights(d: Path, dims: ModelDims) -> tuple[str, list[str]]:
    (d / SAFETENSORS_FILE).write_bytes(b"")
    return str(d), [str(d / SAFETENSORS_FILE), "not a valid safetensors"]


def _int_dtype(d: Path, dims: ModelDims) -> tuple[str, list[str]]:
    name = tensor_name(0, "v_proj", "B")
    edit_tensors(d, lambda t: t.__setitem__(name, t[name].to(torch.int32)))
    return str(d), [str(d / SAFETENSORS_FILE), repr(name), "torch.int32"]


def _wrong_shape(d: Path, dims: ModelDims) -> tuple[str, list[str]]:
    name = tensor_name(0, "down_proj", "A")
    edit_tensors(d, lambda t: t.__setitem__(name, torch.zeros(RANK, dims.intermediate_size + 1)))
    return str(d), [repr(name), "shape", f"expected {(RANK, dims.intermediate_size)}"]


def _transposed(d: Path, dims: ModelDims) -> tuple[str, list[str]]:
    name = tensor_name(0, "q_proj", "B")
    edit_tensors(d, lambda t: t.__setitem__(name, t[name].T.contiguous()))
    return str(d), [repr(name), "shape"]


def _extra_tensor(d: Path, dims: ModelDims) -> tuple[str, list[str]]:
    name = tensor_name(0, "k_proj", "A")  # a real Llama linear, but not in target_modules
    edit_tensors(d, lambda t: t.__setitem__(name, torch.zeros(RANK, dims.hidden_size)))
    return str(d), ["extra tensor", repr(name)]


def _unknown_tensor(d: Path, dims: ModelDims) -> tuple[str, list[str]]:
    name = "base_model.model.model.embed_tokens.lora_embedding_A"
    edit_tensors(d, lambda t: t.__setitem__(name, torch.zeros(RANK, 8)))
    return str(d), ["unknown tensor", repr(name)]


def _missing_tensor(d: Path, dims: ModelDims) -> tuple[str, list[str]]:
    name = tensor_name(0, "v_proj", "A")
    edit_tensors(d, lambda t: t.pop(name))
    return str(d), ["missing tensor", repr(name)]


def _poison(value: float) -> Damage:
    def damage(d: Path, dims: ModelDims) -> tuple[str, list[str]]:
        name = tensor_name(0, "down_proj", "B")

        def put(t: dict[str, torch.Tensor]) -> None:
            t[name][-1, -1] = value

        edit_tensors(d, put)
        return str(d), [repr(name), "NaN or Inf"]

    return damage


def _config_edit(needles: list[str], **changes: Any) -> Damage:
    def damage(d: Path, dims: ModelDims) -> tuple[str, list[str]]:
        edit_config(d, **changes)
        return str(d), [str(d / CONFIG_FILE), *needles]

    return damage


def _rank_over_limit(d: Path, dims: ModelDims) -> tuple[str, list[str]]:
    shutil.rmtree(d)
    write_valid(d, dims, rank=32)  # consistent files, but r=32 > max_lora_rank=16
    return str(d), [str(d / CONFIG_FILE), "r=32", "max_lora_rank=16"]


def _raw_config(text: str, needles: list[str]) -> Damage:
    def damage(d: Path, dims: ModelDims) -> tuple[str, list[str]]:
        (d / CONFIG_FILE).write_text(text)
        return str(d), [str(d / CONFIG_FILE), *needles]

    return damage


def _symlink_loop(d: Path, dims: ModelDims) -> tuple[str, list[str]]:
    (d / CONFIG_FILE).unlink()
    os.symlink(d / CONFIG_FILE, d / CONFIG_FILE)
    return str(d), [str(d / CONFIG_FILE), "symlink loop"]


def _unreadable(d: Path, dims: ModelDims) -> tuple[str, list[str]]:
    cfg = d / CONFIG_FILE
    cfg.chmod(0)
    try:
        with open(cfg, "rb"):
            readable = True
    except PermissionError:
        readable = False
    if readable:
        # Running as root (or with CAP_DAC_OVERRIDE): mode 000 does not block reads. Use another
        # unreadable form instead: a FIFO with no writer, whose plain open() would block forever.
        cfg.unlink()
        os.mkfifo(cfg)
        return str(d), [str(cfg), "cannot read", "not a regular file"]
    return str(d), [str(cfg), "cannot read", "Permission denied"]


def _fifo_weights(d: Path, dims: ModelDims) -> tuple[str, list[str]]:
    (d / SAFETENSORS_FILE).unlink()
    os.mkfifo(d / SAFETENSORS_FILE)
    return str(d), [str(d / SAFETENSORS_FILE), "not a regular file"]


def _dir_as_config(d: Path, dims: ModelDims) -> tuple[str, list[str]]:
    (d / CONFIG_FILE).unlink()
    (d / CONFIG_FILE).mkdir()
    return str(d), [str(d / CONFIG_FILE), "cannot read"]


def _weights_to_dev_zero(d: Path, dims: ModelDims) -> tuple[str, list[str]]:
    (d / SAFETENSORS_FILE).unlink()
    os.symlink("/dev/zero", d / SAFETENSORS_FILE)  # an endless read unless refused up front
    return str(d), [str(d / SAFETENSORS_FILE), "not a regular file"]


def _pickled_bin(d: Path, dims: ModelDims) -> tuple[str, list[str]]:
    (d / SAFETENSORS_FILE).unlink()
    torch.save({"x": _Evil()}, d / BIN_FILE)
    return str(d), [str(d / BIN_FILE), "weights_only"]


def _not_utf8(d: Path, dims: ModelDims) -> tuple[str, list[str]]:
    (d / CONFIG_FILE).write_bytes(b'{"r": 4, "peft_type": "\xff\xfe\xfa"}')
    return str(d), [str(d / CONFIG_FILE), "invalid JSON"]


class _Evil:
    ran = False

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Evil.boom, ())

    @staticmethod
    def boom() -> dict[str, Any]:
        _Evil.ran = True
        return {}


@dataclass(frozen=True)
class Case:
    id: str
    damage: Damage
    error: type[AdapterError]


CASES = [
    Case("missing-config", _missing_config, AdapterNotFoundError),
    Case("missing-weights", _missing_weights, AdapterNotFoundError),
    Case("missing-dir", _missing_dir, AdapterNotFoundError),
    Case("file-not-dir", _file_not_dir, AdapterNotFoundError),
    Case("nul-in-path", _nul_in_path, AdapterNotFoundError),
    Case("truncated-safetensors", _truncated, AdapterFormatError),
    Case("empty-safetensors", _empty_weights, AdapterFormatError),
    Case("int-dtype", _int_dtype, AdapterShapeError),
    Case("wrong-shape", _wrong_shape, AdapterShapeError),
    Case("transposed", _transposed, AdapterShapeError),
    Case("extra-tensor", _extra_tensor, AdapterShapeError),
    Case("unknown-tensor", _unknown_tensor, AdapterShapeError),
    Case("missing-tensor", _missing_tensor, AdapterShapeError),
    Case("nan", _poison(math.nan), AdapterNumericError),
    Case("inf", _poison(-math.inf), AdapterNumericError),
    Case("dora", _config_edit(["use_dora=True"], use_dora=True), UnsupportedAdapterError),
    Case("rank-over-limit", _rank_over_limit, AdapterRankError),
    Case(
        "rank-pattern-over-limit",
        _config_edit(["rank_pattern['v_proj']=64"], rank_pattern={"v_proj": 64}),
        AdapterRankError,
    ),
    Case(
        "unknown-target",
        _config_edit(["target_modules", "'qq_proj'"], target_modules=["q_proj", "qq_proj"]),
        UnsupportedAdapterError,
    ),
    Case(
        "regex-matches-nothing",
        _config_edit(["target_modules", "matches no module"], target_modules=r".*\.wq"),
        AdapterConfigError,
    ),
    Case(
        "regex-invalid", _config_edit(["target_modules", "invalid regex"], target_modules="(q_proj"), AdapterConfigError
    ),
    Case(
        "regex-backtracks",
        _config_edit(["target_modules", "backtrack exponentially"], target_modules=r"(\w+)+\.q_proj"),
        AdapterConfigError,
    ),
    Case("target-lm-head", _config_edit(["'lm_head'"], target_modules=["q_proj", "lm_head"]), UnsupportedAdapterError),
    Case("peft-type", _config_edit(["peft_type='PREFIX_TUNING'"], peft_type="PREFIX_TUNING"), UnsupportedAdapterError),
    Case("alpha-string", _config_edit(["lora_alpha"], lora_alpha="8"), AdapterConfigError),
    Case("invalid-json", _raw_config('{"r": 4, "target_modules": [', ["invalid JSON"]), AdapterFormatError),
    Case("json-not-object", _raw_config('"LORA"', ["JSON object"]), AdapterConfigError),
    Case("json-nested-too-deep", _raw_config("[" * 100_000, ["invalid JSON"]), AdapterFormatError),
    Case("json-int-too-long", _raw_config('{"r": ' + "7" * 5000 + "}", ["invalid JSON"]), AdapterFormatError),
    Case("json-not-utf8", _not_utf8, AdapterFormatError),
    Case("symlink-loop", _symlink_loop, AdapterFormatError),
    Case("unreadable-config", _unreadable, AdapterFormatError),
    Case("fifo-weights", _fifo_weights, AdapterFormatError),
    Case("dir-as-config", _dir_as_config, AdapterFormatError),
    Case("weights-dev-zero", _weights_to_dev_zero, AdapterFormatError),
    Case("pickled-bin", _pickled_bin, AdapterFormatError),
]


def attempt_refused(engine: Engine, name: str, path: str, error: type[AdapterError], needles: list[str]) -> str:
    """``engine.load_adapter`` raises exactly ``error`` naming ``needles``; the state is unchanged,
    every checker is clean, and ``apply`` turns the same op into a ``Rejected`` event."""
    before = state_of(engine)
    with no_hang(20), pytest.raises(AdapterError) as info:
        engine.load_adapter(name, path)
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    msg = str(info.value)
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    assert state_of(engine) == before
    assert engine.check() == []
    with no_hang(20):
        events = engine.apply(LoadAdapter(name, path))
    assert events == [Rejected("LoadAdapter", error.__name__, msg)]
    assert state_of(engine) == before
    return msg


def run_case(case: Case, network: str, tmp_path: Path) -> None:
    engine = live_engine(network)
    d = write_valid(tmp_path / "adapter", engine.dims)
    path, needles = case.damage(d, engine.dims)
    attempt_refused(engine, "bad", path, case.error, needles)
    assert not _Evil.ran
    # the engine is still healthy: a good adapter loads under the same name, everything finishes
    good = write_valid(tmp_path / "good", engine.dims)
    assert isinstance(engine.load_adapter("bad", str(good))[0], AdapterRegistered)
    rid = engine.add_request([1, 2, 3], "bad", 3)
    assert drain_to_idle(engine, 400) == []
    assert engine.check() == []
    reasons = {r: engine.request_stats(r)["reason"] for r in engine.requests}
    assert set(reasons.values()) == {"length"}, reasons
    assert len(engine.output(rid)) == 3


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_adapter_refused_on_live_dummy_engine(case: Case, tmp_path: Path) -> None:
    run_case(case, "dummy", tmp_path)


TINY_CASES = [c for c in CASES if c.id in ("wrong-shape", "nan", "dora", "truncated-safetensors", "unreadable-config")]


@pytest.mark.parametrize("case", TINY_CASES, ids=[c.id for c in TINY_CASES])
def test_malformed_adapter_refused_on_live_tiny_engine(case: Case, tmp_path: Path) -> None:
    run_case(case, "tiny", tmp_path)


def test_every_refusal_names_the_adapter_directory(tmp_path: Path) -> None:
    """A user with several adapters must know which one failed: each message above carries the
    path (the NUL-byte case carries its repr), checked here over the whole table at once."""
    engine = live_engine("dummy")
    for i, case in enumerate(CASES):
        d = write_valid(tmp_path / f"ad{i}", engine.dims)
        path, needles = case.damage(d, engine.dims)
        msg = attempt_refused(engine, f"bad{i}", path, case.error, needles)
        shown = path if "\x00" not in path else repr(path)[1:-1]
        assert str(tmp_path / f"ad{i}") in msg or shown in msg, msg


# -- Hypothesis: random damage to a valid directory -------------------------------------------
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float64]
OTHER_DTYPES = [torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool]
FIELDS = [
    "r",
    "lora_alpha",
    "target_modules",
    "peft_type",
    "use_rslora",
    "use_dora",
    "rank_pattern",
    "alpha_pattern",
    "bias",
    "fan_in_fan_out",
    "modules_to_save",
    "layers_to_transform",
    "task_type",
    "lora_dropout",
]
# what a message about each field must mention (the one-letter "r" needs context)
FIELD_NEEDLES = {"r": ["r must", "r=", "rank"]}

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, 2, 4, 8, 16, 17, 64, -1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12),
    st.sampled_from(["q_proj", "v_proj", ".*", "all", "LORA", "IA3", r".*\.q_proj", "(", "gate_proj"]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["q_proj", "v_proj", "x"]), inner, max_size=2)
    ),
    max_leaves=6,
)

mutations = st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 63)),
    st.tuples(
        st.just("rename"),
        st.integers(0, 63),
        st.one_of(
            st.sampled_from(
                [
                    tensor_name(0, "k_proj", "A"),
                    tensor_name(0, "up_proj", "B"),
                    "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight",
                    "base_model.model.lm_head.lora_B.weight",
                    "base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight",
                    "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight",
                ]
            ),
            st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=16),
        ),
    ),
    st.tuples(st.just("reshape"), st.integers(0, 63), st.sampled_from(["grow0", "grow1", "T", "flat", "scalar", "3d"])),
    st.tuples(st.just("retype"), st.integers(0, 63), st.sampled_from(FLOAT_DTYPES + OTHER_DTYPES)),
    st.tuples(
        st.just("poison"), st.integers(0, 63), st.integers(0, 10**6), st.sampled_from([math.nan, math.inf, -math.inf])
    ),
    st.tuples(
        st.just("flip"), st.sampled_from([SAFETENSORS_FILE, CONFIG_FILE]), st.integers(0, 10**9), st.integers(1, 255)
    ),
    st.tuples(st.just("truncate"), st.sampled_from([SAFETENSORS_FILE, CONFIG_FILE]), st.integers(0, 10**9)),
    st.tuples(st.just("set"), st.sampled_from(FIELDS), json_values),
    st.tuples(st.just("del"), st.sampled_from(FIELDS)),
)

OK = "ok"  # the damage is harmless: the adapter must load


def mutate(d: Path, m: tuple[Any, ...]) -> tuple[Any, list[str]]:
    """Apply one mutation; returns (expected error class, OK, or None for "either"), needles (any of)."""
    kind = m[0]
    if kind in ("drop", "rename", "reshape", "retype", "poison"):
        try:
            tensors = safetensors.torch.load_file(str(d / SAFETENSORS_FILE))
        except Exception:  # an earlier mutation already broke the file: nothing more to damage
            return None, [str(d)]
        names = sorted(tensors)
        name = names[m[1] % len(names)]
        t = tensors[name]
        expect: Any = AdapterShapeError
        needles = [repr(name)]
        if kind == "drop":
            del tensors[name]
        elif kind == "rename":
            new = m[2]
            if new in tensors:
                return OK, []
            tensors[new] = tensors.pop(name)
            needles = [repr(name), repr(new)]
        elif kind == "reshape":
            tensors[name] = {
                "grow0": lambda: torch.zeros(t.shape[0] + 1, t.shape[1]),
                "grow1": lambda: torch.zeros(t.shape[0], t.shape[1] + 1),
                "T": lambda: t.T.contiguous(),
                "flat": lambda: t.flatten().contiguous(),
                "scalar": lambda: t.sum(),
                "3d": lambda: t.unsqueeze(0).contiguous(),
            }[m[2]]()
            if tensors[name].shape == t.shape:  # a square tensor transposed keeps its shape
                return OK, []
        elif kind == "retype":
            tensors[name] = t.to(m[2])
            if m[2] in FLOAT_DTYPES:
                expect, needles = OK, []
        else:
            if not t.is_floating_point():  # retyped to int by an earlier mutation: no NaN to plant
                return None, [str(d)]
            flat = t.flatten().clone()
            flat[m[2] % flat.numel()] = m[3]
            tensors[name] = flat.reshape(t.shape)
            expect = AdapterNumericError
        safetensors.torch.save_file(tensors, str(d / SAFETENSORS_FILE))
        return expect, needles
    if kind in ("flip", "truncate"):
        f = d / m[1]
        data = bytearray(f.read_bytes())
        if not data:  # emptied by an earlier mutation
            return None, [str(d)]
        if kind == "flip":
            data[m[2] % len(data)] ^= m[3]
            f.write_bytes(bytes(data))
            return None, [str(f)]
        f.write_bytes(bytes(data[: m[2] % len(data)]))
        return AdapterFormatError, [str(f)]
    try:
        cfg = json.loads((d / CONFIG_FILE).read_bytes())
    except ValueError:
        return None, [str(d)]
    if not isinstance(cfg, dict):
        return None, [str(d)]
    field = m[1]
    if kind == "set":
        cfg[field] = m[2]
    else:
        cfg.pop(field, None)
    (d / CONFIG_FILE).write_text(json.dumps(cfg))
    return None, [*FIELD_NEEDLES.get(field, [field]), ".lora_A.weight", ".lora_B.weight"]


@pytest.fixture(scope="module")
def shared_engine() -> Engine:
    return live_engine("dummy")


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, shared_engine: Engine) -> Path:
    return write_valid(tmp_path_factory.mktemp("template") / "adapter", shared_engine.dims)


@settings(
    max_examples=250,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(ms=st.lists(mutations, min_size=1, max_size=3))
def test_random_damage_is_refused_cleanly_or_loads(
    ms: list[tuple[Any, ...]], shared_engine: Engine, template: Path
) -> None:
    """Any damage: the load succeeds, or raises an `AdapterError` naming the file (always) and
    the tensor or field (a single targeted mutation); the live engine's state is unchanged."""
    engine = shared_engine
    work = Path(tempfile.mkdtemp(dir=template.parent))
    try:
        d = work / "adapter"
        shutil.copytree(template, d)
        expects = [mutate(d, m) for m in ms]
        before = state_of(engine)
        try:
            with no_hang(20):
                events = engine.load_adapter("mut", str(d))
        except LorainvError as e:
            assert isinstance(e, AdapterError), f"{type(e).__name__}: {e}"
            event(f"refused: {type(e).__name__}")
            msg = str(e)
            assert str(d) in msg, msg
            if len(ms) == 1:
                expect, needles = expects[0]
                assert expect is not OK, f"harmless damage {ms[0]} refused: {msg}"
                if expect is not None:
                    assert isinstance(e, expect), f"{type(e).__name__}: {msg}"
                assert any(n in msg for n in needles), (needles, msg)
        else:
            assert isinstance(events[0], AdapterRegistered)
            event("loaded")
            if len(ms) == 1:
                assert expects[0][0] in (OK, None), f"{ms[0]} was not refused"
            engine.unload_adapter("mut")
        assert state_of(engine) == before
        assert engine.check() == []
    finally:
        shutil.rmtree(work)
