"""The Llama network: paged multi-LoRA forward vs the plain reference forward, checkpoints, errors.

Everything runs in float64; "equal" means within 1e-9 on every logit.
"""

from __future__ import annotations

import json

import pytest
import torch
from lora_testutil import PagedRunner, random_lora_layers, write_slot
from safetensors.torch import load_file, save_file

from lorainv.errors import ConfigError, RequestError
from lorainv.impl.backends import get_backend
from lorainv.impl.llama import LlamaConfig, LlamaNetwork
from lorainv.impl.lora_buffers import LoraBuffers

TOL = 1e-9
BACKENDS = ["torch_native", pytest.param("triton", marks=pytest.mark.triton)]
SCALINGS = {1: 0.5, 2: 2.0, 3: 1.25}


@pytest.fixture(scope="module")
def net():
    return LlamaNetwork.tiny(seed=0, dtype=torch.float64)


@pytest.fixture(scope="module")
def adapters(net):
    """slot -> per-layer stacked (A, B): slot 1 rank 4 on every group, slot 2 rank 8 on qkv and
    down only, slot 3 rank 2 on o and gate_up only. Slot 0 is the base model."""
    gen = torch.Generator().manual_seed(42)
    return {
        1: random_lora_layers(net.dims, 4, gen),
        2: random_lora_layers(net.dims, 8, gen, groups=("qkv", "down")),
        3: random_lora_layers(net.dims, 2, gen, groups=("o", "gate_up")),
    }


@pytest.fixture
def buffers(net, adapters):
    buf = LoraBuffers.allocate(net.dims, 4, 8, torch.float64, torch.device("cpu"))
    write_slot(buf, 0, None, 0.0)
    for slot, layers in adapters.items():
        write_slot(buf, slot, layers, SCALINGS[slot])
    return buf


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "triton":
        pytest.importorskip("triton")
    return get_backend(request.param)


def reference_last(net, adapters, tokens, slot):
    if slot == 0:
        return net.reference_forward(tokens)[-1]
    return net.reference_forward(tokens, adapters[slot], SCALINGS[slot])[-1]


def assert_close(a, b):
    assert a.shape == b.shape
    diff = (a - b).abs().max().item()
    assert diff <= TOL, f"max |diff| = {diff:.3e}"


