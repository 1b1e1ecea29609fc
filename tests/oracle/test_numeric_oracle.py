"""The numeric oracle of ``--numeric`` (`lorainv.testing.numeric_oracle`) against Hugging Face
transformers + PEFT, and the engine against the oracle, all in float64.

The base model is lorainv's tiny Llama saved as a HF checkpoint (both heads: tied and untied).
Adapters: two saved by PEFT itself from random weights (one rsLoRA with a non-default alpha,
one with ``alpha != r`` plus rank/alpha patterns) and two ``gen:`` sources with alpha and
rsLoRA, which PEFT loads from the generator's PEFT files while the oracle takes its own path.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from peft_testutil import peft_logits

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lorainv.config import RuntimeConfig  # noqa: E402
from lorainv.events import Aborted, BatchFormed, Decoded, Retracted, SessionRestored  # noqa: E402
from lorainv.impl.adapters import parse_gen_source, write_peft_adapter  # noqa: E402
from lorainv.impl.llama import LlamaNetwork  # noqa: E402
from lorainv.ops import Abort, AddRequest, LoadAdapter, Op, OpenSession, Step  # noqa: E402
from lorainv.testing.harness import Harness  # noqa: E402
from lorainv.testing.numeric_oracle import (  # noqa: E402
    LOGIT_ATOL,
    NumericOracle,
    PeftLora,
    check_numerics,
    forward_logits,
)

pytestmark = [
    pytest.mark.oracle,
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

# PEFT LoraConfig kwargs of the adapters PEFT itself saves
PEFT_ADAPTERS: dict[str, dict[str, Any]] = {
    "rs": dict(r=8, lora_alpha=12, use_rslora=True, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]),
    "pat": dict(
        r=4,
        lora_alpha=3,
        target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
        rank_pattern={"up_proj": 2},
        alpha_pattern={"o_proj": 10},
    ),
}
GEN_ADAPTERS = ("gen:4:7:6:rs", "gen:2:5:5")  # rsLoRA alpha 6, and alpha 5 at rank 2
SEQ_LENS = (1, 7, 19)


def _seq(seed: int, n: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny base saved as HF, PEFT-saved adapters, and the gen sources written as PEFT dirs."""
    root = tmp_path_factory.mktemp("numeric_oracle")
    net = LlamaNetwork.tiny(seed=3, dtype=torch.float64, tie_word_embeddings=request.param)
    net.save_pretrained(root / "base")
    hf = transformers.LlamaForCausalLM.from_pretrained(root / "base", dtype=torch.float64).eval()
    dirs: dict[str, Path] = {}
    for seed, (name, kw) in enumerate(PEFT_ADAPTERS.items(), start=20):
        with torch.random.fork_rng():
            pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(lora_dropout=0.0, **kw))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, p in pm.named_parameters():
                if "lora_" in pname:
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5 / math.sqrt(p.shape[-1]))
        pm.save_pretrained(str(root / name))
        dirs[name] = root / name
    for source in GEN_ADAPTERS:
        g = parse_gen_source(source)
        assert g is not None
        path = root / source.replace(":", "_")
        write_peft_adapter(path, net.dims, rank=g[0], seed=g[1], alpha=g.alpha, use_rslora=g.use_rslora)
        dirs[source] = path
    names = list(dirs)
    pm = peft.PeftModel.from_pretrained(hf, str(dirs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        pm.load_adapter(str(dirs[name]), adapter_name=name)
    return {"root": root, "net": net, "dirs": dirs, "peft": pm.eval()}


def oracle_source(saved: dict[str, Any], name: str) -> str:
    """The oracle reads a PEFT adapter from its directory and a gen adapter from its source."""
    return name if name.startswith("gen:") else str(saved["dirs"][name])


ALL = [None, *PEFT_ADAPTERS, *GEN_ADAPTERS]


@pytest.mark.parametrize("adapter", ALL, ids=lambda a: a or "base")
def test_oracle_logits_equal_peft(saved: dict[str, Any], adapter: str | None) -> None:
    oracle = NumericOracle.for_network(saved["net"])
    src = None if adapter is None else oracle_source(saved, adapter)
    for n in SEQ_LENS:
        toks = _seq(n, n)
        want = peft_logits(saved["peft"], adapter, toks)
        got = oracle.logits(src, toks)
        diff = (got - want).abs().max().item()
        assert diff <= LOGIT_ATOL, f"{adapter or 'base'} length {n}: max |oracle - PEFT| = {diff:.3e}"
        if adapter is not None:  # the comparison has teeth: the adapter moves the logits a lot
            assert (want - peft_logits(saved["peft"], None, toks)).abs().max() > 1e-2


@pytest.mark.parametrize("adapter", [*PEFT_ADAPTERS, *GEN_ADAPTERS])
def test_a_scaling_off_by_two_is_far_outside_the_tolerance(saved: dict[str, Any], adapter: str) -> None:
    """The planted bug of the issue (a LoRA delta scaled x2), applied to the oracle's own input,
    is ~1e8 tolerances away from PEFT."""
    oracle = NumericOracle.for_network(saved["net"])
    lora = oracle.adapter(oracle_source(saved, adapter))
    doubled = PeftLora({m: (a, b, 2 * s) for m, (a, b, s) in lora.modules.items()})
    toks = _seq(5, 9)
    diff = (forward_logits(oracle.base, doubled, toks) - peft_logits(saved["peft"], adapter, toks)).abs().max()
    assert diff > 1e-2


def test_oracle_reads_peft_bin_files_too(saved: dict[str, Any], tmp_path: Path) -> None:
    """PEFT's older ``adapter_model.bin`` (the engine serves it too) reads as the safetensors file."""
    pm = saved["peft"]
    pm.set_adapter("pat")
    pm.save_pretrained(str(tmp_path), selected_adapters=["pat"], safe_serialization=False)
    (binary,) = [p for p in tmp_path.rglob("adapter_model.bin")]
    assert not (binary.parent / "adapter_model.safetensors").exists()
    oracle = NumericOracle.for_network(saved["net"])
    toks = _seq(7, 11)
    diff = (oracle.logits(str(binary.parent), toks) - peft_logits(pm, "pat", toks)).abs().max().item()
    assert diff <= LOGIT_ATOL


def test_oracle_greedy_equals_peft_greedy(saved: dict[str, Any]) -> None:
    oracle = NumericOracle.for_network(saved["net"])
    for i, adapter in enumerate(ALL):
        prompt = _seq(100 + i, 4 + i)
        src = None if adapter is None else oracle_source(saved, adapter)
        toks = list(prompt)
        for _ in range(6):
            toks.append(int(peft_logits(saved["peft"], adapter, toks)[-1].argmax()))
        assert oracle.greedy(src, prompt, 6) == toks[len(prompt) :], adapter


# -- the engine against the oracle, through the harness of --numeric ----------------------------
# gen sources whose alpha is the rank (scaling 1), so the engine's reading of gen alpha/rsLoRA
# is tested on its own below
ENGINE_GEN = ("gen:4:7", "gen:2:5:2")


def run_mixed(saved: dict[str, Any], gens: tuple[str, ...] = ENGINE_GEN) -> Harness:
    """One mixed workload on the saved checkpoint: four adapters and the base model, prompts of
    several lengths, chunked prefill; the harness in numeric mode records every forward."""
    cfg = RuntimeConfig(dtype="float64", device="cpu", chunked_prefill_size=4, max_loras_per_batch=5, max_lora_rank=8)
    h = Harness(cfg, numeric=True, model=saved["root"] / "base")
    names = {"rs": str(saved["dirs"]["rs"]), "pat": str(saved["dirs"]["pat"])}
    names |= {f"g{i}": s for i, s in enumerate(gens)}
    for name, source in names.items():
        assert not h.apply(LoadAdapter(name, source)).violations
    order: list[str | None] = ["rs", "g0", None, "pat", "rs", "g1", None, "g0", "pat", "g1"]
    for i, adapter in enumerate(order):
        rec = h.apply(AddRequest(f"q{i}", tuple(_seq(200 + i, 1 + (5 * i) % 11)), adapter, 5, None))
        assert not rec.violations and rec.events[0].kind == "Queued"
    return h


def test_engine_serves_gen_alpha_and_rslora(saved: dict[str, Any]) -> None:
    assert run_mixed(saved, GEN_ADAPTERS).finish() == []


@pytest.fixture(scope="module")
def mixed(saved: dict[str, Any]) -> Harness:
    h = run_mixed(saved)
    assert h.finish() == []
    return h


def test_engine_agrees_with_oracle_on_a_mixed_batch(mixed: Harness) -> None:
    batches = [e for r in mixed.records for e in r.events if isinstance(e, BatchFormed)]
    assert max(len(set(b.adapters)) for b in batches) == 5, "no batch held all four adapters and the base"
    assert {b.mode for b in batches} == {"prefill", "decode"}
    assert mixed.recorder is not None
    stats: dict[str, float] = {}
    assert (
        check_numerics(mixed.records, mixed.recorder.forwards, NumericOracle.for_network(mixed.recorder), stats) == []
    )
    assert stats["requests"] == 10 and stats["tokens"] == 50
    assert stats["rows"] > stats["tokens"], "chunked prefill rows were not all checked"
    assert stats["worst"] <= LOGIT_ATOL


def test_a_perturbed_logit_row_is_n2(mixed: Harness) -> None:
    assert mixed.recorder is not None
    forwards = list(mixed.recorder.forwards)
    k = len(forwards) // 2
    bumped = forwards[k].logits.clone()
    bumped[0, 17] += 1e-7
    forwards[k] = dataclasses.replace(forwards[k], logits=bumped)
    out = check_numerics(mixed.records, forwards, NumericOracle.for_network(mixed.recorder))
    assert [v.invariant for v in out] == ["N2"]


def test_a_wrong_token_is_n1(mixed: Harness) -> None:
    """A Decoded token that is not the oracle's argmax after the same prefix."""
    assert mixed.recorder is not None
    records = list(mixed.records)
    i, j = next((i, j) for i, r in enumerate(records) for j, e in enumerate(r.events) if isinstance(e, Decoded))
    ev = records[i].events[j]
    assert isinstance(ev, Decoded)
    events = list(records[i].events)
    events[j] = Decoded(ev.rid, (ev.token + 1) % 256)
    records[i] = dataclasses.replace(records[i], events=events)
    out = check_numerics(records, mixed.recorder.forwards, NumericOracle.for_network(mixed.recorder))
    # N1 first; later rows of that request were computed on the real token, so N2 may follow
    assert (out[0].invariant, out[0].offenders) == ("N1", (ev.rid,))
    assert {v.offenders for v in out} == {(ev.rid,)}


def test_a_forward_without_its_batch_event_is_n2(mixed: Harness) -> None:
    assert mixed.recorder is not None
    records = list(mixed.records)
    i = next(i for i, r in enumerate(records) if any(isinstance(e, BatchFormed) for e in r.events))
    records[i] = dataclasses.replace(
        records[i], events=[e for e in records[i].events if not isinstance(e, BatchFormed)]
    )
    out = check_numerics(records, mixed.recorder.forwards, NumericOracle.for_network(mixed.recorder))
    assert [v.invariant for v in out] == ["N2"] and "forwards" in out[0].message


def test_engine_agrees_with_oracle_through_sessions_retractions_and_aborts() -> None:
    """The history the check rebuilds from ops and events (a session's earlier turn, outputs
    kept across a retraction, an abort mid-decode) is the one the engine serves."""
    cfg = RuntimeConfig(
        network="tiny", dtype="float64", device="cpu", max_sessions=2, page_size=2, max_total_tokens=32,
        chunked_prefill_size=4, max_loras_per_batch=2,
    )  # fmt: skip
    h = Harness(cfg, numeric=True)
    ops: list[Op] = [LoadAdapter("a", "gen:4:11"), LoadAdapter("b", "gen:2:12"), OpenSession("s")]
    ops += [AddRequest("t1", (1, 2, 3), "a", 3, "s"), *[Step()] * 4, AddRequest("t2", (4, 5), "a", 3, "s")]
    ops += [AddRequest(f"q{i}", tuple(range(1, 7 + i)), "b" if i % 2 else None, 6, None) for i in range(6)]
    ops += [Step(), Step(), Step(), Abort("q1")]
    for op in ops:
        assert not h.apply(op).violations, op
    assert h.finish() == []
    events = [e for r in h.records for e in r.events]
    assert any(isinstance(e, Retracted) and e.output_len > 0 for e in events), "no retraction kept outputs"
    assert any(isinstance(e, SessionRestored) and e.tokens > 0 for e in events), "turn 2 did not extend turn 1"
    assert any(isinstance(e, Aborted) and e.rid == "q1" for e in events)
    assert h.recorder is not None
    stats: dict[str, float] = {}
    assert check_numerics(h.records, h.recorder.forwards, NumericOracle.for_network(h.recorder), stats) == []
    decoded = [e for e in events if isinstance(e, Decoded)]
    assert stats["tokens"] == len(decoded), "an emitted token went unchecked"
    assert stats["requests"] >= len({e.rid for e in decoded})
