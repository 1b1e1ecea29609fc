"""What multi-LoRA costs in one forward pass: a batch over 8 distinct rank-16 adapters vs the
same batch without LoRA, per backend.

The network is a random Llama (hidden 256, 4 layers, 8 heads, 2 KV heads, vocab 1024; quick:
hidden 128, 2 layers, and the interpreted Triton backend on the decode case only) run through
the paged ``LlamaNetwork.forward``; 8 LoRA slots hold random rank-16 adapters on all seven
projections. Two batch kinds, requests grouped by adapter (8
segments):

* decode: 64 requests x 1 new token over 64 tokens of context each;
* prefill: 8 requests x 64 new tokens.

The base run is the identical ``ForwardBatch`` with ``lora=None`` (no backend call). Timed
forwards alternate base / LoRA in blocks; the result is the ratio of the medians, LoRA over
base. The ideal is the FLOP ratio ``(base + LoRA FLOPs) / base FLOPs`` (linear layers,
attention and LM head counted). Outputs are checked: LoRA changes the logits, and both
backends give the same logits on the same batch.

The Triton backend runs under ``TRITON_INTERPRET=1`` (the CPU interpreter), on a smaller batch
and with fewer repeats; its numbers say nothing about GPU speed. No GPU is used anywhere.

Run ``python -m bench.lora_overhead [--quick]``; writes ``bench/results/lora_overhead.json``.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from lorainv.impl.batch import ForwardBatch, build_lora_batch_info
from lorainv.impl.dims import GROUPS
from lorainv.impl.llama import KVCache, LayerWeights, LlamaNetwork
from lorainv.impl.llama_config import LlamaConfig
from lorainv.impl.lora_buffers import LoraBuffers

from . import common

NAME = "lora_overhead"
N_ADAPTERS = 8
RANK = 16


def network(hidden: int, layers: int, seed: int = 0) -> LlamaNetwork:
    """A random Llama with GQA (heads = hidden / 32, 2 KV heads), deterministic from ``seed``."""
    heads = hidden // 32
    cfg = LlamaConfig(
        vocab_size=1024,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
    )
    d = cfg.dims()
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    h, i = d.hidden_size, d.intermediate_size
    lw = [
        LayerWeights(
            input_norm=torch.ones(h),
            qkv=rnd(d.q_size + 2 * d.kv_size, h),
            o=rnd(h, d.q_size),
            post_norm=torch.ones(h),
            gate_up=rnd(2 * i, h),
            down=rnd(h, i),
        )
        for _ in range(d.num_layers)
    ]
    return LlamaNetwork(cfg, torch.randn(d.vocab_size, h, generator=g), lw, torch.ones(h), rnd(d.vocab_size, h))


def buffers(net: LlamaNetwork, seed: int = 1) -> LoraBuffers:
    """Slot 0 is the base model (rank 0); slots 1..8 hold random rank-16 adapters, scaling 2."""
    buf = LoraBuffers.allocate(net.dims, N_ADAPTERS + 1, RANK, torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    for layer in range(net.dims.num_layers):
        for grp in GROUPS:
            a, b = buf.A[layer][grp], buf.B[layer][grp]
            a[1:] = torch.randn(a[1:].shape, generator=g) / a.shape[-1] ** 0.5
            b[1:] = torch.randn(b[1:].shape, generator=g) * 0.1
    buf.ranks[1:] = RANK
    buf.scalings[1:] = 2.0
    return buf


@dataclass(frozen=True)
class Case:
    kind: str  # decode | prefill
    requests: int
    new_tokens: int
    context: int  # tokens already in the cache per request


def make_batch(net: LlamaNetwork, case: Case, buf: LoraBuffers) -> tuple[ForwardBatch, KVCache, torch.Tensor]:
    """The batch (requests grouped by adapter, 8 segments), a KV cache with the context filled
    with random values, and ``req_to_token``."""
    n, e, c = case.requests, case.new_tokens, case.context
    per = n * (c + e)
    g = torch.Generator().manual_seed(7)
    kv = KVCache.allocate(net.config, per + 1, torch.float32, "cpu")
    for layer in range(net.dims.num_layers):
        kv.k[layer].copy_(torch.randn(kv.k[layer].shape, generator=g))
        kv.v[layer].copy_(torch.randn(kv.v[layer].shape, generator=g))
    req_to_token = torch.zeros(n, net.max_context_len, dtype=torch.long)
    for r in range(n):
        req_to_token[r, : c + e] = torch.arange(1 + r * (c + e), 1 + (r + 1) * (c + e))
    ids = torch.randint(0, net.vocab_size, (n * e,), generator=g)
    slots = [1 + r * N_ADAPTERS // n for r in range(n)]  # grouped: 8 segments
    fb = ForwardBatch(
        mode="decode" if e == 1 else "extend",
        input_ids=ids,
        positions=torch.cat([torch.arange(c, c + e) for _ in range(n)]),
        rows=torch.arange(n),
        prefix_lens=torch.full((n,), c),
        extend_lens=torch.full((n,), e),
        out_cache_loc=torch.cat([req_to_token[r, c : c + e] for r in range(n)]),
        lora=build_lora_batch_info(slots, [e] * n, buf.ranks, buf.scalings),
    )
    fb.check_valid()
    return fb, kv, req_to_token


def flops(net: LlamaNetwork, case: Case) -> tuple[float, float]:
    """(base FLOPs, LoRA FLOPs) of the batch: 2 x multiply-adds of every matmul."""
    d = net.dims
    t = case.requests * case.new_tokens
    linear = sum(d.group_in(grp) * sum(d.group_out_sizes(grp)) for grp in GROUPS)
    lora = sum(RANK * (len(d.group_out_sizes(grp)) * d.group_in(grp) + sum(d.group_out_sizes(grp))) for grp in GROUPS)
    ctx = case.context + (case.new_tokens + 1) / 2  # mean attended length per new token
    attn = 2 * ctx * d.num_heads * d.head_dim
    base = 2 * t * (d.num_layers * (linear + attn) + d.hidden_size * d.vocab_size)
    return base, 2 * t * d.num_layers * lora


@dataclass
class Result:
    backend: str
    kind: str
    requests: int
    new_tokens: int
    context: int
    repeats: int
    base_ms: float
    lora_ms: float
    ratio: float
    flop_ratio_lora_over_base: float
    ideal_ratio: float
    max_abs_diff_vs_torch_native: float | None
    note: str


def _time(fn: Any, n: int) -> list[float]:
    out = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return out


def measure(net: LlamaNetwork, buf: LoraBuffers, case: Case, backend: Any, repeats: int, block: int) -> Result:
    fb, kv, r2t = make_batch(net, case, buf)
    plain = ForwardBatch(**{**fb.__dict__, "lora": None})
    with torch.inference_mode():
        base_out = net.forward(plain, kv, r2t, None, None)
        lora_out = net.forward(fb, kv, r2t, buf, backend)
    if (lora_out - base_out).abs().max().item() < 1e-3:
        raise RuntimeError(f"{case}: LoRA did not change the logits")
    base_t, lora_t = [], []
    with torch.inference_mode():
        for _ in range(repeats):
            base_t.append(common.median(_time(lambda: net.forward(plain, kv, r2t, None, None), block)))
            lora_t.append(common.median(_time(lambda: net.forward(fb, kv, r2t, buf, backend), block)))
    b, lo = common.median(base_t) * 1e3, common.median(lora_t) * 1e3
    fb_, fl = flops(net, case)
    return Result(
        backend.name,
        case.kind,
        case.requests,
        case.new_tokens,
        case.context,
        repeats,
        round(b, 3),
        round(lo, 3),
        round(lo / b, 3),
        round(fl / fb_, 4),
        round(1 + fl / fb_, 4),
        None,
        "",
    )


def check_same(net: LlamaNetwork, buf: LoraBuffers, case: Case, a: Any, b: Any) -> float:
    """Max |logits difference| of two backends on the same LoRA batch (fresh KV each)."""
    outs = []
    for backend in (a, b):
        fb, kv, r2t = make_batch(net, case, buf)
        with torch.inference_mode():
            outs.append(net.forward(fb, kv, r2t, buf, backend))
    return float((outs[0] - outs[1]).abs().max())


def triton_backend() -> tuple[Any, str]:
    """The Triton backend on the CPU interpreter, or (None, reason)."""
    if not torch.cuda.is_available():
        if "lorainv.impl.backends.triton_backend" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            return None, "triton backend imported before TRITON_INTERPRET=1 was set"
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        from lorainv.impl.backends import get_backend

        return get_backend("triton"), "TRITON_INTERPRET=1 (CPU interpreter; not GPU speed)"
    except Exception as e:  # triton missing or unusable here
        return None, f"skipped: {e}"


def render(results: Sequence[Result]) -> str:
    head = ["backend", "batch", "tokens", "base ms", "LoRA ms", "LoRA/base", "ideal (FLOPs)", "max |diff|"]
    rows = []
    for r in results:
        diff = "-" if r.max_abs_diff_vs_torch_native is None else f"{r.max_abs_diff_vs_torch_native:.1e}"
        batch = f"{r.kind} {r.requests}x{r.new_tokens}"
        rows.append([r.backend, batch, r.requests * r.new_tokens, f"{r.base_ms:.2f}", f"{r.lora_ms:.2f}"])
        rows[-1] += [f"{r.ratio:.2f}x", f"{r.ideal_ratio:.3f}x", diff]
    return common.table(head, rows, right=[False, False] + [True] * 6)


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(NAME, __doc__)
    p.add_argument("--repeats", type=int, default=None, help="timed blocks per side (default 7, quick 3)")
    p.add_argument("--no-triton", action="store_true", help="skip the (interpreted) Triton backend")
    args = p.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 7)
    if repeats < 1:
        p.error("--repeats must be >= 1")
    torch.set_num_threads(args.threads)
    from lorainv.impl.backends import get_backend

    t0 = time.perf_counter()
    net = network(128, 2) if args.quick else network(256, 4)
    buf = buffers(net)
    native = get_backend("torch_native")
    cases = [Case("decode", 64, 1, 64), Case("prefill", 8, 64, 0)]
    results = [measure(net, buf, c, native, repeats, block=5) for c in cases]
    triton_note = "skipped (--no-triton)"
    if not args.no_triton:
        tri, triton_note = triton_backend()
        if tri is not None:
            small = [Case("decode", 16, 1, 16), Case("prefill", 8, 4, 0)]
            if args.quick:  # one interpreted case shows the path runs and agrees (~7 s a forward)
                small = small[:1]
            for c in small:
                ref = measure(net, buf, c, native, repeats, block=3)
                res = measure(net, buf, c, tri, max(1, repeats // 3), block=1)
                ref.max_abs_diff_vs_torch_native = res.max_abs_diff_vs_torch_native = check_same(
                    net, buf, c, native, tri
                )
                res.note = triton_note
                if res.max_abs_diff_vs_torch_native > 1e-3:
                    raise RuntimeError(f"{c}: triton and torch_native disagree by {res.max_abs_diff_vs_torch_native}")
                results += [ref, res]
    elapsed = time.perf_counter() - t0
    h, layers = net.dims.hidden_size, net.dims.num_layers
    print(f"lora_overhead — forward with 8 distinct rank-{RANK} adapters / without LoRA ({common.MACHINE_NOTE})")
    print(f"model: hidden {h}, {layers} layers, GQA {net.dims.num_heads}/{net.dims.num_kv_heads}; float32; 1 thread\n")
    print(render(results))
    print(f"\ntriton: {triton_note}. 'ideal' = (base + LoRA FLOPs) / base FLOPs.")
    doc = {
        "quick": args.quick,
        "model": {"hidden": h, "layers": layers, "heads": net.dims.num_heads, "kv_heads": net.dims.num_kv_heads},
        "adapters": N_ADAPTERS,
        "rank": RANK,
        "torch_threads": args.threads,
        "triton": triton_note,
        "elapsed_s": round(elapsed, 2),
        "results": [asdict(r) for r in results],
    }
    path = common.write_json(args.out, NAME, doc)
    print(f"\n{len(results)} measurements in {elapsed:.1f} s; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