def prompt(seed: int, n: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_adapters_change_the_logits(net, adapters):
    toks = prompt(0, 6)
    base = net.reference_forward(toks)
    for slot, layers in adapters.items():
        assert (net.reference_forward(toks, layers, SCALINGS[slot]) - base).abs().max() > 1e-3


def test_mixed_paged_batch_equals_each_request_alone(net, adapters, buffers, backend):
    """Prefill with mixed adapters, an extend on top of a prefix, then decode steps in shuffled
    order: every request's logits equal its own reference forward with merged W + s·B·A."""
    runner = PagedRunner(net, buffers, backend, seed=3)
    slot_of = {0: 1, 1: 0, 2: 2, 3: 1, 4: 3}  # row -> slot
    full = {0: prompt(1, 7), 1: prompt(2, 5), 2: prompt(3, 9), 3: prompt(4, 4), 4: prompt(5, 6)}
    seqs: dict[int, list[int]] = {r: [] for r in full}

    def step(parts, mode="extend"):
        logits = runner.step([(r, toks, slot_of[r]) for r, toks in parts], mode=mode)
        for (r, toks), got in zip(parts, logits):
            seqs[r] += toks
            assert_close(got, reference_last(net, adapters, seqs[r], slot_of[r]))
        return logits

    # slots 1,1,0,2,3: the first two requests share an adapter and form one segment
    step([(0, full[0][:4]), (3, full[3]), (1, full[1][:2]), (2, full[2]), (4, full[4][:3])])
    last = step([(1, full[1][2:]), (0, full[0][4:]), (4, full[4][3:])])  # extend on top of prefixes
    nxt = {1: int(last[0].argmax()), 0: int(last[1].argmax()), 4: int(last[2].argmax())}
    nxt |= {r: int(reference_last(net, adapters, seqs[r], slot_of[r]).argmax()) for r in (2, 3)}
    gen = torch.Generator().manual_seed(9)
    for _ in range(3):
        order = torch.randperm(5, generator=gen).tolist()
        logits = step([(r, [nxt[r]]) for r in order], mode="decode")
        nxt = {r: int(lg.argmax()) for r, lg in zip(order, logits)}
    assert all(len(seqs[r]) == len(full[r]) + 3 for r in full)


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_chunked_prefill_equals_unchunked(net, adapters, buffers, chunk):
    toks = prompt(11, 20)
    whole = PagedRunner(net, buffers, get_backend("torch_native"), seed=1).step([(0, toks, 1), (1, toks, 0)])
    runner = PagedRunner(net, buffers, get_backend("torch_native"), seed=chunk)
    for start in range(0, len(toks), chunk):
        part = toks[start : start + chunk]
        got = runner.step([(0, part, 1), (1, part, 0)])
        assert_close(got[0], reference_last(net, adapters, toks[: start + len(part)], 1))
        assert_close(got[1], reference_last(net, adapters, toks[: start + len(part)], 0))
    assert_close(got, whole)


@pytest.mark.triton
def test_chunked_prefill_triton(net, adapters, buffers):
    pytest.importorskip("triton")
    toks = prompt(12, 7)
    runner = PagedRunner(net, buffers, get_backend("triton"), seed=5)
    for start in range(0, len(toks), 3):
        got = runner.step([(0, toks[start : start + 3], 2), (1, toks[start : start + 3], 3)])
        assert_close(got[0], reference_last(net, adapters, toks[: start + 3], 2))
        assert_close(got[1], reference_last(net, adapters, toks[: start + 3], 3))


def test_greedy_decode_equals_reference(net, adapters, buffers):
    toks = prompt(21, 5)
    runner = PagedRunner(net, buffers, get_backend("torch_native"), seed=2)
    logits = runner.step([(0, toks, 2)])[0]
    ref_seq = list(toks)
    for _ in range(8):
        ref = reference_last(net, adapters, ref_seq, 2)
        assert_close(logits, ref)
        ref_seq.append(int(ref.argmax()))
        logits = runner.step([(0, [ref_seq[-1]], 2)], mode="decode")[0]
    assert len(set(ref_seq[5:])) > 1, "greedy output should vary"


def test_forward_without_lora(net):
    toks = prompt(31, 6)
    got = PagedRunner(net, None, None, seed=4).step([(2, toks, 0)])
    assert_close(got[0], net.reference_forward(toks)[-1])


def test_tiny_is_deterministic_and_varied():
    a, b, c = (LlamaNetwork.tiny(seed=s, dtype=torch.float64) for s in (5, 5, 6))
    assert all(torch.equal(x, y) for x, y in zip(a.hf_state_dict().values(), b.hf_state_dict().values()))
    assert not torch.equal(a.embed, c.embed)
    firsts = {int(a.reference_forward(prompt(s, 4))[-1].argmax()) for s in range(12)}
    assert len(firsts) >= 6, firsts
    f32 = LlamaNetwork.tiny(seed=5, dtype=torch.float32)
    assert f32.embed.dtype == torch.float32
    torch.testing.assert_close(
        f32.reference_forward([1, 2, 3]).double(), a.reference_forward([1, 2, 3]), atol=1e-4, rtol=0
    )
    cfg = a.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 2)
    assert (cfg.head_dim, cfg.intermediate_size, a.vocab_size, a.max_context_len) == (16, 128, 256, 512)


def test_tied_and_untied_embeddings():
    tied = LlamaNetwork.tiny(seed=0, dtype=torch.float64, tie_word_embeddings=True)
    untied = LlamaNetwork.tiny(seed=0, dtype=torch.float64)
    assert tied.lm_head is tied.embed and untied.lm_head is not untied.embed
    assert "lm_head.weight" not in tied.hf_state_dict()
    toks = prompt(41, 5)
    assert (tied.reference_forward(toks) - untied.reference_forward(toks)).abs().max() > 1e-2
    got = PagedRunner(tied, None, None).step([(0, toks, 0)])
    assert_close(got[0], tied.reference_forward(toks)[-1])


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("num_shards", [1, 3])
def test_checkpoint_round_trip(tmp_path, tie, num_shards):
    net = LlamaNetwork.tiny(seed=1, dtype=torch.float64, tie_word_embeddings=tie)
    net.save_pretrained(tmp_path, num_shards=num_shards)
    sharded = (tmp_path / "model.safetensors.index.json").exists()
    assert sharded == (num_shards > 1)
    if sharded:
        weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
        assert len(set(weight_map.values())) == 3 and set(weight_map) == set(net.hf_state_dict())
    back = LlamaNetwork.from_pretrained(tmp_path, dtype=torch.float64)
    assert back.config == net.config
    for name, t in net.hf_state_dict().items():
        assert torch.equal(back.hf_state_dict()[name], t), name
    toks = prompt(51, 6)
    assert torch.equal(back.reference_forward(toks), net.reference_forward(toks))
    assert LlamaNetwork.from_pretrained(tmp_path).embed.dtype == torch.float32


