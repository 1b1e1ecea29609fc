"""Oracle: adapters saved by real PEFT load into exactly PEFT's weights and scalings."""

from __future__ import annotations

import re

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lorainv.impl.adapters import load_peft_adapter  # noqa: E402
from lorainv.impl.dims import GROUPS, MODULE_GROUP, ModelDims  # noqa: E402

pytestmark = pytest.mark.oracle

DIMS = ModelDims(
    num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128, vocab_size=256
)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NAME = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)")


def peft_model(lora_kw: dict):
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=256,
    )
    model = transformers.LlamaForCausalLM(cfg)
    pm = peft.get_peft_model(model, peft.LoraConfig(lora_dropout=0.0, **lora_kw))
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for mod in lora_modules(pm).values():
            a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight  # B is zero-initialised by PEFT
            a.copy_(torch.randn(a.shape, generator=gen) / a.shape[1] ** 0.5)
            b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    return pm


def lora_modules(pm) -> dict[tuple[int, str], torch.nn.Module]:
    out = {}
    for name, mod in pm.named_modules():
        m = NAME.fullmatch(name)
        if m and hasattr(mod, "lora_A") and "default" in mod.lora_A:
            out[(int(m.group(1)), m.group(3))] = mod
    return out


CASES = {
    "plain": dict(r=4, lora_alpha=8, target_modules=ALL),
    "rslora_qv": dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True),
    "patterns_regex": dict(
        r=4,
        lora_alpha=8,
        target_modules=r".*\.(q_proj|v_proj|down_proj)",
        rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 8},
        alpha_pattern={"v_proj": 32},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saved_adapter_roundtrip(tmp_path, case):
    kw = CASES[case]
    pm = peft_model(kw)
    pm.save_pretrained(str(tmp_path))
    assert (tmp_path / "adapter_model.safetensors").exists()
    ad = load_peft_adapter("p", tmp_path, DIMS, max_lora_rank=16, dtype=torch.float32)

    default_scaling = kw["lora_alpha"] / (kw["r"] ** 0.5 if kw.get("use_rslora") else kw["r"])
    assert ad.scaling == default_scaling
    mods = lora_modules(pm)
    assert ad.target_modules == frozenset(m for _, m in mods)
    assert ad.rank == max(mod.lora_A["default"].weight.shape[0] for mod in mods.values())
    gen = torch.Generator().manual_seed(7)
    for (layer, m), mod in sorted(mods.items()):
        g = MODULE_GROUP[m]
        i = GROUPS[g].index(m)
        off = sum(DIMS.group_out_sizes(g)[:i])
        out = DIMS.group_out_sizes(g)[i]
        pa, pb = mod.lora_A["default"].weight.detach(), mod.lora_B["default"].weight.detach()
        r_m, s_m = pa.shape[0], mod.scaling["default"]
        a = ad.weights[layer][g][0][i * ad.rank : i * ad.rank + r_m]
        b = ad.weights[layer][g][1][off : off + out, :r_m]
        assert torch.equal(a, pa), f"{layer}.{m}: A differs"
        if s_m == ad.scaling:
            assert torch.equal(b, pb), f"{layer}.{m}: B differs"
        else:
            torch.testing.assert_close(b * ad.scaling, pb * s_m, rtol=1e-6, atol=0)
        # the slot semantics y += s * (x A^T) B^T reproduce PEFT's forward delta
        x = torch.randn(3, pa.shape[1], generator=gen)
        with torch.no_grad():
            delta = mod(x) - mod.get_base_layer()(x)
        torch.testing.assert_close(ad.scaling * (x @ a.T) @ b.T, delta, rtol=1e-5, atol=1e-6)
    # everything PEFT did not wrap is zero
    for layer in range(DIMS.num_layers):
        for g, members in GROUPS.items():
            for i, m in enumerate(members):
                if (layer, m) not in mods:
                    assert torch.count_nonzero(ad.weights[layer][g][0][i * ad.rank : (i + 1) * ad.rank]) == 0


def test_peft_loads_what_write_peft_adapter_writes(tmp_path):
    from lorainv.impl.adapters import write_peft_adapter

    path = write_peft_adapter(
        tmp_path, DIMS, rank=4, seed=3, alpha=8, rank_pattern={"k_proj": 2}, alpha_pattern={"up_proj": 2}
    )
    base = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            vocab_size=256,
        )
    )
    pm = peft.PeftModel.from_pretrained(base, str(path))
    ad = load_peft_adapter("w", path, DIMS, max_lora_rank=16, dtype=torch.float32)
    mods = lora_modules(pm)
    assert len(mods) == 2 * 7
    for (layer, m), mod in mods.items():
        g, i = MODULE_GROUP[m], GROUPS[MODULE_GROUP[m]].index(m)
        off, out = sum(DIMS.group_out_sizes(g)[:i]), DIMS.group_out_sizes(g)[i]
        pa, pb = mod.lora_A["default"].weight.detach(), mod.lora_B["default"].weight.detach()
        r_m = pa.shape[0]
        assert r_m == (2 if m == "k_proj" else 4)
        assert torch.equal(ad.weights[layer][g][0][i * ad.rank : i * ad.rank + r_m], pa)
        b = ad.weights[layer][g][1][off : off + out, :r_m]
        torch.testing.assert_close(b * ad.scaling, pb * mod.scaling["default"], rtol=1e-6, atol=0)
