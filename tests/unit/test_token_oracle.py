"""The token oracle: pure Python, the same function as the fingerprint network, computed from the
adapter's source as registered and the request's logical history — never from the engine.

The slot identities it derives (gen sources with alpha/rsLoRA, PEFT directories with rank and
alpha patterns, partial target modules, bf16/fp16 files, every pool dtype, tp_size 2) equal the
identity of the slot the runtime actually loaded; the engine's tokens equal its predictions; its
request/session bookkeeping follows ops and events (aborted turns, sessions); a wrong token is a
T1 violation naming the request, the position, the expected and the emitted token.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lorainv import events as E
from lorainv import ops as O
from lorainv.config import RuntimeConfig
from lorainv.impl.adapters import parse_gen_source, write_peft_adapter
from lorainv.impl.engine import Engine
from lorainv.impl.fingerprint_net import FingerprintNetwork
from lorainv.model.token_oracle import VOCAB, TokenOracle, next_token
from lorainv.testing.harness import Harness

DIMS = FingerprintNetwork.dims


def config(**kw: Any) -> RuntimeConfig:
    base: dict[str, Any] = {"network": "dummy", "device": "cpu", "max_lora_rank": 8, "max_total_tokens": 64}
    return RuntimeConfig(**{**base, **kw})


def loaded_identity(engine: Engine, name: str) -> int:
    """The identity of the slot the runtime loaded for ``name`` (made resident by a one-token run)."""
    engine.add_request([1], name, 1)
    while not engine.is_idle():
        engine.step()
    return engine.network.slot_identity(engine.pool.buffers, engine.pool.uid_to_slot[name])


def test_oracle_module_imports_no_torch() -> None:
    code = "import sys, lorainv.model.token_oracle; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("tp_size", [1, 2])
@pytest.mark.parametrize("source", ["gen:4:11", "gen:8:13", "gen:2:22:2:rs", "gen:3:33:0.5", "gen:5:24:10:rs"])
def test_gen_source_identity_equals_the_loaded_slot(source: str, tp_size: int, dtype: str) -> None:
    """Loaded through the pool directly (the parsed source built with every field), so this checks
    the oracle's own layout — padding, dtype rounding, the rank-0 shard — against the pool's."""
    cfg = config(tp_size=tp_size, dtype=dtype)
    engine = Engine(cfg)
    adapter = parse_gen_source(source).build("x", DIMS, cfg.torch_dtype)
    engine.pool.load("x", adapter, 1, engine.device.current_stream())
    got = engine.network.slot_identity(engine.pool.buffers, 1)
    assert TokenOracle.for_config(cfg, DIMS).identity(source) == got


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tp_size", [1, 2])
@pytest.mark.parametrize(
    "kw",
    [
        {"rank": 4, "seed": 1},
        {"rank": 3, "seed": 2, "alpha": 6.0, "file_dtype": torch.bfloat16},
        {"rank": 2, "seed": 3, "use_rslora": True, "alpha": 5.0, "file_dtype": torch.float16},
        {
            "rank": 4,
            "seed": 4,
            "alpha": 8.0,
            "target_modules": ["q_proj", "v_proj", "down_proj"],
            "rank_pattern": {"v_proj": 2},
            "alpha_pattern": {"down_proj": 3.0},
        },
    ],
    ids=["plain", "bf16-file-alpha", "fp16-file-rslora", "patterns-partial"],
)
def test_peft_dir_identity_equals_the_loaded_slot(kw: dict[str, Any], tp_size: int, dtype: str, tmp_path: Path) -> None:
    kw = dict(kw)
    file_dtype = kw.pop("file_dtype", torch.float32)
    path = write_peft_adapter(tmp_path / "ad", DIMS, dtype=file_dtype, **kw)
    cfg = config(tp_size=tp_size, dtype=dtype)
    engine = Engine(cfg)
    engine.load_adapter("x", path)
    assert TokenOracle.for_config(cfg, DIMS).identity(str(path)) == loaded_identity(engine, "x")


def test_identity_reflects_contents() -> None:
    oracle = TokenOracle.for_config(config(), DIMS)
    idents = [oracle.identity(s) for s in (None, "gen:4:11", "gen:4:12", "gen:2:11", "gen:4:11:8", "gen:4:11:6:rs")]
    assert len(set(idents)) == len(idents)
    assert oracle.identity("gen:4:11") == idents[1]
    assert oracle.identity("gen:4:11:4:rs") == idents[4]  # 4/sqrt(4) == 8/4: the same slot contents
    wider = TokenOracle.for_config(config(max_lora_rank=16), DIMS)
    assert wider.identity(None) != idents[0]  # the slot's padded size is part of its contents


@pytest.mark.parametrize("cfg", [config(), config(tp_size=2, dtype="float64"), config(dtype="bfloat16")])
def test_engine_tokens_equal_the_oracle(cfg: RuntimeConfig) -> None:
    engine = Engine(cfg)
    sources = {"a": "gen:4:11", "b": "gen:2:12"}
    for name, src in sources.items():
        engine.load_adapter(name, src)
    prompts = [[5, 6, 7], [5, 6, 7], [1000, 0, 3, 3, 3], [9]]
    adapters = ["a", "b", None, "a"]
    outs = engine.generate(prompts, adapters, max_new_tokens=6)
    oracle = TokenOracle.for_config(cfg, DIMS)
    for prompt, ad, out in zip(prompts, adapters, outs):
        ident = oracle.identity(None if ad is None else sources[ad])
        assert ident is not None
        want, hist = [], list(prompt)
        for _ in range(6):
            want.append(next_token(ident, hist))
            hist.append(want[-1])
        assert out == want


def test_next_token_depends_on_order_position_and_identity() -> None:
    import random

    rng = random.Random(7)
    same = 0
    for _ in range(200):
        toks = [rng.randrange(VOCAB) for _ in range(rng.randrange(2, 20))]
        ident = rng.randrange(1 << 31)
        base = next_token(ident, toks)
        i = rng.randrange(len(toks) - 1)
        swapped = [*toks[:i], toks[i + 1], toks[i], *toks[i + 2 :]]
        variants = [next_token(ident + 1, toks), next_token(ident, [0, *toks]), next_token(ident, toks[1:])]
        if swapped != toks:
            variants.append(next_token(ident, swapped))
        same += sum(v == base for v in variants)
    assert same <= 4  # ~800 comparisons, each equal by chance with probability 1/1024


def test_a_wrong_token_is_a_t1_violation_naming_rid_position_expected_and_got() -> None:
    cfg = config()
    engine = Engine(cfg)
    engine.load_adapter("a", "gen:4:11")
    (out,) = engine.generate([[1, 2, 3]], ["a"], max_new_tokens=2)
    oracle = TokenOracle.for_config(cfg, DIMS)
    load = O.LoadAdapter("a", "gen:4:11")
    assert oracle.observe(load, [E.AdapterRegistered("a", 4)]) == []
    add = O.AddRequest("r", (1, 2, 3), "a", 2)
    assert oracle.observe(add, [E.Queued("r", "a", 3, 2)]) == []
    assert oracle.observe(O.Step(), [E.Decoded("r", out[0])]) == []
    wrong = (out[1] + 1) % VOCAB
    (v,) = oracle.observe(O.Step(), [E.Decoded("r", wrong)])
    assert (v.pool, v.invariant, v.offenders) == ("tokens", "T1", ("r",))
    assert "r " in v.message and "position 4" in v.message
    assert f"expected {out[1]}" in v.message and f"decoded {wrong}" in v.message


def test_a_rejected_load_registers_nothing() -> None:
    oracle = TokenOracle.for_config(config(), DIMS)
    oracle.observe(O.LoadAdapter("a", "gen:4:11"), [E.Rejected("LoadAdapter", "AdapterError", "no")])
    assert "a" not in oracle.idents


def test_aborted_session_turn_leaves_the_saved_history() -> None:
    """A turn aborted mid-prefill saves nothing: the next turn extends the last finished one."""
    h = Harness(config(max_sessions=1, chunked_prefill_size=2))
    ops: list[O.Op] = [O.LoadAdapter("a", "gen:4:11"), O.OpenSession("s"), O.AddRequest("t1", (1, 2, 3), "a", 2, "s")]
    ops += [O.Step()] * 4
    ops += [O.AddRequest("t2", (4, 5, 6, 7, 8), "a", 2, "s"), O.Step(), O.Abort("t2")]
    ops += [O.AddRequest("t3", (9,), "a", 3, "s")]
    found = [v for op in ops for v in h.apply(op).violations] + h.finish()
    assert not found, [str(v) for v in found]
    assert h.tokens is not None and h.tokens.checked == 5
    t3 = h.engine.requests["t3"]
    assert t3.history == h.tokens.sessions["s"][: len(t3.history)] and len(t3.history) == 5


def test_an_adapter_the_oracle_cannot_read_is_left_unchecked(tmp_path: Path) -> None:
    """A ``.bin`` PEFT adapter (no safetensors; the oracle never unpickles): its tokens are unchecked."""
    st = write_peft_adapter(tmp_path / "ad", DIMS, rank=2, seed=1)
    from safetensors.torch import load_file

    tensors = load_file(str(st / "adapter_model.safetensors"))
    (st / "adapter_model.safetensors").unlink()
    torch.save(tensors, st / "adapter_model.bin")
    h = Harness(config())
    ops = (O.LoadAdapter("x", str(st)), O.AddRequest("r", (1, 2), "x", 3))
    found = [v for op in ops for v in h.apply(op).violations]
    found += h.finish()
    assert not found and h.tokens is not None
    assert (h.tokens.checked, h.tokens.unchecked) == (0, 3)
