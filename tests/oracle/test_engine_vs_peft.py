"""Oracle (issue #4): the whole engine against Hugging Face + PEFT, in float64.

A random GQA Llama is saved as a HF checkpoint and three PEFT LoRA adapters (different ranks,
alphas and target modules; one rsLoRA, one with a regex ``target_modules`` plus rank/alpha
patterns) are saved by PEFT itself. lorainv loads them through its public API and serves ONE
mixed batch — the three adapters and the base model, several requests each, prompts of
different lengths, chunked prefill. Every greedy token must equal PEFT's mixed-batch
``generate(..., adapter_names=...)``, and every logit row the engine computed during that run
(each prefill chunk's last position and each decode step) must equal PeftModel's
full-sequence logits at the same position within ``TOL``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft_testutil import peft_logits

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lorainv.config import RuntimeConfig  # noqa: E402
from lorainv.events import BatchFormed, Event, Scheduled  # noqa: E402
from lorainv.impl.engine import Engine  # noqa: E402

pytestmark = [
    pytest.mark.oracle,
    # transformers' own deprecation, raised inside PEFT's get_peft_model
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

TOL = 1e-8
VOCAB = 256
MAX_NEW = 5
CHUNK = 4
BASE = "__base__"  # PEFT's adapter name for "no adapter" in a mixed batch

# name -> PEFT LoraConfig kwargs
ADAPTERS: dict[str, dict[str, Any]] = {
    "attn": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "mlp_rs": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["v_proj", "gate_proj", "up_proj", "down_proj"]),
    "regex": dict(
        r=4,
        lora_alpha=8,
        target_modules=r".*\.(q_proj|v_proj|down_proj)",
        rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 8},
        alpha_pattern={"v_proj": 32},
    ),
}
PROMPT_LENS = (1, 3, 6, 9, 2, 11, 5, 7)  # cycled over the requests; several exceed CHUNK


def _randomise(model: torch.nn.Module, seed: int, select: Callable[[str], bool], scale: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not select(name):
                continue
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale / math.sqrt(p.shape[-1]))


def base_model() -> Any:
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng():  # leave the global RNG as it was
        model = transformers.LlamaForCausalLM(cfg)
    model = model.double().eval()
    _randomise(model, seed=1, select=lambda n: True, scale=1.0)
    return model


def save_adapter(base: Any, kw: dict[str, Any], seed: int, path: Path) -> None:
    """A PEFT LoRA on a copy of ``base``, with random non-zero A and B, saved by PEFT."""
    cfg = peft.LoraConfig(lora_dropout=0.0, **kw)
    with torch.random.fork_rng():
        pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    _randomise(pm, seed=seed, select=lambda n: "lora_" in n, scale=0.5)
    assert all(p.abs().sum() > 0 for n, p in pm.named_parameters() if "lora_B" in n)
    pm.save_pretrained(str(path))


# the adapter of each request, in submission order: three per adapter and three on the base
# model, with neighbours sharing an adapter so batches hold multi-request segments
_A, _M, _R = "attn", "mlp_rs", "regex"
ORDER: tuple[str | None, ...] = (_A, _A, _M, None, _R, _R, None, _M, _A, None, _R, _M)


def requests() -> list[tuple[str, str | None, list[int]]]:
    """(rid, adapter, prompt) for every request of the run."""
    gen = torch.Generator().manual_seed(5)
    out = []
    for i, adapter in enumerate(ORDER):
        n = PROMPT_LENS[i % len(PROMPT_LENS)]
        out.append((f"q{i}", adapter, torch.randint(1, VOCAB, (n,), generator=gen).tolist()))
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("engine_vs_peft")
    base = base_model()
    base.save_pretrained(root / "base")
    dirs = {"base": root / "base"}
    for seed, (name, kw) in enumerate(ADAPTERS.items(), start=10):
        save_adapter(base, kw, seed, root / name)
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="module")
def oracle(saved: dict[str, Path]) -> Any:
    """One PeftModel holding the three saved adapters, loaded from disk like any PEFT user."""
    base = transformers.LlamaForCausalLM.from_pretrained(saved["base"], dtype=torch.float64).eval()
    names = list(ADAPTERS)
    pm = peft.PeftModel.from_pretrained(base, str(saved[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        pm.load_adapter(str(saved[name]), adapter_name=name)
    return pm.eval()


def peft_mixed_generate(pm: Any, reqs: list[tuple[str, str | None, list[int]]]) -> dict[str, list[int]]:
    """Greedy continuations of every request in ONE left-padded PEFT mixed-adapter batch."""
    width = max(len(p) for _, _, p in reqs)
    ids = torch.tensor([[0] * (width - len(p)) + p for _, _, p in reqs])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for _, _, p in reqs])
    with torch.no_grad():
        out = pm.generate(
            input_ids=ids,
            attention_mask=mask,
            adapter_names=[a or BASE for _, a, _ in reqs],
            max_new_tokens=MAX_NEW,
            min_new_tokens=MAX_NEW,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    return {rid: out[i, width:].tolist() for i, (rid, _, _) in enumerate(reqs)}


def run_engine(saved: dict[str, Path], reqs: list[tuple[str, str | None, list[int]]]) -> dict[str, Any]:
    """Serve ``reqs`` as one mixed workload; capture events and every forward's logits per request."""
    cfg = RuntimeConfig(
        dtype="float64", chunked_prefill_size=CHUNK, max_loras_per_batch=4, device="cpu", strict_mem_check=2
    )
    engine = Engine(cfg, model=saved["base"])
    for name in ADAPTERS:
        engine.load_adapter(name, saved[name])
    forwards: list[tuple[list[int], torch.Tensor]] = []  # (per-row last position, logits) per forward
    real_forward = engine.network.forward

    def spy(fb: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        logits = real_forward(fb, *args, **kwargs)
        forwards.append(((fb.prefix_lens + fb.extend_lens - 1).tolist(), logits.clone()))
        return logits

    engine.network.forward = spy
    for rid, adapter, prompt in reqs:
        engine.add_request(prompt, adapter, MAX_NEW, rid=rid)
    events: list[Event] = []
    for _ in range(500):
        if engine.is_idle():
            break
        events.extend(engine.step())
    assert engine.is_idle(), "the engine did not finish the workload"
    assert engine.check() == []
    batches = [e for e in events if isinstance(e, BatchFormed)]
    assert len(batches) == len(forwards)
    rows: dict[str, list[tuple[int, torch.Tensor]]] = {rid: [] for rid, _, _ in reqs}
    for batch, (positions, logits) in zip(batches, forwards):
        for i, rid in enumerate(batch.rids):
            rows[rid].append((positions[i], logits[i]))
    return {
        "outputs": {rid: engine.output(rid) for rid, _, _ in reqs},
        "status": {rid: engine.status(rid) for rid, _, _ in reqs},
        "events": events,
        "rows": rows,
    }


@pytest.fixture(scope="module")
def served(saved: dict[str, Path]) -> dict[str, Any]:
    return run_engine(saved, requests())


def test_the_run_is_one_mixed_chunked_workload(served: dict[str, Any]) -> None:
    events = served["events"]
    mixed = [e for e in events if isinstance(e, BatchFormed) and len(set(e.adapters)) > 1]
    assert mixed, "no batch held more than one adapter"
    assert max(len(set(e.adapters)) for e in mixed) == len(ADAPTERS) + 1, "no batch held every adapter and the base"
    assert any(isinstance(e, Scheduled) and not e.done for e in events), "chunked prefill never split a prompt"
    assert any(isinstance(e, BatchFormed) and e.num_segments < len(e.rids) for e in events), "no multi-request segment"
    assert {e.mode for e in events if isinstance(e, BatchFormed)} == {"prefill", "decode"}
    assert set(served["status"].values()) == {"finished"}
    assert all(len(out) == MAX_NEW for out in served["outputs"].values())


def test_greedy_tokens_equal_peft_mixed_batch_generate(served: dict[str, Any], oracle: Any) -> None:
    reqs = requests()
    want = peft_mixed_generate(oracle, reqs)
    # the mixed-batch generate itself agrees with one-adapter-at-a-time greedy decoding
    for rid, adapter, prompt in reqs:
        toks = list(prompt)
        for _ in range(MAX_NEW):
            toks.append(int(peft_logits(oracle, adapter, toks)[-1].argmax()))
        assert toks[len(prompt) :] == want[rid], f"{rid} ({adapter}): PEFT mixed batch != PEFT alone"
    got = served["outputs"]
    for rid, adapter, _ in reqs:
        assert got[rid] == want[rid], f"{rid} ({adapter or 'base'}): lorainv {got[rid]} != PEFT {want[rid]}"
    # the adapters really change the continuations: not every adapter agrees with the base model
    by_adapter = {a: [got[rid] for rid, b, _ in reqs if b == a] for _, a, _ in reqs}
    assert any(by_adapter[a] != by_adapter[None] for a in ADAPTERS)


def test_every_logit_row_equals_peft(served: dict[str, Any], oracle: Any) -> None:
    """Each prefill chunk's last position and each decode step, against PeftModel's logits."""
    checked = 0
    worst = 0.0
    for rid, adapter, prompt in requests():
        seq = prompt + served["outputs"][rid]
        want = peft_logits(oracle, adapter, seq[:-1])
        if adapter is not None:
            base = peft_logits(oracle, None, seq[:-1])
            assert (want - base).abs().max() > 1e-2, f"adapter {adapter} barely changes the logits"
        rows = served["rows"][rid]
        positions = [p for p, _ in rows]
        assert positions == sorted(positions) and positions[-1] == len(seq) - 2, f"{rid}: positions {positions}"
        for pos, logits in rows:
            diff = (logits - want[pos]).abs().max().item()
            worst = max(worst, diff)
            assert diff <= TOL, f"{rid} ({adapter or 'base'}) position {pos}: max |diff| = {diff:.3e}"
            checked += 1
    assert checked >= len(requests()) * MAX_NEW
    assert worst <= TOL
