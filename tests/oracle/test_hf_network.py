"""Oracle: our network against Hugging Face ``LlamaForCausalLM`` and PEFT LoRA, in float64.

HF models are built with random weights drawn from our own ``torch.Generator`` (model
construction runs under ``fork_rng`` so the global RNG is left as it was).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from lora_testutil import PagedRunner, write_slot

from lorainv.impl.backends import get_backend
from lorainv.impl.dims import GROUPS, MODULE_GROUP
from lorainv.impl.llama import LlamaNetwork
from lorainv.impl.lora_buffers import LoraBuffers

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.oracle

TOL = 1e-9
VOCAB = 128


def hf_model(tie: bool, seed: int):
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        rope_theta=5000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng():
        model = transformers.LlamaForCausalLM(cfg)
    model = model.to(torch.float64).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / math.sqrt(p.shape[-1]))
    return model


def tokens(seed: int, n: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_logits(model, toks: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([toks]), use_cache=False).logits[0]


def assert_close(a, b):
    diff = (a - b).abs().max().item()
    assert diff <= TOL, f"max |diff| = {diff:.3e}"


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("shard", [None, "40KB"])
def test_hf_checkpoint_logits(tmp_path, tie, shard):
    model = hf_model(tie, seed=1)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(tmp_path, **kwargs)
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(shard)
    net = LlamaNetwork.from_pretrained(tmp_path, dtype=torch.float64)
    assert net.config.tie_word_embeddings == tie and net.config.rope_theta == 5000.0
    toks = tokens(2, 24)
    want = hf_logits(model, toks)
    assert_close(net.reference_forward(toks), want)
    runner = PagedRunner(net, None, None, seed=3)
    for start in range(0, len(toks), 5):  # chunked prefill through the paged path
        got = runner.step([(0, toks[start : start + 5], 0)])
        assert_close(got[0], want[min(start + 5, len(toks)) - 1])


def test_our_checkpoint_loads_in_hf(tmp_path):
    net = LlamaNetwork.tiny(seed=4, dtype=torch.float64)
    net.save_pretrained(tmp_path, num_shards=2)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    toks = [t % 256 for t in tokens(5, 16)]
    assert_close(net.reference_forward(toks), hf_logits(model, toks))


def peft_adapter(base, targets: list[str], r: int, alpha: int, rslora: bool, seed: int):
    """A PEFT LoRA model on a copy of ``base`` with random A and B; returns (model, layers, scaling)
    where ``layers`` is our stacked per-layer ``{group: (A [S*r, in], B [sum(outs), r])}``."""
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, use_rslora=rslora)
    with torch.random.fork_rng():
        model = peft.get_peft_model(copy.deepcopy(base), cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5 / math.sqrt(p.shape[-1]))
    model.eval()
    sd = model.state_dict()
    n_layers = base.config.num_hidden_layers
    scaling = alpha / (math.sqrt(r) if rslora else r)
    layers = []
    for n in range(n_layers):
        layer = {}
        for group, mods in GROUPS.items():
            if not any(m in targets for m in mods):
                continue
            a_parts, b_parts = [], []
            for m in mods:
                parent = "mlp" if MODULE_GROUP[m] in ("gate_up", "down") else "self_attn"
                mod = getattr(getattr(model.base_model.model.model.layers[n], parent), m)
                if m in targets:
                    prefix = f"base_model.model.model.layers.{n}.{parent}.{m}"
                    a_parts.append(sd[f"{prefix}.lora_A.default.weight"])
                    b_parts.append(sd[f"{prefix}.lora_B.default.weight"])
                    assert mod.scaling["default"] == pytest.approx(scaling)
                else:
                    a_parts.append(torch.zeros(r, mod.in_features, dtype=torch.float64))
                    b_parts.append(torch.zeros(mod.out_features, r, dtype=torch.float64))
            layer[group] = (torch.cat(a_parts), torch.cat(b_parts))
        layers.append(layer)
    return model, layers, scaling


ADAPTERS = [
    (["q_proj", "k_proj", "v_proj", "o_proj"], 4, 8, False),
    (["v_proj", "gate_proj", "up_proj", "down_proj"], 8, 16, True),
]


@pytest.mark.parametrize("backend_name", ["torch_native", pytest.param("triton", marks=pytest.mark.triton)])
def test_peft_adapters_in_a_mixed_paged_batch(tmp_path, backend_name):
    if backend_name == "triton":
        pytest.importorskip("triton")
    base = hf_model(False, seed=6)
    base.save_pretrained(tmp_path)
    net = LlamaNetwork.from_pretrained(tmp_path, dtype=torch.float64)
    buffers = LoraBuffers.allocate(net.dims, 3, 8, torch.float64, torch.device("cpu"))
    peft_models = []
    for slot, (targets, r, alpha, rslora) in enumerate(ADAPTERS, start=1):
        model, layers, scaling = peft_adapter(base, targets, r, alpha, rslora, seed=10 + slot)
        write_slot(buffers, slot, layers, scaling)
        peft_models.append(model)
        toks = tokens(20 + slot, 12)
        want = hf_logits(model, toks)
        assert (want - hf_logits(base, toks)).abs().max() > 1e-3, "the adapter must matter"
        assert_close(net.reference_forward(toks, layers, scaling), want)

    n_tok = 6 if backend_name == "triton" else 14
    seqs = {0: tokens(31, n_tok), 1: tokens(32, n_tok), 2: tokens(33, n_tok)}
    slot_of = {0: 1, 1: 0, 2: 2}
    want = {0: hf_logits(peft_models[0], seqs[0]), 1: hf_logits(base, seqs[1]), 2: hf_logits(peft_models[1], seqs[2])}
    runner = PagedRunner(net, buffers, get_backend(backend_name), seed=7)
    half = n_tok // 2
    got = runner.step([(r, seqs[r][:half], slot_of[r]) for r in (0, 1, 2)])
    for r in (0, 1, 2):
        assert_close(got[r], want[r][half - 1])
    for pos in range(half, n_tok):  # decode the rest teacher-forced, one token per request
        got = runner.step([(r, [seqs[r][pos]], slot_of[r]) for r in (2, 0, 1)], mode="decode")
        for i, r in enumerate((2, 0, 1)):
            assert_close(got[i], want[r][pos])
