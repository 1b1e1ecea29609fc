"""PEFT adapter loading: layout, scaling, patterns, and one test per refusal reason."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
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
from lorainv.impl.adapters import (
    CONFIG_FILE,
    SAFETENSORS_FILE,
    generate_adapter,
    load_peft_adapter,
    match_targets,
    parse_gen_source,
    tensor_name,
    write_peft_adapter,
)
from lorainv.impl.dims import ModelDims

DIMS = ModelDims(
    num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48, vocab_size=64
)
F32 = torch.float32


def load(path: Path, max_lora_rank: int = 16, dtype: torch.dtype = F32, dims: ModelDims = DIMS):
    return load_peft_adapter("x", path, dims, max_lora_rank=max_lora_rank, dtype=dtype)


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / CONFIG_FILE).read_text())
    cfg.update(changes)
    (path / CONFIG_FILE).write_text(json.dumps(cfg))


def edit_tensors(path: Path, fn) -> None:
    t = safetensors.torch.load_file(str(path / SAFETENSORS_FILE))
    fn(t)
    safetensors.torch.save_file(t, str(path / SAFETENSORS_FILE))


def file_tensors(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path / SAFETENSORS_FILE))


def test_roundtrip_exact_and_equal_to_generated(tmp_path):
    p = write_peft_adapter(tmp_path / "a", DIMS, rank=4, seed=7)
    a = load(p)
    g = generate_adapter("x", DIMS, rank=4, seed=7, dtype=F32)
    assert (a.rank, a.scaling, a.target_modules) == (4, 1.0, g.target_modules)
    raw = file_tensors(p)
    for layer in range(2):
        for grp in a.weights[layer]:
            assert torch.equal(a.weights[layer][grp][0], g.weights[layer][grp][0])
            assert torch.equal(a.weights[layer][grp][1], g.weights[layer][grp][1])
        qkv_a, qkv_b = a.weights[layer]["qkv"]
        assert qkv_a.shape == (3 * 4, 32) and qkv_b.shape == (32 + 16 + 16, 4)
        assert torch.equal(qkv_a[4:8], raw[tensor_name(layer, "k_proj", "A")])
        assert torch.equal(qkv_b[32:48], raw[tensor_name(layer, "k_proj", "B")])
        down_a, down_b = a.weights[layer]["down"]
        assert torch.equal(down_a, raw[tensor_name(layer, "down_proj", "A")])
        assert torch.equal(down_b, raw[tensor_name(layer, "down_proj", "B")])
    assert a.nbytes() == sum(t.numel() * 4 for lw in a.weights for ab in lw.values() for t in ab)
    assert not torch.equal(a.weights[0]["qkv"][1], torch.zeros_like(a.weights[0]["qkv"][1]))  # B nonzero


def test_peft_names_and_config_keys(tmp_path):
    p = write_peft_adapter(tmp_path, DIMS, rank=2, seed=0, target_modules=["q_proj", "up_proj"])
    cfg = json.loads((p / CONFIG_FILE).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and cfg["target_modules"] == ["q_proj", "up_proj"]
    assert set(file_tensors(p)) == {
        f"base_model.model.model.layers.{i}.{m}.lora_{w}.weight"
        for i in range(2)
        for m in ("self_attn.q_proj", "mlp.up_proj")
        for w in "AB"
    }
    raw = file_tensors(p)
    assert raw[tensor_name(0, "q_proj", "A")].shape == (2, 32)
    assert raw[tensor_name(0, "up_proj", "B")].shape == (48, 2)


def test_generation_is_deterministic_and_seed_dependent():
    a = generate_adapter("a", DIMS, rank=3, seed=1, dtype=F32)
    b = generate_adapter("b", DIMS, rank=3, seed=1, dtype=F32)
    c = generate_adapter("c", DIMS, rank=3, seed=2, dtype=F32)
    assert torch.equal(a.weights[1]["o"][1], b.weights[1]["o"][1])
    assert not torch.equal(a.weights[1]["o"][1], c.weights[1]["o"][1])
    assert 0.05 < float(a.weights[0]["o"][1].std()) < 0.2  # B ~ 0.1


def test_generated_adapters_share_no_tensor_and_hold_theirs_read_only():
    """Generation is cached per source, yet two loads of one source get tensors of their own
    (a stale pinned copy of the first must not pass for the second's), and an adapter's layer
    maps refuse assignment (its identity stands for its tensors' in the snapshotter's memo)."""
    a = generate_adapter("a", DIMS, rank=3, seed=1, dtype=F32)
    b = generate_adapter("a", DIMS, rank=3, seed=1, dtype=F32)
    ids_a = {id(t) for layer in a.weights for ab in layer.values() for t in ab}
    ids_b = {id(t) for layer in b.weights for ab in layer.values() for t in ab}
    assert not ids_a & ids_b
    b.weights[0]["o"][0].add_(1.0)  # a write into one load's tensor leaves the other's alone
    assert not torch.equal(a.weights[0]["o"][0], b.weights[0]["o"][0])
    with pytest.raises(TypeError):
        a.weights[0]["o"] = b.weights[0]["o"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("target_modules", "error"),
    [
        (5, AdapterConfigError),
        ([["q_proj"]], AdapterConfigError),
        (None, AdapterConfigError),
        (["nope"], UnsupportedAdapterError),
    ],
)
def test_generation_refuses_bad_target_modules_by_name(target_modules: object, error: type[Exception]) -> None:
    """The generation cache needs hashable arguments; what is not (or not a list at all) still
    gets the typed refusal naming the field, never a TypeError from the cache."""
    for _ in range(2):  # a refusal is not cached as a result
        with pytest.raises(error, match="target_modules"):
            generate_adapter("x", DIMS, rank=2, seed=1, dtype=F32, target_modules=target_modules)  # type: ignore[arg-type]


@pytest.mark.parametrize(("rslora", "expected"), [(False, 16 / 4), (True, 16 / 2)])
def test_scaling_alpha_over_r_vs_rslora(tmp_path, rslora, expected):
    p = write_peft_adapter(tmp_path, DIMS, rank=4, seed=0, alpha=16, use_rslora=rslora)
    a = load(p)
    assert a.scaling == expected
    # no patterns: B is stored unscaled, exactly as in the file
    assert torch.equal(a.weights[0]["o"][1], file_tensors(p)[tensor_name(0, "o_proj", "B")])


def test_rank_and_alpha_pattern(tmp_path):
    p = write_peft_adapter(
        tmp_path,
        DIMS,
        rank=4,
        seed=3,
        alpha=8,
        rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 8},
        alpha_pattern={"v_proj": 16},
    )
    a, raw = load(p), file_tensors(p)
    assert (a.rank, a.scaling) == (8, 2.0)  # adapter rank = max over modules; s = 8/4
    qkv_a, qkv_b = a.weights[0]["qkv"]
    assert qkv_a.shape == (24, 32) and qkv_b.shape == (64, 8)
    # q: r_m=2, s_m = 8/2 = 4 -> B folded by 2; rows 2:8 of its A slice are zero
    assert torch.equal(qkv_a[0:2], raw[tensor_name(0, "q_proj", "A")])
    assert torch.count_nonzero(qkv_a[2:8]) == 0
    assert torch.equal(qkv_b[0:32, :2], raw[tensor_name(0, "q_proj", "B")] * 2)
    assert torch.count_nonzero(qkv_b[0:32, 2:]) == 0
    # k: default r=4, alpha=8 -> ratio 1, exact
    assert torch.equal(qkv_a[8:12], raw[tensor_name(0, "k_proj", "A")])
    assert torch.equal(qkv_b[32:48, :4], raw[tensor_name(0, "k_proj", "B")])
    # v: alpha 16 / r 4 = 4 -> ratio 2
    assert torch.equal(qkv_b[48:64, :4], raw[tensor_name(0, "v_proj", "B")] * 2)
    # down: rank 8 only in layer 1 (s_m = 1 -> ratio 0.5); layer 0 keeps rank 4
    assert raw[tensor_name(1, "down_proj", "A")].shape == (8, 48)
    assert raw[tensor_name(0, "down_proj", "A")].shape == (4, 48)
    assert torch.equal(a.weights[1]["down"][1], raw[tensor_name(1, "down_proj", "B")] * 0.5)


def test_regex_target_modules_full_match(tmp_path):
    p = write_peft_adapter(tmp_path, DIMS, rank=2, seed=0, target_modules=r".*\.layers\.1\.self_attn\.(q|v)_proj")
    a, raw = load(p), file_tensors(p)
    assert set(raw) == {tensor_name(1, m, w) for m in ("q_proj", "v_proj") for w in "AB"}
    assert a.target_modules == frozenset({"q_proj", "v_proj"})
    assert all(torch.count_nonzero(t) == 0 for ab in a.weights[0].values() for t in ab)
    # "q_proj" alone would not full-match any module name: PEFT regex semantics
    edit_config(p, target_modules="q_proj")
    with pytest.raises(AdapterConfigError) as e:
        load(p)
    assert type(e.value) is AdapterConfigError and "target_modules" in str(e.value) and "'q_proj'" in str(e.value)


def test_untargeted_modules_exactly_zero(tmp_path):
    p = write_peft_adapter(tmp_path, DIMS, rank=4, seed=5, target_modules=["q_proj", "v_proj"])
    a = load(p)
    for layer in range(2):
        qkv_a, qkv_b = a.weights[layer]["qkv"]
        assert torch.count_nonzero(qkv_a[4:8]) == 0 and torch.count_nonzero(qkv_b[32:48]) == 0  # k
        assert torch.count_nonzero(qkv_a[0:4]) > 0 and torch.count_nonzero(qkv_a[8:12]) > 0
        for g in ("o", "gate_up", "down"):
            assert all(torch.count_nonzero(t) == 0 for t in a.weights[layer][g])


def test_dtype_conversion(tmp_path):
    p = write_peft_adapter(tmp_path, DIMS, rank=2, seed=1, dtype=torch.bfloat16)
    raw = file_tensors(p)
    a = load(p, dtype=torch.float64)
    assert a.weights[0]["o"][0].dtype == torch.float64
    assert torch.equal(a.weights[0]["o"][0], raw[tensor_name(0, "o_proj", "A")].double())


def test_bin_loaded_with_weights_only(tmp_path):
    p = write_peft_adapter(tmp_path / "st", DIMS, rank=2, seed=9)
    ref = load(p)
    tensors = file_tensors(p)
    (p / SAFETENSORS_FILE).unlink()
    torch.save(tensors, p / "adapter_model.bin")
    a = load(p)
    assert torch.equal(a.weights[1]["gate_up"][1], ref.weights[1]["gate_up"][1])


class _Evil:
    ran = False

    def __reduce__(self):
        return (_Evil._boom, ())

    @staticmethod
    def _boom():
        _Evil.ran = True
        return {}


def test_bin_needing_unpickle_is_refused(tmp_path):
    p = write_peft_adapter(tmp_path, DIMS, rank=2, seed=9)
    (p / SAFETENSORS_FILE).unlink()
    torch.save({"x": _Evil()}, p / "adapter_model.bin")
    with pytest.raises(AdapterFormatError, match=r"adapter_model\.bin.*weights_only") as e:
        load(p)
    assert type(e.value) is AdapterFormatError and not _Evil.ran


# ---- refusals: one per reason, exact subclass, message names the culprit ---------------


def refused(path: Path, cls: type, *needles: str, **kw) -> str:
    with pytest.raises(cls) as e:
        load(path, **kw)
    assert type(e.value) is cls, f"{type(e.value).__name__}: {e.value}"
    msg = str(e.value)
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


@pytest.fixture
def adir(tmp_path) -> Path:
    return write_peft_adapter(tmp_path / "ad", DIMS, rank=4, seed=0, target_modules=["q_proj", "v_proj"])


def test_refuse_dora(adir):
    edit_config(adir, use_dora=True)
    refused(adir, UnsupportedAdapterError, "use_dora", CONFIG_FILE)


def test_refuse_non_lora_peft_type(adir):
    edit_config(adir, peft_type="IA3")
    refused(adir, UnsupportedAdapterError, "peft_type", "IA3")


def test_refuse_rank_above_max(adir):
    refused(adir, AdapterRankError, "r=4", "max_lora_rank=2", max_lora_rank=2)


def test_refuse_rank_pattern_above_max(adir):
    edit_config(adir, rank_pattern={"v_proj": 32})
    refused(adir, AdapterRankError, "rank_pattern['v_proj']=32", "max_lora_rank=16")


def test_refuse_bad_r_type(adir):
    edit_config(adir, r="4")
    refused(adir, AdapterConfigError, "r must be an int")


@pytest.mark.parametrize("module", ["embed_tokens", "lm_head", "input_layernorm"])
def test_refuse_unsupported_target(adir, module):
    edit_config(adir, target_modules=["q_proj", module])
    refused(adir, UnsupportedAdapterError, "target_modules", module)


def test_refuse_unknown_target(adir):
    edit_config(adir, target_modules=["q_proj", "qq_proj"])
    refused(adir, UnsupportedAdapterError, "target_modules", "qq_proj", "no such module")


def test_refuse_regex_matching_nothing(adir):
    edit_config(adir, target_modules=r".*\.attention\.wq")
    refused(adir, AdapterConfigError, "target_modules", "matches no module")


@pytest.mark.parametrize("pattern", [r"(a+)+$", r"(.*)*q_proj", r"(q|q)*_proj", r"(?:\w*)+\.q_proj"])
def test_refuse_regex_that_can_backtrack_exponentially(adir, pattern):
    """``re`` has no timeout: a nested unbounded repeat is refused before any match runs."""
    edit_config(adir, target_modules=pattern)
    t0 = time.perf_counter()
    refused(adir, AdapterConfigError, "target_modules", "backtrack exponentially")
    assert time.perf_counter() - t0 < 5.0


def test_refuse_hostile_rank_pattern_key_and_overlong_regex(adir):
    edit_config(adir, rank_pattern={"(x+)+y": 4})
    refused(adir, AdapterConfigError, "rank_pattern key", "backtrack exponentially")
    edit_config(adir, rank_pattern={}, target_modules="q_proj|" * 200 + "v_proj")
    refused(adir, AdapterConfigError, "target_modules", "regex of 1406 characters (at most 1000)")


@pytest.mark.parametrize(
    "pattern", [r".*\.(q_proj|v_proj)", r"model\.layers\.\d+\.self_attn\.(q|v)_proj", r".*(q|v)_proj"]
)
def test_peft_style_regexes_still_load(adir, pattern):
    edit_config(adir, target_modules=pattern)
    assert {m for _, m in match_targets(pattern, DIMS)} == {"q_proj", "v_proj"}
    assert load(adir).target_modules == frozenset({"q_proj", "v_proj"})


def test_refuse_regex_reaching_lm_head(adir):
    edit_config(adir, target_modules=r".*(q_proj|lm_head)")
    refused(adir, UnsupportedAdapterError, "lm_head")


def test_refuse_shape_mismatch(tmp_path):
    other = ModelDims(2, 48, 4, 2, 12, 48, 64)
    p = write_peft_adapter(tmp_path, other, rank=4, seed=0, target_modules=["q_proj"])
    refused(p, AdapterShapeError, tensor_name(0, "q_proj", "A"), "(4, 48)", "expected (4, 32)", SAFETENSORS_FILE)


def test_refuse_integer_dtype(adir):
    name = tensor_name(1, "v_proj", "B")
    edit_tensors(adir, lambda t: t.__setitem__(name, torch.ones(16, 4, dtype=torch.int32)))
    refused(adir, AdapterShapeError, name, "torch.int32")


def test_refuse_missing_tensor(adir):
    name = tensor_name(1, "q_proj", "B")
    edit_tensors(adir, lambda t: t.pop(name))
    refused(adir, AdapterShapeError, "missing tensor", name)


def test_refuse_unknown_tensor(adir):
    name = "base_model.model.lm_head.lora_A.weight"
    edit_tensors(adir, lambda t: t.__setitem__(name, torch.zeros(4, 32)))
    refused(adir, AdapterShapeError, "unknown tensor", name)


def test_refuse_tensor_of_untargeted_module(adir):
    name = tensor_name(0, "k_proj", "A")
    edit_tensors(adir, lambda t: t.__setitem__(name, torch.zeros(4, 32)))
    refused(adir, AdapterShapeError, "extra tensor", name)


def test_refuse_layer_out_of_range(adir):
    name = tensor_name(2, "q_proj", "A")
    edit_tensors(adir, lambda t: t.__setitem__(name, torch.zeros(4, 32)))
    refused(adir, AdapterShapeError, "unknown tensor", name)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_refuse_nan_inf(adir, bad):
    name = tensor_name(0, "v_proj", "A")

    def poison(t):
        t[name][1, 3] = bad

    edit_tensors(adir, poison)
    refused(adir, AdapterNumericError, name, "NaN or Inf")


def test_refuse_missing_dir(tmp_path):
    refused(tmp_path / "nope", AdapterNotFoundError, "nope", "not found")


def test_refuse_missing_config(adir):
    (adir / CONFIG_FILE).unlink()
    refused(adir, AdapterNotFoundError, CONFIG_FILE, "missing")


def test_refuse_missing_weights(adir):
    (adir / SAFETENSORS_FILE).unlink()
    refused(adir, AdapterNotFoundError, SAFETENSORS_FILE, "missing")


def test_refuse_truncated_safetensors(adir):
    data = (adir / SAFETENSORS_FILE).read_bytes()
    (adir / SAFETENSORS_FILE).write_bytes(data[: len(data) // 2])
    refused(adir, AdapterFormatError, SAFETENSORS_FILE, "not a valid safetensors")


def test_refuse_garbage_safetensors(adir):
    (adir / SAFETENSORS_FILE).write_bytes(b"\xff" * 64)
    refused(adir, AdapterFormatError, SAFETENSORS_FILE)


def test_refuse_invalid_json(adir):
    (adir / CONFIG_FILE).write_text('{"r": 4,')
    refused(adir, AdapterFormatError, CONFIG_FILE, "invalid JSON")


def test_refuse_config_not_object(adir):
    (adir / CONFIG_FILE).write_text("[1, 2]")
    refused(adir, AdapterConfigError, CONFIG_FILE, "JSON object")


def test_refuse_unreadable_config(adir):
    (adir / CONFIG_FILE).unlink()
    (adir / CONFIG_FILE).mkdir()  # reading a directory fails even as root
    refused(adir, AdapterFormatError, CONFIG_FILE, "cannot read")


def test_refuse_symlink_loop(adir):
    (adir / SAFETENSORS_FILE).unlink()
    os.symlink(adir / SAFETENSORS_FILE, adir / SAFETENSORS_FILE)
    refused(adir, AdapterFormatError, SAFETENSORS_FILE, "symlink loop")


def test_refuse_directory_symlink_loop(tmp_path):
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    refused(tmp_path / "loop", AdapterFormatError, "loop")


def test_generate_refuses_unknown_module():
    with pytest.raises(UnsupportedAdapterError, match="embed_tokens"):
        generate_adapter("g", DIMS, rank=2, seed=0, dtype=F32, target_modules=["embed_tokens"])


def test_parse_gen_source():
    assert parse_gen_source("gen:8:42") == (8, 42)
    assert parse_gen_source("/models/a") is None
    assert parse_gen_source("general/path") is None
    bad_sources = ("gen", "gen:8", "gen:0:1", "gen:x:1", "gen:8:-1", "gen:8:1:2:x", "gen:8:1::rs", "gen:8:1:rs")
    for bad in (*bad_sources, "gen:8:1:-1", "gen:8:1:1e3", "gen:8:1:inf", "gen:8:1:nan", "gen:8:1:2:rs:3"):
        with pytest.raises(AdapterConfigError, match="gen:<rank>:<seed>"):
            parse_gen_source(bad)


def test_gen_source_alpha_and_rslora():
    """``gen:<rank>:<seed>:<alpha>[:rs]``: alpha and rsLoRA reach the adapter's scaling
    (PEFT: alpha/r, or alpha/sqrt(r) with rsLoRA); the weights depend on rank and seed only."""
    plain = parse_gen_source("gen:4:9")
    assert (plain.alpha, plain.use_rslora) == (None, False)
    g = parse_gen_source("gen:4:9:2")
    rs = parse_gen_source("gen:4:9:2:rs")
    assert g == (4, 9) and (g.alpha, g.use_rslora) == (2.0, False)
    assert (rs.alpha, rs.use_rslora) == (2.0, True)
    assert parse_gen_source("gen:4:9:0.5").alpha == 0.5
    base, a2, a2rs = (s.build("x", DIMS, F32) for s in (plain, g, rs))
    assert (base.scaling, a2.scaling, a2rs.scaling) == (1.0, 0.5, 1.0)  # 4/4, 2/4, 2/sqrt(4)
    for la, lb in zip(base.weights, a2rs.weights):
        for grp in la:
            assert all(torch.equal(x, y) for x, y in zip(la[grp], lb[grp]))