def _saved(tmp_path):
    LlamaNetwork.tiny(seed=2, dtype=torch.float64).save_pretrained(tmp_path)
    return tmp_path / "config.json", tmp_path / "model.safetensors"


def _edit_config(path, **changes):
    d = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    path.write_text(json.dumps(d))


def test_missing_tensor_is_named(tmp_path):
    _, weights = _saved(tmp_path)
    t = load_file(str(weights))
    del t["model.layers.1.mlp.up_proj.weight"]
    save_file(t, str(weights))
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        LlamaNetwork.from_pretrained(tmp_path, dtype=torch.float64)


def test_wrong_shape_is_named(tmp_path):
    _, weights = _saved(tmp_path)
    t = load_file(str(weights))
    t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64, dtype=torch.float64)
    save_file(t, str(weights))
    with pytest.raises(ConfigError, match=r"self_attn\.k_proj\.weight.*\(64, 64\), expected \(32, 64\)"):
        LlamaNetwork.from_pretrained(tmp_path)


def test_unexpected_tensor_is_named(tmp_path):
    _, weights = _saved(tmp_path)
    t = load_file(str(weights))
    t["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64, dtype=torch.float64)
    save_file(t, str(weights))
    with pytest.raises(ConfigError, match=r"q_proj\.bias"):
        LlamaNetwork.from_pretrained(tmp_path)


def test_sharded_index_naming_a_missing_file(tmp_path):
    LlamaNetwork.tiny(seed=2).save_pretrained(tmp_path, num_shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"model-00002-of-00002\.safetensors"):
        LlamaNetwork.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"architectures": ["MistralForCausalLM"]}, "architectures"),
        ({"architectures": None, "model_type": "gpt2"}, "model_type"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope_type='llama3'"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling type 'linear'"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True}, "attention_bias"),
        ({"num_hidden_layers": None}, "'num_hidden_layers' is missing"),
        ({"hidden_size": "64"}, "'hidden_size' must be a positive int"),
    ],
)
def test_unsupported_config_is_named(tmp_path, changes, match):
    config, _ = _saved(tmp_path)
    _edit_config(config, **changes)
    with pytest.raises(ConfigError, match=match):
        LlamaNetwork.from_pretrained(tmp_path)


def test_rope_parameters_accepted(tmp_path):
    config, _ = _saved(tmp_path)
    _edit_config(config, rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    net = LlamaNetwork.from_pretrained(tmp_path, dtype=torch.float64)
    assert net.config.rope_theta == 500000.0
    ref = LlamaNetwork.tiny(seed=2, dtype=torch.float64)
    toks = prompt(61, 8)
    assert (net.reference_forward(toks) - ref.reference_forward(toks)).abs().max() > 1e-6  # theta is used
    _edit_config(config, rope_parameters=None, rope_theta=10000.0, rope_scaling={"rope_type": "default"})
    assert LlamaNetwork.from_pretrained(tmp_path).config.rope_theta == 10000.0


def test_config_from_hf_dict_defaults():
    cfg = LlamaConfig.from_hf_dict(
        {
            "model_type": "llama",
            "vocab_size": 10,
            "hidden_size": 8,
            "intermediate_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        }
    )
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.rope_theta, cfg.tie_word_embeddings) == (2, 4, 10000.0, False)
    assert cfg.dims().q_size == 8
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        LlamaConfig(10, 8, 16, 1, 4, 3, 2)


def test_token_ids_outside_the_vocabulary_are_refused(net):
    net.check_token_ids([0, 255])
    for bad in ([1, 256], [-1], [3, 1.0]):
        with pytest.raises(RequestError, match="outside the vocabulary"):
            net.check_token_ids(bad)
    with pytest.raises(RequestError):
        net.reference_forward([5, 999])
